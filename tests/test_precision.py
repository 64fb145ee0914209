"""train.precision=bf16: where it is allowed (a pure detector, a preflight error before any stage is
built), and that a run puts every forward under bf16 autocast, stages and method and evaluation.

The numerics of bf16 against fp32 are in tests/test_bf16_parity.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignbench import precision as prec
from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.precision import check_precision, cpu_flags, has_native_bf16, precision_scope
from alignbench.runner import run_job
from alignbench.cache import read_record

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\nbugs\t\t: none\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_cpu_flags_read_x86_and_aarch64_cpuinfo():
    assert cpu_flags(ZEN3) == {"fpu", "sse", "avx2", "avx512f", "avx512bw"}
    assert "bf16" in cpu_flags(GRAVITON3) and cpu_flags("") == frozenset()


@pytest.mark.parametrize("device_type, machine, text, cuda, native", [
    ("cpu", "x86_64", ZEN3, False, False),  # AVX-512 without its BF16 extension: emulated
    ("cpu", "x86_64", SAPPHIRE, False, True),
    ("cpu", "x86_64", "flags : avx2 amx_bf16\n", False, True),  # AMX alone is enough
    ("cpu", "aarch64", GRAVITON3, False, True),
    ("cpu", "aarch64", "Features\t: fp asimd sve\n", False, False),
    ("cpu", "x86_64", GRAVITON3, False, False),  # an aarch64 flag means nothing on x86
    ("cuda", "x86_64", ZEN3, True, True),  # CUDA: the GPU decides, not the host CPU
    ("cuda", "x86_64", SAPPHIRE, False, False),
    ("mps", "arm64", GRAVITON3, False, False),
])
def test_native_bf16_detector(device_type, machine, text, cuda, native):
    assert has_native_bf16(device_type, machine, cpu_flags(text), cuda) is native


def test_bf16_without_native_support_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    with pytest.raises(ConfigError) as e:
        check_precision("bf16", torch.device("cpu"))
    msg = str(e.value)
    assert msg.startswith("train.precision: ") and "use train.precision=fp32" in msg and "\n" not in msg
    check_precision("fp32", torch.device("cpu"))  # fp32 needs nothing
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)
    check_precision("bf16", torch.device("cpu"))


def test_the_error_comes_before_any_stage_is_built(monkeypatch, tiny_overrides, tmp_path):
    built = []
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    monkeypatch.setattr("alignbench.stages.graph.build_shared_stages", lambda cfg: built.append(cfg))
    over = ["method=context_distilled", "train.precision=bf16", "train.device=cpu"]
    with pytest.raises(ConfigError, match=r"^train\.precision: "):
        run_job(compose(tiny_overrides + over), over)
    assert built == [] and not (tmp_path / "sweep" / "runs").exists()  # no stage, not even a run directory


def test_precision_scope_is_autocast_for_bf16_only():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with precision_scope("bf16", "cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with precision_scope("fp32", "cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


# every stage and the method a step or two: the test is about where forwards run, not what they learn
SHORT = ["data.synth.n_pairs=300", "stages.base.max_steps=2", "stages.pi0.max_steps=2", "stages.pm.max_steps=2",
         "eval.n_prompts=4", "eval.bootstrap=100", "train.report_to=[]", "train.device=cpu"]


@pytest.mark.parametrize("method, extra", [
    ("dpo", ["method.max_steps=1", "method.probe_pairs=4"]),  # policy and reference forwards, backward
    ("ppo", ["method.steps=1", "method.rollout_batch_size=4"]),  # sampling, PM scoring, value head
])
def test_a_bf16_run_puts_every_forward_under_autocast(method, extra, monkeypatch, tiny_overrides, tmp_path):
    """Every F.linear call of the run (stages' training and sampling, the PM's scoring, the method's
    policy, reference and value forwards, final evaluation) sees bf16 autocast on: none escapes."""
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)  # this CPU may lack it: numerics are the same
    linear, seen = torch.nn.functional.linear, []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    over = [f"method={method}", *extra, *SHORT, "train.precision=bf16"]
    metrics = run_job(compose(tiny_overrides + over), over)
    assert metrics["hardware"]["precision"] == "bf16"
    assert len(seen) > 100 and all(seen), f"{seen.count(False)} of {len(seen)} linear calls ran outside autocast"
    record = json.loads(next((tmp_path / "sweep" / "runs").glob("*/metrics.json")).read_text())
    assert record["hardware"] == {"processes": 1, "device": "cpu", "precision": "bf16"}
    cache = Path(next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("paths.cache_dir=")))
    for stage in ("base", "pi0", "pm"):  # trained in bf16, so cached apart from the fp32 stages
        (path,) = cache.rglob(f"*-{record['stages'][stage]}")
        assert read_record(path)["precision"] == "bf16", stage
