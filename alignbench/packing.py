"""Padding-free training forwards: a right-padded batch [B, T] runs as ONE packed row [1, N] of its
N real tokens, with position ids restarting at 0 per sequence and attention kept inside each
sequence, and the outputs come back as the padded [B, T, ...] tensors (zeros at pads) every caller
already reads. Pads cost nothing: at real HH lengths (mean 213 tokens, p90 450) a random batch of
8 spends ~45% of its padded tokens on padding.

How attention stays inside a sequence. transformers plumbs the varlen kwargs of flash-attention
(``cu_seq_lens_q/k``, ``max_length_q/k``) from the model's forward down to the attention function
of every layer. A model on ``flash_attention_2/3`` does varlen natively with them. A model on
``sdpa`` is switched (at its first packed forward) to ``packed_sdpa``, registered here with
``transformers.AttentionInterface``: given the segment
boundaries it runs sdpa once per sequence, causal inside it (cost Σ L_i² per layer, not the N² of
the block-diagonal mask transformers would build itself for packed position ids); without them
(generation, evaluation) it delegates unchanged to sdpa. The matching mask function
(``AttentionMaskInterface``) returns no mask while a packed forward runs (a thread-local flag: the
mask is built once in the model's forward, outside the layers) and otherwise sdpa's mask. A model
on ``eager`` keeps padded forwards (its eager function is per model class, not in the interface
we could delegate to), as do ``flex_attention`` and sliding-window models (see ``prepare``).

Gradient checkpointing re-runs the layers in the backward, outside ``running()``: the attention
function therefore reads the boundaries from its own kwargs (kept by transformers' checkpoint
partial), never from the flag.

``train.packing`` (default true) turns it on for a run (``configure``); ``use(False)`` forces the
old right-padded forwards within a block (equivalence tests, the benchmark's before/after).
Packing changes float rounding only (the padded and packed losses and gradients agree to 1e-5),
so it is not part of the stage cache keys.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

log = logging.getLogger(__name__)

PACKED_SDPA = "packed_sdpa"  # the implementation this module registers; sdpa models switch to it
NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3")  # read cu_seq_lens themselves

_state = threading.local()  # .packed_forward: a packed forward runs in this thread (its mask is None)
_enabled = True  # train.packing, set where a run or stage build starts (configure)
_warned: set[str] = set()


def configure(enabled: bool) -> None:
    """``train.packing``: whether training forwards run packed in this process."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """Packing on or off within the block (``use(False)``: the old right-padded forwards)."""
    global _enabled
    before, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = before


def padded() -> contextlib.AbstractContextManager:
    """The right-padded forwards within the block (``use(False)``)."""
    return use(False)


# --------------------------------------------------------------------------- the packed form
@dataclass
class Packed:
    """A right-padded batch as one row of its real tokens."""
    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], 0 at the start of every sequence
    cu_seqlens: torch.Tensor  # int32 [B+1]: sequence i is packed[cu[i]:cu[i+1]]
    lengths: tuple[int, ...]  # L_i, host side (the per-sequence attention slices on them)
    index: torch.Tensor  # [N]: flat position b·T + t of each packed token in the padded batch
    shape: tuple[int, int]  # (B, T)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def varlen_kwargs(self) -> dict:
        """The flash-attention varlen kwargs transformers passes down to every attention call, plus
        the host-side lengths (``packed_lengths``) that ``packed_attention`` slices on."""
        m = self.max_length
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens, "max_length_q": m,
                "max_length_k": m, "packed_lengths": self.lengths}

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] → [B, T, ...], zeros at the pads; differentiable (index_copy)."""
        b, t = self.shape
        flat = x.new_zeros((b * t, *x.shape[2:]))
        return flat.index_copy(0, self.index, x[0]).view(b, t, *x.shape[2:])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[Packed]:
    """The packed form of a right-padded batch, or None when a row of ``attention_mask`` is not a
    run of ones from position 0 (left padding, holes): packing it would change what it means.
    One host sync (the lengths), which any packed layout needs."""
    b, t = attention_mask.shape
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    right_padded = torch.arange(t, device=mask.device)[None, :] < lengths[:, None]
    bad = (mask != right_padded).any()
    host = torch.cat([lengths, bad[None].long()]).tolist()
    if host[-1]:
        return None
    lens = tuple(host[:-1])
    cu = torch.zeros(b + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lengths.cumsum(0)
    # sequence and position of each packed token, without a second sync (output_size is known)
    rows = torch.repeat_interleave(torch.arange(b, device=mask.device), lengths, output_size=sum(lens))
    positions = torch.arange(len(rows), device=mask.device) - cu[:-1].long()[rows]
    index = rows * t + positions
    return Packed(input_ids=input_ids[rows, positions][None], position_ids=positions[None], cu_seqlens=cu,
                  lengths=lens, index=index, shape=(b, t))


# --------------------------------------------------------------------------- attention
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention per packed sequence when the varlen kwargs say where they are (q/k/v
    [1, heads, N, D] split on the sequence dim; sdpa without a mask is causal and handles grouped
    KV heads itself): Σ L_i² work per layer. Otherwise (no packed_lengths) sdpa, unchanged."""
    lengths = kwargs.pop("packed_lengths", None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask=attention_mask, **kwargs)
    for k in VARLEN_KEYS:
        kwargs.pop(k, None)
    kwargs["is_causal"] = True
    outs = [sdpa_attention_forward(module, q, k, v, attention_mask=None, **kwargs)[0]
            for q, k, v in zip(*(x.split(list(lengths), dim=2) for x in (query, key, value)))]
    return torch.cat(outs, dim=1), None  # [1, N, heads, D], as sdpa returns it


def packed_mask(*args, **kwargs):
    """No mask inside a packed forward (the attention keeps to each sequence); else sdpa's."""
    if getattr(_state, "packed_forward", False):
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_mask)


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("padded forwards (no packing): %s", reason)


def prepare(config) -> bool:
    """Whether a model with this config can run packed, switching its attention to the packed
    implementation the first time. Not packable: a model without a transformers config, an
    attention implementation that ignores the varlen kwargs (eager, flex, custom kernels), sliding-window
    layers (one causal block per sequence would ignore the window); they keep padded forwards."""
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None:
        _warn_once("the model has no transformers attention implementation")
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        _warn_once(f"{type(config).__name__} has sliding-window attention layers")
        return False
    if impl in (PACKED_SDPA, *NATIVE_VARLEN):
        return True
    if impl == "sdpa":
        config._attn_implementation = PACKED_SDPA
        return True
    _warn_once(f"attention implementation {impl!r} does not take packed sequences")
    return False


@contextlib.contextmanager
def running() -> Iterator[None]:
    """Marks a packed model forward in this thread (its mask function returns None)."""
    before = getattr(_state, "packed_forward", False)
    _state.packed_forward = True
    try:
        yield
    finally:
        _state.packed_forward = before


def forward(config, call: Callable[..., torch.Tensor], input_ids: torch.Tensor,
            attention_mask: torch.Tensor) -> torch.Tensor:
    """``call(input_ids=, attention_mask=, **extra)`` returns per-token outputs [b, t, ...]; this
    returns them for the padded batch [B, T, ...], computed packed when packing is on and the model
    (``config``) and the batch (right-padded) allow it, else by the padded forward itself."""
    if _enabled and prepare(config):
        packed = pack(input_ids, attention_mask)
        if packed is not None:
            kw = packed.varlen_kwargs()
            if config._attn_implementation != PACKED_SDPA:  # flash-attention reads cu_seq_lens alone
                kw.pop("packed_lengths")
            with running():
                out = call(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids, **kw)
            return packed.unpack(out)
        _warn_once("a batch that is not right-padded")
    return call(input_ids=input_ids, attention_mask=attention_mask)
