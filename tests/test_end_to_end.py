"""One real small end-to-end run per data source, through the same code path as `alignbench run`."""
import json

import pandas as pd
import pytest

from alignbench.cli import compose
from alignbench.runner import run_job
from tests.conftest import shared_data


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_baseline_run_writes_a_complete_run_directory(tiny_overrides, tmp_path):
    metrics = run_job(compose(tiny_overrides + ["method=context_distilled"]), ["method=context_distilled"])
    run = tmp_path / "sweep" / "runs" / "context_distilled_s0"
    assert (run / "DONE").exists() and json.loads((run / "status.json").read_text())["status"] == "done"
    samples = _read_jsonl(run / "samples.jsonl")
    assert len(samples) == 24 and {s["judge"] for s in samples} == {"gold"}
    assert metrics["judge_pm"] is None  # the gold judge is exact: no held-out accuracy to record
    log = _read_jsonl(run / "train_log.jsonl")
    assert [p["label"] for p in log] == ["pi0", "final"]
    # π0 is the policy here, so its KL to itself is zero and both points agree exactly
    assert log[-1]["kl_k1"] == pytest.approx(0, abs=1e-5) and log[-1]["kl_k3"] == pytest.approx(0, abs=1e-5)
    assert log[-1]["proxy_reward"] == pytest.approx(log[0]["proxy_reward"], abs=1e-5)
    rows = pd.read_csv(run / "results.csv")
    pm = rows[rows.evaluator == "pm_accuracy"]
    assert {"accuracy_by_turn", "ece", "gold_accuracy", "label_gold_agreement"} <= set(pm.metric)
    with_ci = pm.dropna(subset=["ci_low"])
    assert len(with_ci) > 10 and (with_ci.ci_low <= with_ci.value).all() and (with_ci.value <= with_ci.ci_high).all()
    index = json.loads((tmp_path / "sweep" / "index.json").read_text())
    assert index["runs"][0]["status"] == "done" and metrics["cost"]["tokens_trained"] == 0
    # the configuration (run id without its seed) is in every output the report groups by
    assert metrics["config"] == index["runs"][0]["config"] == "context_distilled"
    assert {s["config"] for s in samples} == {"context_distilled"}
    assert set(rows[rows.run == "context_distilled_s0"].config) == {"context_distilled"}
    # a re-run of a complete job is skipped, results untouched
    before = (run / "results.csv").read_text()
    run_job(compose(tiny_overrides + ["method=context_distilled"]), ["method=context_distilled"])
    assert (run / "results.csv").read_text() == before


def test_same_seed_same_metrics(tiny_overrides, tmp_path):
    a = run_job(compose(tiny_overrides + ["method=context_distilled", f"paths.sweep_dir={tmp_path}/a"]), [])
    b = run_job(compose(tiny_overrides + ["method=context_distilled", f"paths.sweep_dir={tmp_path}/b"]), [])
    assert a["final"]["proxy_reward"] == b["final"]["proxy_reward"]
    assert a["final"]["judge_reward"] == b["final"]["judge_reward"]


@pytest.mark.slow
def test_tiny_pm_on_real_hh_reports_accuracy_by_subset_and_turn(tmp_path):
    path = shared_data("hh-rlhf")
    overrides = ["data=hh_rlhf", f"data.path={path}", "data.max_pairs=1600", "model.vocab_size=1024",
                 "model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128",
                 "stages.base.epochs=1", "stages.pi0.mode=none", "stages.pm.lr=1e-3", "eval.n_prompts=8",
                 "train.max_new_tokens=8", f"paths.cache_dir={tmp_path}/cache", f"paths.sweep_dir={tmp_path}/sweep",
                 "method=context_distilled"]
    run_job(compose(overrides), [])
    rows = pd.read_csv(tmp_path / "sweep" / "runs" / "context_distilled_s0" / "results.csv")
    by_turn = rows[(rows.evaluator == "pm_accuracy") & (rows.metric == "accuracy_by_turn")]
    subsets = {s.split("|")[0] for s in by_turn["slice"]}
    assert {"harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled", "all"} <= subsets
    assert {"1", "2", "3", "4+"} <= {s.split("|")[1] for s in by_turn["slice"]}
    assert (by_turn.ci_high > by_turn.ci_low).all()
    samples = _read_jsonl(tmp_path / "sweep" / "runs" / "context_distilled_s0" / "samples.jsonl")
    assert {s["judge"] for s in samples} == {"test_pm"}  # judged by the held-out half's PM
    metrics = json.loads((tmp_path / "sweep" / "runs" / "context_distilled_s0" / "metrics.json").read_text())
    judge_pm = metrics["judge_pm"]
    assert 0 <= judge_pm["heldout_accuracy"] <= 1 and judge_pm["heldout_pairs"] > 0  # the report's Findings read it
