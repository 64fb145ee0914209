"""One pass over a frozen trunk that several models share, reused by all of them.

With ``model.trainable_layers=K`` the policy, π0, the start policy and the PMs trained from the same
base hold bitwise the same bottom blocks (``freeze``): measuring a point runs the proxy PM, the
judge PM, the policy and π0 over the same sampled sequences, in the same batches, so four of the
five trunk passes recompute exactly what the first one computed. Inside ``sharing(models)`` the
first forward of a batch through the shared blocks is kept, and every later forward of any of
those models whose input to the first shared block is bitwise the same (the same token ids through
the same frozen embeddings, the same positions, mask and packing) gets the kept output instead of
running the blocks again. Nothing else changes: the kept output is what the blocks would have
returned, so the scores and log-probs are bitwise those of separate forwards (tested).

How a block is skipped without changing the model (its ``state_dict`` and its structure stay as
they are, so a checkpoint saved meanwhile is unchanged): each shared block's ``forward`` is
replaced, for the duration of the block only, by a wrapper. The first shared block looks its
input up; on a hit it starts a skip, the blocks in between return their input unchanged, and the
last shared block returns the kept output. On a miss the blocks run and the last one keeps its
output, keyed by the first one's input.

Used only for gradient-free forwards (measurement) and only for blocks every model holds bitwise
(compared with ``torch.equal``, so a trained block is never shared), in eval mode, with the same
attention implementation. Models whose blocks cannot be found (``freeze.decoder_layers``) or that
carry LoRA adapters are left alone.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import torch

from alignbench import lora
from alignbench.config import ConfigError
from alignbench.freeze import decoder_layers

log = logging.getLogger(__name__)
DEFAULT_BUDGET_BYTES = 2 << 30  # kept inputs and outputs (LRU): a measurement's batches of 64 need ~0.5 GB
# forward arguments a block passes through without reading (the causal LM's forward hands them down
# to its blocks, the trunk alone does not): left out of the comparison
INERT_KWARGS = frozenset({"output_hidden_states", "return_dict"})
_enabled = True  # switched off by ``disabled()`` (equivalence tests, the benchmark's before/after)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Separate forwards within the block (``sharing`` does nothing)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def scoring_models(*scorers: Any) -> list[torch.nn.Module]:
    """The torch models behind models or scorers: a Module itself, else the scorer's
    ``trunk_models()`` (PMScorer, the two-PM reward, the PM judge); None and others give none."""
    out = []
    for s in scorers:
        if isinstance(s, torch.nn.Module):
            out.append(s)
        elif hasattr(s, "trunk_models"):
            out += s.trunk_models()
    return out


def _blocks(model: torch.nn.Module) -> Optional[torch.nn.ModuleList]:
    if lora.is_peft(model) or not isinstance(model, torch.nn.Module):
        return None
    try:
        return decoder_layers(model)[2]
    except (ConfigError, AttributeError):
        return None


def _same_block(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bitwise the same block: same parameters and buffers (storage shared or values equal), both in
    eval mode."""
    if a is b:
        return not a.training
    if a.training or b.training or type(a) is not type(b):
        return False
    ta = list(a.state_dict(keep_vars=True).items())
    tb = list(b.state_dict(keep_vars=True).items())
    if [n for n, _ in ta] != [n for n, _ in tb]:
        return False
    for (_, x), (_, y) in zip(ta, tb):
        if x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype:
            continue
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
            return False
    return True


def shared_depth(models: list[torch.nn.Module]) -> int:
    """How many bottom blocks every one of ``models`` holds bitwise (0: none, or fewer than two
    models with findable blocks)."""
    lists = [b for b in map(_blocks, models) if b is not None]
    if len(lists) < 2:
        return 0
    impls = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in models}
    if len(impls) > 1:
        return 0
    anchor, depth = lists[0], min(map(len, lists))
    for other in lists[1:]:
        d = 0
        while d < depth and _same_block(anchor[d], other[d]):
            d += 1
        depth = d
    return depth


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of forward arguments (tensors, nested tuples/lists/dicts, plain values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return False  # anything else (a KV cache, ...): never treated as the same


def _comparable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (tuple, list)):
        return all(map(_comparable, value))
    if isinstance(value, dict):
        return all(map(_comparable, value.values()))
    return False


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(map(_detached, value))
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(map(_nbytes, value))
    if isinstance(value, dict):
        return sum(map(_nbytes, value.values()))
    return 0


class TrunkMemo:
    """The kept (input, arguments) -> output of the shared blocks, least recently used first out
    beyond ``budget_bytes``; ``hits`` and ``misses`` count trunk passes saved and run."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget, self.entries, self.hits, self.misses = budget_bytes, OrderedDict(), 0, 0
        self._next = 0

    def find(self, args: tuple) -> Optional[Any]:
        for key, (kept, out, _) in self.entries.items():
            if _same(kept, args):
                self.entries.move_to_end(key)
                self.hits += 1
                return out
        return None

    def keep(self, args: tuple, out: Any) -> None:
        self.misses += 1
        size = _nbytes(args) + _nbytes(out)
        if size > self.budget:
            return
        self.entries[self._next] = (_detached(args), _detached(out), size)
        self._next += 1
        while sum(e[2] for e in self.entries.values()) > self.budget:
            self.entries.popitem(last=False)


class _Patch:
    """The wrappers of one model's shared blocks, and the per-thread state of its forward."""

    def __init__(self, blocks: list[torch.nn.Module], memo: TrunkMemo):
        self.blocks, self.memo, self.state = blocks, memo, threading.local()
        self.originals = [b.forward for b in blocks]
        self.own = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (hooks) to put back
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            block.forward = self._wrap(i, last)

    def restore(self) -> None:
        for block, own in zip(self.blocks, self.own):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own

    def _wrap(self, i: int, last: int):
        original, state = self.originals[i], self.state

        def forward(*args, **kwargs):
            if i == 0:
                state.skip, state.pending = None, None
                call = (args, {k: v for k, v in kwargs.items() if k not in INERT_KWARGS})
                if torch.is_grad_enabled() or not _comparable(call):
                    return original(*args, **kwargs)
                state.skip = self.memo.find(call)
                if state.skip is None:
                    state.pending = call
            if state.skip is not None:  # a kept pass: the blocks in between hand their input on
                if i == last:
                    out, state.skip = state.skip, None
                    return out
                hidden = args[0] if args else kwargs["hidden_states"]
                return hidden if isinstance(state.skip, torch.Tensor) else (hidden,)  # the blocks' own form
            out = original(*args, **kwargs)
            if i == last and state.pending is not None:
                self.memo.keep(state.pending, out)
                state.pending = None
            return out

        return forward


@contextlib.contextmanager
def sharing(models: Iterable[torch.nn.Module], budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Iterator[TrunkMemo]:
    """Within the block, gradient-free forwards of ``models`` share one pass over the bottom blocks
    they all hold bitwise (``shared_depth``); yields the memo (its hits and misses). Models are
    deduplicated; with fewer than two, or no shared block, nothing is patched."""
    unique = list({id(m): m for m in models if m is not None}.values())
    memo = TrunkMemo(budget_bytes)
    depth = shared_depth(unique) if _enabled else 0
    log.debug("shared trunk: %d models share their bottom %d blocks", len(unique), depth)
    if depth == 0:
        yield memo
        return
    lists = {}  # one patch per distinct list of block objects
    for model in unique:
        blocks = _blocks(model)
        if blocks is not None:
            lists.setdefault(tuple(map(id, blocks[:depth])), list(blocks[:depth]))
    if len({i for ids in lists for i in ids}) != depth * len(lists):  # a block in two lists: run apart
        yield memo
        return
    patches = []
    try:
        for blocks in lists.values():
            patches.append(_Patch(blocks, memo))
        yield memo
    finally:
        for patch in patches:
            patch.restore()
