"""Experiment tracking (train.report_to, alignbench.tracking): TensorBoard event files read back."""
import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.runner import run_job
from alignbench.stages.graph import build_shared_stages

DPO = ["method=dpo", "method.max_steps=6", "method.eval_every=3", "method.probe_pairs=16", "eval.n_prompts=12"]


def scalars(log_dir, tag) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_report_to_names_are_checked_before_training(tiny_overrides):
    with pytest.raises(ConfigError, match=r"^train\.report_to: unknown tracker 'neptune'"):
        to_config(compose(tiny_overrides + ["train.report_to=[tensorboard,neptune]"]))
    missing = next((n for n in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(n) is None), None)
    if missing:
        with pytest.raises(ConfigError, match=rf"^train\.report_to: {missing} is not installed"):
            to_config(compose(tiny_overrides + [f"train.report_to=[{missing}]"]))
    assert to_config(compose(tiny_overrides)).train.report_to == ["tensorboard"]
    assert to_config(compose(tiny_overrides + ["train.report_to=[]"])).train.report_to == []


def test_event_files_hold_every_step_and_log_point_and_change_no_metric(tiny_overrides, tmp_path):
    metrics = run_job(compose(tiny_overrides + DPO), ["method=dpo"])
    run = tmp_path / "sweep" / "runs" / "dpo_s0"
    tb = run / "tb"
    loss, lr = scalars(tb, "train/loss"), scalars(tb, "train/lr")
    assert [s for s, _ in loss] == [s for s, _ in lr] == list(range(1, 7))  # one value per optimiser step
    assert all(0 < v < 5 for _, v in loss) and all(v > 0 for _, v in lr)
    assert len(scalars(tb, "train/reward_accuracy")) == 6
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [p["label"] for p in log] == ["pi0", "train", "train", "final"]
    # every log point, at its step (the final one at the last step), float32 in the event file
    for key, tag in [("proxy_reward", "eval/proxy_reward"), ("judge_reward", "eval/judge_reward"),
                     ("kl_k3", "eval/kl_k3"), ("tokens_trained", "cost/tokens_trained"), ("flops", "cost/flops")]:
        got = scalars(tb, tag)
        assert [s for s, _ in got] == [0, 3, 6, 6], tag
        assert [v for _, v in got] == pytest.approx([p[key] for p in log], rel=1e-6, abs=1e-6), tag
    # the shared stages log their loops too, one value per step
    stages = build_shared_stages(to_config(compose(tiny_overrides + DPO)))
    pm_loss = scalars(stages.pm.path / "tb", "train/loss")
    assert len(pm_loss) == stages.pm.record["metrics"]["train"]["steps"]
    assert pm_loss[0][1] == pytest.approx(stages.pm.record["metrics"]["train"]["first_loss"], rel=1e-6)

    # tracking only reads: the same run untracked has the same metrics, and writes no event files
    untracked = run_job(compose(tiny_overrides + DPO + [f"paths.sweep_dir={tmp_path / 'b'}", "train.report_to=[]"]),
                        ["method=dpo"])
    timing = ("wall_s", "measure_s")
    assert {k: v for k, v in untracked["final"].items() if k not in timing} == \
        {k: v for k, v in metrics["final"].items() if k not in timing}
    assert not (tmp_path / "b" / "runs" / "dpo_s0" / "tb").exists()
