"""Where the time goes: a run's wall-time breakdown (metrics.json → time, alignbench.walltime) adds
up and puts known seconds in the right phase, shared stages show their build seconds and whether
they were cached, and the report's section renders (escaped) and tolerates runs from before it."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest

from alignbench.cli import compose
from alignbench.config import to_config
from alignbench.context import RunContext
from alignbench.cost import Cost
from alignbench.eval.stats import read_rows
from alignbench.methods import get_method
from alignbench.report.build import build_report
from alignbench.runner import run_job
from alignbench.stages.graph import build_shared_stages

FAST = ["train.num_threads=1"]
TRAIN_SLEEP, MEASURE_SLEEP = 1.0, 0.5
PM_OVERRIDE = "stages.pm.lr=1.9e-3"  # a PM of its own, so this test builds one stage and reuses the others


def test_cost_counts_this_attempts_measurement_apart_from_a_restored_one():
    cost = Cost()
    with cost.measuring():
        time.sleep(0.05)
    cost.restore({"tokens_trained": 0, "tokens_generated": 0, "pm_calls": 0, "wall_s": 5.0, "measure_s": 7.0})
    assert cost.measure_s == pytest.approx(7.0) and 0.05 <= cost.measured_here_s < 0.5
    with cost.measuring(), cost.charging():  # charged serving inside a measurement is not measurement
        time.sleep(0.05)
    assert cost.measured_here_s < 0.5


def test_breakdown_adds_up_and_puts_known_seconds_in_their_phase(tiny_overrides, monkeypatch, caplog):
    """Training sleeps 1 s and every measurement 0.5 s: train_s is 1 s plus the real training (none:
    context_distilled trains nothing), measurement during training is π0's point (0.5 s + its
    work), the final evaluation holds the final point; the phases add up to the total, which the
    test's own clock brackets; the Cost's independent clock agrees on the method's seconds."""
    build_shared_stages(to_config(compose(tiny_overrides)))  # base LM and π0 cached before the run
    method = get_method("context_distilled")
    train, measure = method.train, RunContext.measure

    def slow_train(self, ctx):
        time.sleep(TRAIN_SLEEP)
        return train(self, ctx)

    def slow_measure(self, *args, **kwargs):
        time.sleep(MEASURE_SLEEP)
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(method, "train", slow_train)
    monkeypatch.setattr(RunContext, "measure", slow_measure)
    extra = FAST + [PM_OVERRIDE, "method=context_distilled"]
    caplog.set_level(logging.INFO, logger="alignbench.runner")
    t0 = time.time()
    metrics = run_job(compose(tiny_overrides + extra), extra)
    elapsed = time.time() - t0
    sweep = Path(next(o for o in tiny_overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1])
    t = json.loads((sweep / "runs" / metrics["run_id"] / "metrics.json").read_text())["time"]
    assert t == metrics["time"]

    phases = t["stages_s"] + t["setup_s"] + t["train_s"] + t["measure_s"] + t["eval_s"]
    assert phases == pytest.approx(t["total_s"], abs=0.01)
    assert elapsed - 2.0 <= t["total_s"] <= elapsed  # only validation and the index are outside
    assert TRAIN_SLEEP <= t["train_s"] < TRAIN_SLEEP + 1.0  # no measurement in it (2 loaded cores: a margin)
    assert MEASURE_SLEEP <= t["measure_s"] < MEASURE_SLEEP + 5  # π0's point: one measure
    assert MEASURE_SLEEP <= t["eval_s"]  # the final point's measure, samples, PM rows, files
    assert metrics["cost"]["wall_s"] == pytest.approx(t["train_s"], abs=0.5)  # Cost's own clock
    assert min(v for k, v in t.items() if k.endswith("_s")) >= 0

    stages = t["stages"]
    assert {k: s["reused"] for k, s in stages.items()} == {"base": True, "pi0": True, "pm": False}
    assert 0 < stages["pm"]["build_s"] <= t["stages_s"]  # this run built the PM, inside its stage time
    assert stages["base"]["build_s"] > 0 and stages["base"]["built_at"]  # cached: when and how long it took
    line = next(r.getMessage() for r in caplog.records if " time: total " in r.getMessage())
    assert re.fullmatch(rf"run {re.escape(metrics['run_id'])} time: total [\d.]+s = stages [\d.]+s \(built pm "
                        r"[\d.]+s\) \+ setup [\d.]+s \+ train [\d.]+s \+ measurement [\d.]+s \+ evaluation [\d.]+s",
                        line), line

    monkeypatch.undo()  # a second seed at normal speed: every stage cached now
    extra2 = FAST + [PM_OVERRIDE, "method=context_distilled", "seed=1"]
    second_metrics = run_job(compose(tiny_overrides + extra2), extra2)
    second = second_metrics["time"]
    assert all(s["reused"] for s in second["stages"].values())
    assert second["stages"]["pm"]["build_s"] == stages["pm"]["build_s"]  # the build it reused

    out = sweep.parent / "report"
    md = build_report(sweep, out, n_boot=50).read_text()
    assert re.search(rf"\| pm \| {second['stages']['pm']['key']} \| built in this sweep \| "
                     rf"{stages['pm']['build_s']:,.1f} \| {stages['pm']['build_s']:,.1f} \|", md)
    assert re.search(r"\| base \| \w+ \| cached \(built [\d\-T:]+\) \| [\d,.]+ \| 0\.0 \| 0\.0% \| 2 \|", md)
    section = md[md.index("## Where the time goes"):]
    run_row = next(line for line in section.splitlines() if line.startswith(f"| {metrics['run_id']} |"))
    cells = [c.strip() for c in run_row.strip("|").split("|")]
    assert cells[3:6] == [f"{t['train_s']:,.1f}", f"{t['measure_s']:,.1f}", f"{t['eval_s']:,.1f}"]
    rows = read_rows(out / "results.csv")
    wall = rows[(rows["evaluator"] == "wall_time") & (rows["run"] == metrics["run_id"])].set_index("metric")["value"]
    assert wall["train_s"] == t["train_s"] and wall["total_s"] == pytest.approx(t["total_s"] - stages["pm"]["build_s"])
    assert (out / "wall_time.png").exists() and "](wall_time.png)" in md
    config_row = next(line for line in section.splitlines() if line.startswith(f"| {metrics['config']} | 2 |"))
    train_sum = t["train_s"] + second["train_s"]
    assert f"| {train_sum:,.1f} |" in config_row  # a configuration's seeds summed


# --------------------------------------------------------------------------- the report on written runs
XSS = "<script>alert(1)</script>|[x](http://evil)"


def _stage(key, reused, build_s):
    return {"key": key, "reused": reused, "build_s": build_s, "built_at": "2026-01-02T03:04:05"}


def _write_run(sweep: Path, run_id: str, method: str, seed: int, time_record: dict | None):
    run = sweep / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    metrics = {"method": method, "seed": seed, "run_id": run_id, "final": {},
               "cost": {"wall_s": 1.0, "measure_s": 1.0, "tokens_trained": 0, "tokens_generated": 0, "pm_calls": 0}}
    if time_record is not None:
        metrics["time"] = time_record
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "DONE").write_text("")


def _fake_sweep(tmp_path) -> Path:
    """Run a built base (10 s) and a PM (20 s) and reused a cached π0 (built in 99 s, before); run b
    reused all three; run "old" is from before the breakdown."""
    sweep = tmp_path / "fake"
    a = {"stages_s": 31.0, "setup_s": 2.0, "train_s": 40.0, "measure_s": 5.0, "eval_s": 12.0, "total_s": 90.0,
         "stages": {"base": _stage("k1", False, 10.0), "pi0": _stage("k2", True, 99.0), XSS: _stage("k3", False, 20.0)}}
    b = {"stages_s": 1.0, "setup_s": 1.0, "train_s": 6.0, "measure_s": 3.0, "eval_s": 9.0, "total_s": 20.0,
         "stages": {"base": _stage("k1", True, 10.0), "pi0": _stage("k2", True, 99.0), XSS: _stage("k3", True, 20.0)}}
    runs = [("dpo_s0", "dpo", 0, a), (XSS, "ppo", 0, b), ("old_s0", "rrhf", 0, None)]
    for run_id, method, seed, rec in runs:
        _write_run(sweep, run_id.replace("/", "_"), method, seed, rec)
    (sweep / "index.json").write_text(json.dumps({"sweep": "fake", "runs": [
        dict(run_id=r, method=m, seed=s, status="done", dir=f"runs/{r.replace('/', '_')}") for r, m, s, _ in runs]}))
    return sweep


def test_report_section_numbers_shares_and_escaping(tmp_path):
    out = tmp_path / "out"
    md = build_report(_fake_sweep(tmp_path), out, n_boot=50).read_text()
    # sweep: stages built here 10 + 20 = 30, runs 90 − 30 (its own builds) = 60 and 20: 110 s
    assert re.search(r"\| base \| k1 \| built in this sweep \| 10\.0 \| 10\.0 \| "
                                                       r"9\.1% \| 2 \|", md)
    assert "| pi0 | k2 | cached (built 2026-01-02T03:04:05) | 99.0 | 0.0 | 0.0% | 2 |" in md
    # run a: setup 2 + stage time 31 − own builds 30 = 3; total 60 (54.5% of 110); measured 17 of 60
    assert "| dpo_s0 | dpo | 3.0 | 40.0 | 5.0 | 12.0 | 60.0 | 54.5% | 28.3% |" in md
    assert "| all runs |  | 5.0 | 46.0 | 8.0 | 21.0 | 80.0 | 72.7% | 36.2% |" in md
    assert "| sweep (stages + runs) |  |  |  |  |  | 110.0 | 100.0% |  |" in md
    assert "1 usable run(s) record no wall-time breakdown (from before it) and are left out of this section: " \
        "old_s0" in md
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;\\|\\[x\\](http://evil)" in md
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;|[x](http://evil)" in page
    assert '<h2 id="where-the-time-goes">Where the time goes</h2>' in page and "wall_time.png" not in page  # embedded
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png"))) >= 1  # every figure embedded
    rows = read_rows(out / "results.csv")
    stage_rows = rows[(rows["evaluator"] == "wall_time") & (rows["metric"] == "build_s")].set_index("method")
    assert stage_rows.loc["pi0", "slice"] == "cached" and stage_rows.loc["base", "slice"] == "built"
    assert stage_rows.loc["base", "run"] == "base-k1"


def test_runs_from_before_the_breakdown_still_report(tmp_path):
    sweep = tmp_path / "old"
    _write_run(sweep, "dpo_s0", "dpo", 0, None)
    (sweep / "index.json").write_text(json.dumps({"runs": [dict(run_id="dpo_s0", method="dpo", seed=0,
                                                                 status="done", dir="runs/dpo_s0")]}))
    md = build_report(sweep, tmp_path / "out", n_boot=50).read_text()
    assert "## Where the time goes" in md and "no usable run records its wall-time breakdown" in md
    assert "Seconds per shared stage build and per run phase: skipped" in md
    assert not (tmp_path / "out" / "wall_time.png").exists()
    assert "wall_time" not in set(read_rows(tmp_path / "out" / "results.csv")["evaluator"])


def test_a_damaged_time_record_shows_dashes_not_an_error(tmp_path):
    sweep = tmp_path / "damaged"
    _write_run(sweep, "dpo_s0", "dpo", 0, {"train_s": "fast", "measure_s": 2.0, "eval_s": None, "total_s": 9.0,
                                          "stages": {"pm": "gone", "base": {"key": [1], "build_s": "long"}}})
    (sweep / "index.json").write_text(json.dumps({"runs": [dict(run_id="dpo_s0", method="dpo", seed=0,
                                                                 status="done", dir="runs/dpo_s0")]}))
    md = build_report(sweep, tmp_path / "out", n_boot=50).read_text()
    assert "| dpo_s0 | dpo | – | – | 2.0 | – | 9.0 | 100.0% | – |" in md
    assert "| base | \\[1\\] | cached (built earlier) | – | 0.0 | 0.0% | 1 |" in md
