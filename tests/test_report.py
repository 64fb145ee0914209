"""The report on a fake sweep written by the test: marks bad runs, gets the numbers right, escapes."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from alignbench.data.types import DataError
from alignbench.eval import pm_accuracy
from alignbench.eval.stats import make_row, proportion_row, read_rows, write_rows
from alignbench.report.aggregate import aggregate_seeds
from alignbench.report.build import build_report

PROMPTS = ["<b>Hi</b> & hello", "How do I bake bread?", "Tell me a joke", "What is 2+2?"]
JUDGE = {"context_distilled": [0.0, 0.0, 0.0, 0.0], "dpo": [1.0, 1.0, 1.0, -1.0]}  # dpo wins 3 of 4
NLP = {("context_distilled", 0): 0.50, ("context_distilled", 1): 0.50, ("dpo", 0): 0.44, ("dpo", 1): 0.46}
XSS = "<script>alert(1)</script> & done"


def pm_rows():
    """The shared PM's rows, identical in every run (the report must keep one copy)."""
    rng = np.random.default_rng(0)
    sc, sr = rng.normal(1, 1, 200), rng.normal(0, 1, 200)
    ident = dict(sweep="fake", run="pm-abc", method="pm")
    rows = pm_accuracy.accuracy_by_turn(sc, sr, rng.integers(1, 6, 200), ["helpful-base"] * 200, **ident)
    rows += pm_accuracy.calibration(sc, sr, n_bins=4, **ident)[0]
    return rows + pm_accuracy.threshold_accuracy(sc, sr, [-1, 0, 1], **ident)


def write_run(sweep, run_id, method, seed, status="done", error=None, done=True, judge_shift=0.0):
    run = sweep / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": status, "error": error}))
    samples = [dict(prompt_id=i, prompt=p, response=XSS if (method, i) == ("dpo", 0) else f"{method} answer {i}",
                    proxy_reward=0.0, judge_reward=JUDGE[method][i] + judge_shift, judge="gold")
               for i, p in enumerate(PROMPTS)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    d = np.linspace(0, 2, 12) if method == "dpo" else np.zeros(1)
    log_d = np.log(np.where(d > 0, d, 1))
    points = [dict(method=method, seed=seed, step=i, label="train", kl_k1=x * x, kl_k3=x * x,
                   proxy_reward=0.5 + x * (2.0 - 0.5 * l), judge_reward=0.5 + x * (1.0 - 0.3 * x), judge="gold",
                   wall_s=i, tokens_trained=0, tokens_generated=100 * i, pm_calls=i)
              for i, (x, l) in enumerate(zip(d.tolist(), log_d.tolist()))]
    (run / "train_log.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (run / "metrics.json").write_text(json.dumps({"method": method, "seed": seed, "run_id": run_id, "final": {},
                                                  "cost": {"wall_s": 10.0 + seed, "tokens_trained": 0,
                                                           "tokens_generated": 1000 * (seed + 1), "pm_calls": 5}}))
    acc = NLP.get((method, seed), 0.0)
    ident = dict(sweep="fake", run=run_id, method=method, seed=seed, evaluator="nlp_tasks", slice="arc_easy")
    rows = pm_rows() + [proportion_row(acc * 1000, 1000, metric="acc", **ident),
                        proportion_row(acc * 900, 1000, metric="acc_norm", **ident)]
    write_rows(run / "results.csv", rows)
    if done:
        (run / "DONE").write_text("")


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "fake"
    runs = [("cd-0", "context_distilled", 0, "done", None), ("cd-1", "context_distilled", 1, "done", None),
            ("cd-2", "context_distilled", 2, "done", None),  # listed, never written: missing
            ("dpo-0", "dpo", 0, "done", None), ("dpo-1", "dpo", 1, "done", None),
            ("dpo-2", "dpo", 2, "failed", "CUDA out of memory <oops>"),
            ("rrhf-0", "rrhf", 0, "running", None)]
    for run_id, method, seed, status, error in runs:
        if run_id == "dpo-2":  # failed, with partial outputs that must not count
            write_run(root, run_id, method, seed, status, error, done=False, judge_shift=-10.0)
        elif run_id == "rrhf-0":
            (root / "runs" / run_id).mkdir(parents=True)
            (root / "runs" / run_id / "status.json").write_text(json.dumps({"status": "running"}))
        elif run_id != "cd-2":
            write_run(root, run_id, method, seed)
    index = {"runs": [dict(run_id=r, method=m, seed=s, status=st, error=e, dir=f"runs/{r}")
                      for r, m, s, st, e in runs]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def md_row(md: str, first_cell: str) -> str:
    lines = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(lines) == 1, (first_cell, lines)
    return lines[0]


def test_report_marks_bad_runs_and_gets_numbers_right(sweep, tmp_path):
    out = tmp_path / "report"
    path = build_report(sweep, out, n_boot=500)
    assert path == out / "report.md"
    md = path.read_text()

    assert "| failed: CUDA out of memory &lt;oops&gt; |" in md_row(md, "dpo-2")
    assert "| missing |" in md_row(md, "cd-2")
    assert "| incomplete: no DONE (status running) |" in md_row(md, "rrhf-0")
    assert "| done |" in md_row(md, "dpo-0")
    assert "| dpo | 2/3 |" in md and "| rrhf | 0/1 |" in md

    results = read_rows(out / "results.csv")
    pm = results[results["method"] == "pm"]
    assert len(pm) == len(pm_rows())  # deduplicated across the four usable runs
    assert set(results["run"]) >= {"cd-0", "cd-1", "dpo-0", "dpo-1"} and "dpo-2" not in set(results["run"])

    wins = results[(results["evaluator"] == "win_rate") & (results["method"] == "dpo")
                   & (results["slice"] == "vs:context_distilled")].set_index("metric")
    assert wins.loc["win_rate", "value"] == pytest.approx(0.75)  # the failed run's -10 shift is ignored
    ref = sps.binomtest(3, 4).proportion_ci(method="exact")
    assert wins.loc["win_rate_decisive", ["ci_low", "ci_high"]].tolist() == pytest.approx([ref.low, ref.high])
    elo = results[(results["metric"] == "elo")].set_index("method")["value"]
    assert elo["context_distilled"] == 0 and elo["dpo"] > 0

    kl = results[(results["evaluator"] == "kl_reward") & (results["config"] == "dpo")
                 & (results["slice"] == "proxy_reward")].set_index("metric")["value"]
    assert (kl["rl.alpha"], kl["rl.beta"], kl["rl.r2"], kl["offset"]) == pytest.approx((2.0, 0.5, 1.0, 0.5))

    # NLP: dpo seeds 0.44 and 0.46 -> mean 0.45, delta -0.05 against context_distilled's 0.50
    # (each side's interval across its 2 seeds is a t-interval now, so the delta's is wide)
    assert re.search(r"\| dpo \| arc_easy \| 0\.450 \| 0\.500 \| -0\.050 \\\[-0\.1\d\d, 0\.0\d\d\\\] \|", md)
    assert re.search(r"\| dpo \| nlp_tasks \| acc_norm \| arc_easy \| 0\.405 \\\[.*\\\] \| 2000 \| "
                     r"2 \(t\(n=2\)\), range 0\.396–0\.414 \|", md)
    for png in ("pm_accuracy_by_turn", "pm_calibration", "pm_threshold", "win_rates", "reward_vs_kl", "frontier",
                "nlp_deltas", "cost_quality"):
        assert (out / f"{png}.png").exists() and f"]({png}.png)" in md
    assert "Clopper-Pearson" in md and "bootstrap" in md


def test_html_is_self_contained_and_escaped(sweep, tmp_path):
    build_report(sweep, tmp_path / "r", n_boot=200)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done" in page
    assert "<script" not in page.lower()
    assert "&lt;b&gt;Hi&lt;/b&gt; &amp; hello" in page and "<b>Hi</b>" not in page
    assert "CUDA out of memory &lt;oops&gt;" in page
    assert page.count("data:image/png;base64,") == 9  # with reward_hist.png and frontier.png
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    md = (tmp_path / "r" / "report.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done" in md  # escaped, renders as the text
    assert "<script" not in md.lower() and "<b>" not in md


def test_report_skips_what_is_absent(tmp_path):
    root = tmp_path / "bare"
    (root / "runs" / "only").mkdir(parents=True)
    (root / "runs" / "only" / "DONE").write_text("")
    (root / "runs" / "stray").mkdir()
    (root / "index.json").write_text(json.dumps({"runs": [dict(run_id="only", method="dpo", seed=0,
                                                                status="done", error=None, dir="runs/only")]}))
    md = build_report(root, tmp_path / "out").read_text()
    assert "skipped" in md and "PM accuracy by number of Human turns: skipped" in md
    assert "stray is not listed in index.json" in md
    assert not list((tmp_path / "out").glob("*.png"))
    assert (tmp_path / "out" / "index.html").exists()


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="index.json; is .* a sweep directory"):
        build_report(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_aggregate_seeds_mean_or_own_interval():
    rows = pd.DataFrame([make_row(run="a", method="m", config="m", seed=0, evaluator="e", metric="x", slice="",
                                  value=1.0, ci_low=0.5, ci_high=1.5, n=10),
                         make_row(run="b", method="m", config="m", seed=1, evaluator="e", metric="x", slice="",
                                  value=3.0, ci_low=2.5, ci_high=3.5, n=10),
                         make_row(run="c", method="k", config="k", seed=0, evaluator="e", metric="x", slice="",
                                  value=7.0, ci_low=6.0, ci_high=8.0, n=5)]
                        + [make_row(run=f"f{i}", method="f", config="f", seed=i, evaluator="e", metric="x", slice="",
                                    value=float(i), n=1) for i in range(6)])
    agg = aggregate_seeds(rows, n_boot=500).set_index("config")
    # two seeds: Student-t, mean ± t(0.975, 1) · s/√2 with s = √2
    half = sps.t.ppf(0.975, 1)
    assert agg.loc["m", "value"] == 2.0 and agg.loc["m", "interval"] == "t(n=2)" and agg.loc["m", "n"] == 20
    assert agg.loc["m", ["ci_low", "ci_high"]].tolist() == pytest.approx([2.0 - half, 2.0 + half])
    assert agg.loc["m", ["range_low", "range_high"]].tolist() == [1.0, 3.0]
    assert agg.loc["k", ["value", "ci_low", "ci_high"]].tolist() == [7.0, 6.0, 8.0]
    assert agg.loc["k", "interval"] == "run"
    # six seeds: percentile bootstrap over the seed values, inside their range
    assert agg.loc["f", "interval"] == "bootstrap(n=6)" and agg.loc["f", "value"] == 2.5
    assert 0.0 <= agg.loc["f", "ci_low"] < 2.5 < agg.loc["f", "ci_high"] <= 5.0


def test_unreadable_run_is_marked_not_fatal(sweep, tmp_path):
    with open(sweep / "runs" / "dpo-1" / "samples.jsonl", "a") as f:
        f.write("{truncated\n")
    md = build_report(sweep, tmp_path / "out", n_boot=100).read_text()
    assert "| unreadable: samples.jsonl: " in md_row(md, "dpo-1")
    assert "| dpo | 1/3 |" in md
