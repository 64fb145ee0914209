"""Method chaining: ``method=chain`` (stages in one run) and ``init.from_run`` (a run continuing
another run's policy): starts, anchors, accumulated costs, the metrics.json chain record, bad
input before any training, and a resume after a kill inside a later stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignbench.chain import add_cost, resolve_run_dir
from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.cost import Cost
from alignbench.runner import run_job, validate

# two short stages: Preferred-FT (SFT on chosen responses) then DPO, 4 steps each
PFT = "{name:preferred_ft,max_steps:4,eval_every:2}"
DPO = "{name:dpo,max_steps:4,eval_every:2}"
CHAIN = ["method=chain", f"method.stages=[{PFT},{DPO}]", "eval.n_prompts=8"]
COUNTS = ("tokens_trained", "tokens_generated", "pm_calls", "annotations")


def _run(overrides: list[str]) -> dict:
    return run_job(compose(overrides), [o for o in overrides if o.startswith(("method", "init"))])


def _log(sweep: Path, metrics: dict) -> list[dict]:
    text = (sweep / "runs" / metrics["run_id"] / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_add_cost_continues_every_counter_and_the_clock():
    cost = Cost(tokens_trained=5, pm_calls=2, flops=1.0)
    wall_before = cost.wall_s()
    add_cost(cost, {"wall_s": 100.0, "tokens_trained": 10, "tokens_generated": 7, "pm_calls": 3, "flops": 2.5,
                    "annotations": 4, "measure_s": 20.0})
    assert (cost.tokens_trained, cost.tokens_generated, cost.pm_calls, cost.flops, cost.annotations) == (15, 7, 5, 3.5, 4)
    assert cost.measure_s == 20.0
    assert cost.wall_s() == pytest.approx(wall_before + 100.0, abs=0.5)


def test_from_run_resolves_a_sweep_path_or_a_name_under_the_sweeps_root(tmp_path):
    (tmp_path / "mine").mkdir()
    assert resolve_run_dir(f"{tmp_path}/mine/dpo_s0", "sweeps/x") == tmp_path / "mine" / "runs" / "dpo_s0"
    assert resolve_run_dir("demo/ppo_s0", str(tmp_path / "sweeps" / "x")) == tmp_path / "sweeps" / "demo" / "runs" / "ppo_s0"
    with pytest.raises(ConfigError, match="^init.from_run: expected <sweep>/<run_id>"):
        resolve_run_dir("just_a_run", "sweeps/x")


def test_chain_stages_start_from_the_previous_policy_and_costs_add_up(tiny_overrides, tmp_path):
    chain = _run(tiny_overrides + CHAIN)
    sweep = Path(tiny_overrides[-1].split("=", 1)[1])
    log = _log(sweep, chain)
    second = [p for p in log if p.get("chain_stage") == 1]
    # the second stage's first point is its start, the first stage's policy: KL 0 to it, > 0 to π0
    assert second[0]["label"] == "stage 1 start"
    assert abs(second[0]["kl_k3_start"]) < 1e-5 and second[0]["kl_k3"] > 1e-4
    first_end = [p for p in log if p.get("chain_stage") == 0][-1]
    assert second[0]["judge_reward"] == first_end["judge_reward"]  # the same policy, the same eval samples
    assert [p["step"] for p in log] == [0, 2, 4, 4, 6, 8, -1]  # one step axis over both stages
    assert chain["info"]["stages"][1]["method"] == "dpo" and chain["info"]["stages"][1]["steps"] == 8
    assert [s["method"] for s in chain["chain"]] == ["preferred_ft", "dpo"]
    # the same two stages run alone (DPO from π0: the same steps and data): the chain spent their sum
    alone = [_run(tiny_overrides + [f"paths.sweep_dir={tmp_path}/{n}", "eval.n_prompts=8", f"method={n}",
                                    "method.max_steps=4", "method.eval_every=2"]) for n in ("preferred_ft", "dpo")]
    for key in COUNTS:
        assert chain["cost"][key] == sum(a["cost"][key] for a in alone), key
    assert chain["cost"]["flops"] == pytest.approx(sum(a["cost"]["flops"] for a in alone), rel=1e-9)
    assert chain["cost"]["tokens_trained"] > 0
