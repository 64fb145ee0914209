"""train.precision=bf16: where it is supported, and the one scope every forward runs in.

bf16 mixed precision is torch.autocast(dtype=bfloat16) (``alignbench.train.autocast``): matmuls in
bf16, weights and optimizer state fp32, on CPU as on CUDA. A device without native bf16 would
emulate it (a CPU without bf16 instructions converts every operand: slower than fp32, with bf16's
rounding), so a run asks for it only where the hardware has it, and is told before anything trains.
"""
from __future__ import annotations

import contextlib
import platform
from typing import Iterator

import torch

from alignbench.config import ConfigError
from alignbench.train import autocast

# CPU feature flags (/proc/cpuinfo "flags" on x86, "Features" on aarch64) that mean bf16 matmuls
# run natively: AVX512-BF16 or AMX-BF16 on x86, the Armv8.6 BF16 extension on aarch64
BF16_FLAGS = {"x86_64": {"avx512_bf16", "amx_bf16"}, "aarch64": {"bf16"}, "arm64": {"bf16"}}


def has_native_bf16(device_type: str, machine: str, cpu_flags: frozenset[str] | set[str], cuda_bf16: bool) -> bool:
    """Whether ``device_type`` runs bf16 natively: on CUDA, torch.cuda.is_bf16_supported()
    (``cuda_bf16``); on CPU, bf16 ∈ the flags for ``machine`` (``BF16_FLAGS``) ∩ ``cpu_flags`` ≠ ∅."""
    if device_type == "cuda":
        return cuda_bf16
    if device_type == "cpu":
        return bool(BF16_FLAGS.get(machine.lower(), set()) & set(cpu_flags))
    return False


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo's text (x86 ``flags``, aarch64 ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux: no flags known, so no native bf16 is assumed
        return ""


def native_bf16(device: torch.device) -> bool:
    """``has_native_bf16`` for this machine's ``device`` (the detector the preflight asks)."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return has_native_bf16(device.type, platform.machine(), cpu_flags(_read_cpuinfo()), cuda)


def check_precision(precision: str, device: torch.device) -> None:
    """Preflight: train.precision=bf16 only on a device with native bf16, else a ConfigError."""
    device = torch.device(device)
    if precision == "bf16" and not native_bf16(device):
        what = ("this CPU has no native bf16 (x86: avx512_bf16 or amx_bf16; aarch64: bf16)" if device.type == "cpu"
                else f"{device} does not support bf16")
        raise ConfigError(f"train.precision: bf16 needs native bf16 on the run's device and {what}; "
                          "use train.precision=fp32")


@contextlib.contextmanager
def precision_scope(precision: str, device) -> Iterator[None]:
    """Everything inside runs under the run's precision: every forward (training, reference,
    value, PM scoring, sampling, evaluation; an LM head or PM head applied outside the model's own
    forward too) and so every backward, which autograd runs in the forward's dtypes. A no-op for
    fp32 (bitwise the fp32 results)."""
    if precision != "bf16":
        yield
        return
    with autocast(precision, device):
        yield
