"""The report's unit is the configuration (method plus its own overrides), not the method: a sweep
over a hyperparameter keeps its values apart. Also: identical responses tie, data text is escaped
in report.md, and the evaluation-prompt mix, per-subset results, truncation rate and FLOPs views
(and their notes when a field is absent)."""
from __future__ import annotations

import json
import math
import re

import pytest
from omegaconf import OmegaConf

from alignbench.eval.stats import make_row, read_rows, write_rows
from alignbench.report.build import build_report

PROMPTS = ["How do I bake bread?", "Tell me a joke", "What is 2+2?", "How do I pick a lock?"]
SUBSETS = ["helpful-base", "helpful-online", "helpful-base", "harmless-base"]
TURNS = [1, 2, 1, 3]


def write_run(sweep, run_id, method, seed, judge, responses=None, extra_samples=None, cost=None, rows=(),
              config=None):
    """A finished run: samples with the given judge rewards and responses, a metrics.json with
    ``cost`` and (when given) ``config``, and its results.csv rows."""
    run = sweep / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "done", "error": None}))
    responses = responses or [f"{run_id} answer {i}" for i in range(len(PROMPTS))]
    samples = [dict(prompt_id=i, prompt=p, response=responses[i], proxy_reward=0.0, judge_reward=judge[i],
                    judge="gold", **(extra_samples[i] if extra_samples else {})) for i, p in enumerate(PROMPTS)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "train_log.jsonl").write_text("")
    metrics = {"method": method, "seed": seed, "run_id": run_id, "final": {},
               "cost": cost or {"wall_s": 1.0, "tokens_trained": 0, "tokens_generated": 10, "pm_calls": 0}}
    if config:
        metrics["config"] = config
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_rows(run / "results.csv", [make_row(sweep=sweep.name, run=run_id, method=method, seed=seed, **r) for r in rows])
    (run / "DONE").write_text("")


def write_index(sweep, runs, with_config=True):
    entries = [dict(run_id=r, method=m, seed=s, status="done", error=None, dir=f"runs/{r}",
                    **({"config": c} if with_config else {})) for r, m, s, c in runs]
    (sweep / "index.json").write_text(json.dumps({"sweep": sweep.name, "runs": entries}))


def gold_row(value):
    return dict(evaluator="policy", metric="gold_reward", slice="heldout", value=value, n=4)


@pytest.mark.parametrize("with_config", [True, False], ids=["config-in-index", "old-index-config-from-run-id"])
def test_sweep_of_two_configurations_keeps_them_apart(tmp_path, with_config):
    """dpo at beta = 0.1 and 0.5, two seeds each, plus the baseline: two dpo configurations, each
    the mean of its own two seeds, with win rates between them; never one "dpo" over four runs."""
    sweep = tmp_path / "dpo_beta"
    lo, hi = "dpo_method.beta=0.1", "dpo_method.beta=0.5"
    runs = [("context_distilled_s0", "context_distilled", 0, "context_distilled"),
            ("context_distilled_s1", "context_distilled", 1, "context_distilled"),
            ("dpo_s0_method.beta=0.1", "dpo", 0, lo), ("dpo_s1_method.beta=0.1", "dpo", 1, lo),
            ("dpo_s0_method.beta=0.5", "dpo", 0, hi), ("dpo_s1_method.beta=0.5", "dpo", 1, hi)]
    judge = {"context_distilled": [0.0] * 4, lo: [1.0, 1.0, 1.0, -1.0], hi: [-1.0, -1.0, -1.0, 2.0]}
    gold = {"context_distilled": [0.0, 0.0], lo: [1.0, 2.0], hi: [-1.0, -3.0]}
    for run_id, method, seed, config in runs:
        write_run(sweep, run_id, method, seed, [j + 0.25 * seed for j in judge[config]],
                  rows=[gold_row(gold[config][seed])], config=config if with_config else None)
    write_index(sweep, runs, with_config)
    out = tmp_path / "report"
    md = build_report(sweep, out, n_boot=200).read_text()

    results = read_rows(out / "results.csv")
    assert "config" in results.columns and list(results.columns).index("config") == list(results.columns).index("method") + 1
    per_run = results[(results["evaluator"] == "policy") & (results["metric"] == "gold_reward")]
    assert dict(zip(per_run["run"], per_run["config"])) == {r: c for r, _, _, c in runs}

    # the Configurations table: one row per configuration, each averaging its own two seeds
    rows = [line for line in md.splitlines() if line.startswith("| dpo_method.beta=")]
    config_rows = [line for line in rows if "| dpo | 2/2 |" in line]
    assert len(config_rows) == 2 and not re.search(r"^\| dpo \| dpo \|", md, flags=re.M)
    assert "| 0.625 \\[" in config_rows[0] and "t(n=2), range 0.500–0.750" in config_rows[0]  # β = 0.1
    assert "| -0.125 \\[" in config_rows[1] and "t(n=2), range -0.250–0.000" in config_rows[1]  # β = 0.5

    # win rates and Elo between the two configurations exist and use their own scores
    wins = results[(results["evaluator"] == "win_rate") & (results["metric"] == "win_rate")]
    wins = wins.set_index(["config", "slice"])["value"]
    assert wins[(lo, f"vs:{hi}")] == pytest.approx(0.75) and wins[(hi, f"vs:{lo}")] == pytest.approx(0.25)
    assert wins[(lo, "vs:context_distilled")] == pytest.approx(0.75)
    elo = results[results["metric"] == "elo"].set_index("config")["value"]
    assert set(elo.index) == {"context_distilled", lo, hi} and elo[lo] > elo["context_distilled"] > elo[hi]
    methods = results[results["evaluator"] == "win_rate"].set_index("config")["method"]
    assert methods[lo].unique().tolist() == ["dpo"]

    # other per-run rows: aggregated per configuration, over its 2 seeds, with a t-interval
    gold_md = [line for line in md.splitlines() if "| policy | gold_reward |" in line]
    assert any(line.startswith(f"| {lo} |") and "| 1.500 \\[" in line and "2 (t(n=2)), range 1.000–2.000" in line
               for line in gold_md)
    assert any(line.startswith(f"| {hi} |") and "| -2.000 \\[" in line for line in gold_md)
    assert "t(n=N)\": t-interval over N seeds" in md


def test_config_id_is_the_run_id_without_the_seed():
    from alignbench.runner import config_id_for, run_id_for
    cfg = OmegaConf.create({"method": {"name": "dpo"}, "seed": 3})
    over = ["method=dpo", "seed=3", "method.beta=0.1", "paths.sweep_dir=/x", "train.lr=1e-3"]
    assert run_id_for(cfg, over).startswith("dpo_s3_method.beta=0.1_cfg-")
    assert config_id_for(cfg, over) == run_id_for(cfg, over).replace("_s3", "", 1)
    assert config_id_for(cfg, ["seed=3", "method.beta=0.1"]) == "dpo_method.beta=0.1"
    assert config_id_for(cfg, ["seed=3"]) == config_id_for(OmegaConf.create({"method": {"name": "dpo"}, "seed": 4})) == "dpo"


def test_old_results_csv_reads_config_as_method(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("sweep,run,method,seed,evaluator,metric,slice,value,ci_low,ci_high,n\n"
                    "s,r,dpo,0,policy,gold_reward,heldout,1.0,,,4\n")
    assert read_rows(path).loc[0, "config"] == "dpo"


def _two_configs(tmp_path, responses_b=None, judge_b=None, **kw):
    sweep = tmp_path / "sweep"
    runs = [("context_distilled_s0", "context_distilled", 0, "context_distilled"), ("ppo_s0", "ppo", 0, "ppo")]
    write_run(sweep, runs[0][0], "context_distilled", 0, [0.0] * 4, **kw)
    write_run(sweep, runs[1][0], "ppo", 0, judge_b or [1.0] * 4, responses=responses_b, **kw)
    write_index(sweep, runs)
    return sweep


def test_identical_responses_tie_whatever_their_scores(tmp_path):
    """Same text from both configurations, judge scores 1e-7 apart (batch padding noise): a tie."""
    same = [f"the same answer {i}" for i in range(4)]
    sweep = tmp_path / "sweep"
    runs = [("context_distilled_s0", "context_distilled", 0, "context_distilled"), ("ppo_s0", "ppo", 0, "ppo")]
    write_run(sweep, runs[0][0], "context_distilled", 0, [0.5] * 4, responses=same)
    write_run(sweep, runs[1][0], "ppo", 0, [0.5 + 1e-7] * 4, responses=same)
    write_index(sweep, runs)
    build_report(sweep, tmp_path / "out", n_boot=100)
    res = read_rows(tmp_path / "out" / "results.csv")
    wins = res[(res["evaluator"] == "win_rate") & (res["method"] == "ppo")].set_index("metric")["value"]
    assert wins["tie_rate"] == 1.0 and wins["win_rate"] == 0.5


def test_report_md_escapes_data_text(tmp_path):
    attack = "<img src=x onerror=alert(1)> [click](javascript:alert(1)) | `code` *bold*"
    sweep = _two_configs(tmp_path, responses_b=[attack] * 4)
    index = json.loads((sweep / "index.json").read_text())
    index["runs"].append(dict(run_id="bad_s0", method="ppo", seed=0, status="failed", dir="runs/bad_s0",
                              error="boom <img src=y onerror=alert(2)> | [x](http://evil)"))
    (sweep / "index.json").write_text(json.dumps(index))
    md = build_report(sweep, tmp_path / "out", n_boot=100).read_text()
    assert "<img" not in md
    # outside the <pre> blocks (raw HTML to Markdown: no link, emphasis or code forms inside) no
    # unescaped "](" can open a link but the report's own figures and its contents' links to its anchors
    outside = re.sub(r"<pre>\n.*?\n</pre>|^!\[[^\]]*\]\(\w+\.png\)$|^ *- \[(?:\\.|[^\]\\])*\]\(#[a-z0-9-]+\)$", "", md,
                     flags=re.S | re.M)
    assert not re.search(r"(?<!\\)\]\(", outside)
    # still readable: the sample shows as its text (HTML-escaped inside a <pre> block) ...
    assert "<pre>\n[judge 1.000] &lt;img src=x onerror=alert(1)&gt; [click](javascript:alert(1)) | `code` *bold*\n" \
        "</pre>" in md
    # ... and a run's error stays in its table cell, its | and [ ] escaped
    row = next(line for line in md.splitlines() if line.startswith("| bad_s0 |"))
    assert "failed: boom &lt;img src=y onerror=alert(2)&gt; \\| \\[x\\](http://evil)" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", md.splitlines()[
        md.splitlines().index(next(line for line in md.splitlines() if line.startswith("| run |")))]))


def test_prompt_mix_subsets_truncation_and_flops(tmp_path):
    meta = [dict(subset=s, n_turns=t, finished=i != 3) for i, (s, t) in enumerate(zip(SUBSETS, TURNS))]
    cost = {"wall_s": 2.0, "measure_s": 0.5, "flops": 3.2e12, "tokens_trained": 0, "tokens_generated": 10,
            "pm_calls": 0}
    sweep = _two_configs(tmp_path, judge_b=[1.0, -1.0, 1.0, -1.0], extra_samples=meta, cost=cost)
    # one run says its truncation rate in results.csv (it wins over the samples' "finished")
    res_path = sweep / "runs" / "ppo_s0" / "results.csv"
    write_rows(res_path, [make_row(run="ppo_s0", method="ppo", seed=0, evaluator="policy", metric="truncation_rate",
                                   slice="heldout", value=0.5, n=4)])
    out = tmp_path / "out"
    md = build_report(sweep, out, n_boot=100).read_text()
    # the prompt mix
    assert "| helpful-base | 2 | 0.500 |" in md and "| harmless-base | 1 | 0.250 |" in md
    assert "| 1 | 2 | 0.500 |" in md and "| 3 | 1 | 0.250 |" in md
    # per subset: helpful-base prompts 0 and 2, ppo wins both; harmless-base prompt 3, ppo loses
    assert re.search(r"\| helpful-base \| ppo \| 2 \| 1\.000 \\\[1\.000, 1\.000\\\] \| 1\.000 ", md)
    assert re.search(r"\| harmless-base \| ppo \| 1 \| -1\.000 .*\| 0\.000 ", md)
    assert re.search(r"\| helpful\\\* \| ppo \| 3 \| 0\.333 ", md)  # helpful-base + helpful-online
    res = read_rows(out / "results.csv")
    sub = res[(res["evaluator"] == "win_rate_by_subset") & (res["config"] == "ppo")].set_index("slice")["value"]
    assert sub["helpful*|vs:context_distilled"] == pytest.approx(2 / 3)
    # truncation: ppo from its results row (0.5), the baseline from its samples (1 of 4 unfinished)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "| 1/1 |" in line}
    assert "| 0.500 | 2.0 | 0.5 | 3.2e+12 |" in rows["ppo"] and "| 0.250 | 2.0 | 0.5 | 3.2e+12 |" in rows["context_distilled"]
    assert (out / "quality_flops.png").exists() and "](quality_flops.png)" in md


def test_views_note_absent_fields(tmp_path):
    md = build_report(_two_configs(tmp_path), tmp_path / "out", n_boot=100).read_text()
    assert "no table: the samples record no subset" in md
    assert "Mean judge reward against FLOPs: skipped" in md
    assert not (tmp_path / "out" / "quality_flops.png").exists()


def test_best_of_n_kl_is_shown_against_its_upper_bound(tmp_path):
    sweep = _two_configs(tmp_path)
    log = [dict(step=k, label=f"n={k}", kl_estimate=est, kl_bound=math.log(k) - (k - 1) / k, proxy_reward=0.1 * k,
                judge_reward=0.05 * k) for k, est in ((1, 0.0), (2, 0.15), (4, 0.5))]
    (sweep / "runs" / "ppo_s0" / "train_log.jsonl").write_text("".join(json.dumps(p) + "\n" for p in log))
    md = build_report(sweep, tmp_path / "out", n_boot=100).read_text()
    assert "| configuration | n | measured KL (plug-in, biased low) | log n − (n−1)/n (upper bound) | points |" in md
    assert "| ppo | n=4 | 0.5000 | 0.6363 | 1 |" in md
    assert "is an upper bound on KL(best-of-n ‖ π0)" in md and "−0.035 (m = 64)" in md
