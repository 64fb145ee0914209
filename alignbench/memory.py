"""Process-level memory settings for CPU training.

glibc's malloc serves large blocks with mmap (returned to the OS on free) only above a threshold
that it raises, dynamically, each time such a block is freed; training frees and re-allocates
activation-sized blocks every step, so the threshold soon exceeds them, they come from the heap,
and the heap fragments: resident memory grows far beyond what is live. Measured with
`alignbench bench pm` (8-layer tiny Llama, 8 real HH pairs of 512 tokens): LoRA peaked at 4.9 GB
with the dynamic threshold and 1.6 GB with a fixed one (full fine-tuning: 2.2 GB and 1.7 GB).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB and more: mmap'd, so freed memory goes back to the OS


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (which also stops its dynamic growth), unless the user
    set MALLOC_MMAP_THRESHOLD_ themselves. No-op off Linux/glibc. Returns whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


def maybe_fix_mmap_threshold(pretrained: bool) -> bool:
    """``fix_mmap_threshold`` for runs of a pretrained checkpoint (model.kind hf/gguf, ``bench
    --model``) only. Their activation blocks fragment the heap (SmolLM2 LoRA PM step, 8 pairs × 512
    tokens: 6.06 GB → 1.71 GB peak RSS) at ~1.6× the step time on CPU; the tiny model's blocks are
    small, so it keeps glibc's faster default (the demo). Returns whether it was set."""
    return fix_mmap_threshold() if pretrained else False
