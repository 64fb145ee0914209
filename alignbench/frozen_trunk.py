"""Train the top blocks of a model over a frozen trunk that runs once per sequence, not once per step.

With ``model.trainable_layers=K`` a PM trains its top K blocks and its head; the embeddings and the
blocks below are frozen, so the hidden state a sequence reaches at the cut is the same at every
step, every epoch and every setting of a sweep that shares the cut. On SmolLM2 with K = 2 the frozen
28 of 30 blocks are about 80% of a training step. ``TrunkFeatures`` computes a sequence's hidden
state after the bottom ``depth`` blocks once, alone (batch 1, no padding: the same value whatever
batch the sequence lands in), and keeps it keyed by its token ids; inside ``reading(model,
features)``, a forward of ``model`` whose batch ``pm_scores`` announced (``fed``) skips the bottom
blocks: the first returns the batch's kept states in the layout it was called with (packed or
padded), the others hand their input on. Nothing about the model changes: its ``state_dict`` and
structure are untouched; the blocks' ``forward`` is wrapped only inside ``reading``.

The kept states are computed by the model's own forward (stopped at the cut by a hook), so every
architecture the freeze supports works, under the precision the model runs in. A sequence run
alone differs from the same sequence in a padded batch in the last float bits only: with the cache
on, a PM's scores are those of a batch-1 trunk (tested against it), deterministic for a seed.

Refused (``ConfigError``, before training) where the bottom would not be the same at every step: a
trainable parameter below the cut, or an active dropout there.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

from alignbench.config import ConfigError
from alignbench.freeze import decoder_layers

KEY = "stages.pm.trunk_cache"
_fed = threading.local()  # the right-padded batch a forward is about to read (``fed``)


class _AtTheCut(Exception):
    """Raised by the hook on the last frozen block: the rest of the forward is not needed."""


def frozen_depth(model: torch.nn.Module) -> int:
    """How many bottom blocks of ``model`` are frozen with everything below them (the embeddings):
    0 when an embedding trains or the model has no findable blocks."""
    trunk, name, blocks = decoder_layers(model)
    for child_name, child in trunk.named_children():
        if child_name == name:
            break
        if any(p.requires_grad for p in child.parameters()):
            return 0
    depth = 0
    while depth < len(blocks) and not any(p.requires_grad for p in blocks[depth].parameters()):
        depth += 1
    return depth


def check_config(cfg) -> None:
    """``stages.pm.trunk_cache`` needs a frozen trunk (``model.trainable_layers=K``): checked before
    any stage trains (``graph.build_shared_stages``)."""
    if cfg.stages.pm.trunk_cache and cfg.model.trainable_layers is None:
        raise ConfigError(f"{KEY}: needs a frozen trunk to cache; set model.trainable_layers=K (the top K "
                          f"blocks train) or {KEY}=false")


def check(model: torch.nn.Module, depth: int) -> None:
    """``depth`` frozen bottom blocks without an active dropout, else a one-line ConfigError."""
    frozen = frozen_depth(model)
    if depth < 1 or depth > frozen:
        raise ConfigError(f"{KEY}: needs a frozen trunk (model.trainable_layers=K below the model's blocks); "
                          f"asked for {depth} frozen blocks, the model has {frozen}")
    bottom = decoder_layers(model)[2][:depth]
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for b in bottom for m in b.modules()):
        raise ConfigError(f"{KEY}: the frozen blocks have an active dropout: their output changes every step")


class TrunkFeatures:
    """Each sequence's hidden state [n, d] after the bottom ``depth`` blocks of ``model``, computed
    once alone and kept by its token ids; ``hits`` / ``misses`` count the trunk passes saved / run."""

    def __init__(self, model: torch.nn.Module, depth: Optional[int] = None):
        self.depth = frozen_depth(model) if depth is None else depth
        check(model, self.depth)
        self.model, self.blocks = model, decoder_layers(model)[2]
        self.kept: dict[bytes, torch.Tensor] = {}
        self.tuple_out = False  # the blocks return (hidden, ...) rather than hidden (older transformers)
        self.hits = self.misses = 0

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        """The kept state of one sequence (``ids`` [n]), computed on first use."""
        key = ids.detach().cpu().numpy().tobytes()
        state = self.kept.get(key)
        if state is None:
            self.misses += 1
            state = self.kept[key] = self._run(ids)
        else:
            self.hits += 1
        return state

    def bound(self, model: torch.nn.Module) -> "TrunkFeatures":
        """These kept states for another model whose embeddings and bottom ``depth`` blocks are
        bitwise this one's (a sweep's fresh PMs from one init): the same ``kept``, shared; else a
        ConfigError (the states would not be that model's)."""
        if model is self.model:
            return self
        check(model, self.depth)
        if not _same_bottom(self.model, model, self.depth):
            raise ConfigError(f"{KEY}: a model whose frozen bottom {self.depth} blocks differ from the cached ones")
        other = TrunkFeatures.__new__(TrunkFeatures)
        other.__dict__.update(self.__dict__)
        other.model, other.blocks = model, decoder_layers(model)[2]
        other.kept = self.kept
        return other

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept.values())

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        captured = {}

        def stop(module, args, out):
            self.tuple_out = not isinstance(out, torch.Tensor)
            captured["state"] = (out[0] if self.tuple_out else out)[0].detach()
            raise _AtTheCut

        hook = self.blocks[self.depth - 1].register_forward_hook(stop)
        try:
            with torch.no_grad(), fed(None, None):  # inside ``reading``: this forward runs the blocks
                self.model(input_ids=ids[None].to(_device(self.model)), use_cache=False)
        except _AtTheCut:
            pass
        finally:
            hook.remove()
        return captured["state"]


def _bottom(model: torch.nn.Module, depth: int) -> list[torch.Tensor]:
    trunk, name, blocks = decoder_layers(model)
    below = []
    for child_name, child in trunk.named_children():
        if child_name == name:
            break
        below.append(child)
    return [t for m in [*below, *blocks[:depth]] for t in m.state_dict().values()]


def _same_bottom(a: torch.nn.Module, b: torch.nn.Module, depth: int) -> bool:
    ta, tb = _bottom(a, depth), _bottom(b, depth)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def fed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
    """Announce the right-padded batch the next forward reads (``pm_scores`` does, around its
    forward); outside ``reading`` it costs nothing."""
    before = getattr(_fed, "batch", None)
    _fed.batch = None if input_ids is None else (input_ids, attention_mask)
    try:
        yield
    finally:
        _fed.batch = before


def _assembled(features: TrunkFeatures, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """The kept states of the announced batch in the layout of ``hidden`` (the first block's input):
    packed [1, Σ n_i, d] (rows concatenated in order) or padded [B, T, d] (zeros past each row's
    end: masked keys, queries never read). None when nothing was announced or the batch is not
    right-padded: the blocks then run."""
    batch = getattr(_fed, "batch", None)
    if batch is None:
        return None
    input_ids, mask = batch
    counts = mask.sum(-1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None, :] < counts[:, None]):
        return None  # not right-padded (one host sync for the whole batch, not one per row)
    lengths = counts.tolist()
    states = [features.of(input_ids[i, :n]) for i, n in enumerate(lengths)]
    if hidden.shape[0] == 1 and hidden.shape[1] == sum(lengths):
        out = torch.cat(states)[None]
    elif tuple(hidden.shape[:2]) == tuple(input_ids.shape):
        out = hidden.new_zeros(hidden.shape)
        for i, (n, s) in enumerate(zip(lengths, states)):
            out[i, :n] = s
    else:
        raise RuntimeError(f"{KEY}: a first-block input of shape {tuple(hidden.shape)} for a batch of "
                           f"{tuple(input_ids.shape)}")
    return out.to(hidden.dtype)


@contextlib.contextmanager
def reading(model: torch.nn.Module, features: TrunkFeatures) -> Iterator[TrunkFeatures]:
    """Within the block, forwards of ``model`` on an announced batch (``fed``) take the bottom
    ``features.depth`` blocks' output from ``features``; yields ``features``."""
    blocks = list(features.blocks[:features.depth])
    own = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward to put back
    originals = [b.forward for b in blocks]
    skipping = threading.local()

    def wrap(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                with torch.no_grad():
                    skipping.state = _assembled(features, hidden)
            state = getattr(skipping, "state", None)
            if state is None:
                return originals[i](*args, **kwargs)
            out = state if i == len(blocks) - 1 else hidden
            if i == len(blocks) - 1:
                skipping.state = None
            return (out,) if features.tuple_out else out

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = wrap(i)
        yield features
    finally:
        for block, kept in zip(blocks, own):
            if kept is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = kept
