"""Multi-process training through accelerate (2 CPU processes, gloo) and bf16 autocast.

Tolerance of the 2-process check: DDP averages the two half-batch gradients, which equals the
single-process gradient of the whole batch up to float summation order, so the weights may differ
by rounding (measured 8.7e-7 after 12 DPO steps, against 6.8e-4 moved by training). The test
allows 1e-5 on every weight (and under 1% of the distance trained), on KL and on DPO's probe loss;
the sampled responses, and so the rewards, must be identical.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.distributed import autocast_forward
from alignbench.runner import validate
from alignbench.train import lm_loss, supervised_loop
from tests.conftest import TINY

TOL = 1e-5
DPO = ["method=dpo", "method.max_steps=12", "method.eval_every=4"]


def _run(tmp_path: Path, name: str, cache: Path, extra=(), procs: int = 1, method=tuple(DPO)) -> Path:
    """One run of ``method`` on ``procs`` processes; its run directory."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    multirun = ["-m"] if any(o.startswith("hydra/launcher=") for o in extra) else []
    out = subprocess.run(launch + ["-m", "alignbench.cli", "run", *multirun, *method, "train.num_threads=1", "train.device=cpu",
                             *TINY, *extra, f"paths.cache_dir={cache}",
                             f"paths.sweep_dir={tmp_path / name}"], capture_output=True, text=True, cwd=tmp_path)
    (tmp_path / f"{name}.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"{name} ({procs} processes) failed:\n{(out.stdout + out.stderr)[-4000:]}"
    runs = list((tmp_path / name / "runs").glob("*/DONE"))
    assert len(runs) == 1
    return runs[0].parent


def _read(run: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    return metrics, samples, load_file(run / "policy" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(stage_cache, tmp_path):
    one, one_samples, one_w = _read(_run(tmp_path, "one", stage_cache))
    two, two_samples, two_w = _read(_run(tmp_path, "two", stage_cache, procs=2))
    assert one["hardware"]["processes"] == 1 and two["hardware"]["processes"] == 2
    # the global batch is the same: the same tokens were trained on, over the two processes
    assert two["cost"]["tokens_trained"] == one["cost"]["tokens_trained"] > 0
    assert _max_diff(one_w, two_w) < TOL
    for key in ("kl_k1", "kl_k3"):
        assert abs(one["final"][key] - two["final"][key]) < TOL, key
    assert abs(one["info"]["final_probe_loss"] - two["info"]["final_probe_loss"]) < TOL
    assert [s["response"] for s in one_samples] == [s["response"] for s in two_samples]
    assert one["final"]["judge_reward"] == two["final"]["judge_reward"]
    run_two = tmp_path / "two" / "runs" / two["run_id"]
    assert [json.loads(line)["step"] for line in (run_two / "train_log.jsonl").read_text().splitlines()] \
        == [0, 4, 8, 12, -1]  # written once, by the main process

    # a submitit job with 2 tasks (SLURM's tasks_per_node, run here by the local executor) joins its
    # tasks into the same 2-process run
    sub, _, sub_w = _read(_run(tmp_path, "submitit", stage_cache, extra=[
        "hydra/launcher=submitit_local_run", "hydra.launcher.tasks_per_node=2"]))
    assert sub["hardware"]["processes"] == 2 and _max_diff(sub_w, two_w) == 0

    # the tolerance is meaningful: the policy moved well beyond it, and halving the global batch
    # (what a launcher that did not shard would amount to) misses it by far
    pi0 = load_file(stage_cache / "stages" / f"pi0-{one['stages']['pi0']}" / "model.safetensors")
    moved = _max_diff(one_w, pi0)
    half, _, half_w = _read(_run(tmp_path, "half", stage_cache, extra=["train.batch_size=8"]))
    print(f"moved {moved:.2e}, 2 processes vs 1 {_max_diff(one_w, two_w):.2e}, half batch {_max_diff(one_w, half_w):.2e}")
    assert moved > 30 * TOL and _max_diff(one_w, two_w) < 0.01 * moved
    assert _max_diff(one_w, half_w) > 0.1 * moved


def test_settings_without_a_multiprocess_form_are_refused_before_training(tiny_overrides, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for method, match in ((["method=context_distilled"], r"method=context_distilled: multi-process training is not"),
                          (["method=rejection_sampling"], r"method.mode: best_of_n trains nothing"),
                          (["method=ppo", "method.ptx_coef=0.1"], r"method.ptx_coef: PPO-ptx runs as one process")):
        with pytest.raises(ConfigError, match=match):
            validate(compose(tiny_overrides + method))
    for ok in (["method=dpo"], ["method=ppo"], ["method=rrhf"], ["method=rejection_sampling", "method.mode=finetune"]):
        validate(compose(tiny_overrides + ok))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train.batch_size: the global batch \(16\) must divide evenly over the 3"):
        validate(compose(tiny_overrides + ["method=dpo"]))
    with pytest.raises(ConfigError, match=r"method.batch_size"):
        validate(compose(tiny_overrides + ["method=dpo", "method.batch_size=4"]))
    with pytest.raises(ConfigError, match=r"method.prompts_per_step: the global batch \(8\)"):
        validate(compose(tiny_overrides + ["method=rrhf"]))


# method overrides, and the PM calls the whole run makes (the same on any number of processes)
SAMPLING_METHODS = {
    "ppo": (["method=ppo", "method.steps=6", "method.rollout_batch_size=32", "method.kl_target=2",
             "train.checkpoint_every=4"], 6 * 32),
    "rrhf": (["method=rrhf", "method.steps=6", "method.prompts_per_step=4"], 6 * 4 * 6),
    "rs_finetune": (["method=rejection_sampling", "method.mode=finetune", "method.prompts_per_round=32"], 2 * 32 * 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SAMPLING_METHODS))
def test_sampling_methods_train_on_two_processes(case, stage_cache, tmp_path):
    """PPO, RRHF and RS fine-tuning on 2 CPU processes: each samples its share of the prompts, so the
    run is not bitwise the 1-process one, but it trains (the policy leaves π0), the costs are the
    whole run's (PM calls summed over both processes), and a PPO run resumed on 2 processes from
    its checkpoint ends exactly where the uninterrupted one did."""
    overrides, pm_calls = SAMPLING_METHODS[case]
    run = _run(tmp_path, "two", stage_cache, method=overrides, procs=2)
    metrics, samples, _ = _read(run)
    assert metrics["hardware"]["processes"] == 2 and len(samples) == 24
    assert metrics["cost"]["pm_calls"] == pm_calls and metrics["cost"]["tokens_trained"] > 0
    # it trained: π = π0 gives exactly 0 (equal log-probs); RRHF's 6 short steps moved it by 0.04-0.1
    assert metrics["final"]["kl_k3"] > 0.01
    if case == "ppo":  # resume on 2 processes: drop the run's completion, keep its step-4 checkpoint
        assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 3
        (run / "DONE").unlink()
        resumed, resumed_samples, _ = _read(_run(tmp_path, "two", stage_cache, method=overrides, procs=2))
        assert "resuming from checkpoint" in (tmp_path / "two.log").read_text()
        clocks = {k: resumed["final"][k] for k in ("wall_s", "measure_s")}  # seconds differ; all else is equal
        assert resumed["final"] == {**metrics["final"], **clocks}
        assert resumed_samples == samples


@pytest.mark.slow
def test_a_budget_stops_both_processes_at_the_same_point(stage_cache, tmp_path):
    """The budget check is a collective (costs merged over the processes, the main one decides):
    with rollouts of 32 (16 a process) and budget.pm_calls=48, the second rollout's scoring goes
    over, and both processes stop before any update on it, as one process does."""
    method = ["method=ppo", "method.steps=6", "method.rollout_batch_size=32", "method.eval_every=6",
              "budget.pm_calls=48"]
    one, _, _ = _read(_run(tmp_path, "one", stage_cache, method=method))  # (also builds the stages)
    two, samples, _ = _read(_run(tmp_path, "two", stage_cache, method=method, procs=2))
    for metrics in (one, two):
        assert metrics["info"]["stopped"] == "budget.pm_calls=48 reached" and metrics["info"]["steps_done"] == 1
        assert metrics["cost"]["pm_calls"] == 64 and metrics["info"]["partial_step_updates"] == 0
    assert two["cost"]["tokens_trained"] > 0 and two["cost"]["flops"] > 0 and len(samples) == 24


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def test_bf16_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    ids = torch.randint(0, 64, (4, 16))
    fp32 = _tiny_model()
    bf16 = autocast_forward(_tiny_model(), "bf16", torch.device("cpu"))
    assert autocast_forward(fp32, "fp32", torch.device("cpu")) is fp32
    assert fp32(input_ids=ids).logits.dtype == torch.float32
    out = bf16(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in bf16.parameters())
    # same weights, close but not equal outputs: bf16 has an 8-bit mantissa
    diff = (out.float() - fp32(input_ids=ids).logits).abs().max().item()
    assert 0 < diff < 0.1


def test_bf16_supervised_loop_learns_like_fp32():
    batches = [list(range(8))] * 30
    data = torch.randint(0, 64, (8, 16))

    def make(idx):
        return {"input_ids": data[idx], "attention_mask": torch.ones_like(data[idx]),
                "response_mask": torch.ones_like(data[idx], dtype=torch.bool)}

    res = {p: supervised_loop(_tiny_model(), batches, make, lm_loss, 3e-3, p, precision=p) for p in ("fp32", "bf16")}
    for r in res.values():
        assert r.losses[-1] < 0.8 * r.losses[0]  # both memorise the batch
    assert res["bf16"].losses != res["fp32"].losses  # autocast really changed the numerics
    assert abs(res["bf16"].losses[-1] - res["fp32"].losses[-1]) < 0.1 * res["fp32"].losses[0]


def test_a_stage_built_on_rank_1_saves_its_model(monkeypatch, tmp_path):
    """transformers 5 skips save_pretrained on a rank ≠ 0 once torch.distributed is initialised; a
    shared stage is built by whichever process takes its lock, so the stages save regardless of rank
    (a 2-process run once got a base stage with a record and no model)."""
    import transformers.distributed.mixin as mixin
    from alignbench.config import ModelConfig
    from alignbench.lora import save_pretrained_here
    from alignbench.models import load_lm, tiny_lm, train_tokenizer

    tok = train_tokenizer(["Human: hi\n\nAssistant: hello there"] * 4, 300)
    model = tiny_lm(ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_seq_len=32), tok, 0)
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    assert not (tmp_path / "plain" / "config.json").exists()  # what rank 1 got before
    save_pretrained_here(model, tmp_path / "here")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "here").iterdir()}
    assert not hasattr(model, "should_save_on_this_rank") or "should_save_on_this_rank" not in vars(model)
    reloaded = load_lm(tmp_path / "here")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
