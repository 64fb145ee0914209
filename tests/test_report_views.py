"""The report's views of issue 12: win rate against the chosen response, win rates and diversity per
sampling temperature, reward distributions, PM robustness, and the page's contents and anchors.
Known answers on hand-made inputs, then a fake sweep with every field and an old one without them."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from alignbench.eval.stats import make_row, read_rows, write_rows
from alignbench.report import views
from alignbench.report.build import build_report, companion_blocks
from alignbench.report.render import Heading, Para, slugs, to_html, to_markdown

BASE, DPO = "context_distilled", "dpo"
N_PROMPTS = 4
CHOSEN = [0.5, 0.5, 0.5, 0.5]
FINAL_JUDGE = {BASE: [0.0, 0.0, 0.0, 0.0], DPO: [1.0, 1.0, 1.0, 0.0]}  # vs chosen: 0/4 and 3/4
# sample 0 at T=0.5 per seed; the seed means, [1, 0, 1, 1], beat the baseline's 0.5 on 3 of 4 prompts
DPO_T05 = {0: [2.0, 0.0, 1.0, 1.0], 1: [0.0, 0.0, 1.0, 1.0], 2: [1.0, 0.0, 1.0, 1.0]}
DIVERSITY = {  # (config, T) -> per seed (distinct_1, distinct_2, self_bleu)
    (BASE, 0.5): [(0.60, 0.80, 20.0), (0.61, 0.81, 21.0), (0.62, 0.82, 22.0)],
    (DPO, 0.5): [(0.40, 0.50, 40.0), (0.41, 0.52, 41.0), (0.42, 0.51, 42.0)],  # less diverse, apart
    (BASE, 1.0): [(0.70, 0.90, 10.0), (0.71, 0.91, 11.0), (0.72, 0.92, 12.0)],
    (DPO, 1.0): [(0.70, 0.90, 10.5), (0.71, 0.91, 11.5), (0.72, 0.92, 12.5)],  # overlaps π0
}
AGREEMENT = {1: [0.9, 0.8, 0.7], 2: [0.6, 0.5, 0.4]}  # log step -> per seed; π0's point (step 0) has none


def _temperature_samples(method, seed):
    rows = []
    for t in (0.5, 1.0):
        for p in range(N_PROMPTS):
            judge0 = (DPO_T05[seed][p] if t == 0.5 else 0.0) if method == DPO else 0.5
            for k in range(2):  # sample 1 is never compared: a wild value that would flip every win rate
                rows.append(dict(prompt_id=p, config=method, seed=seed, temperature=t, sample=k,
                                 response=f"{method} s{seed} T{t} p{p} k{k}", proxy_reward=0.0,
                                 judge_reward=judge0 if k == 0 else -100.0, finished=True,
                                 chosen_judge_reward=CHOSEN[p]))
    return rows


def write_run(sweep, method, seed, new_fields=True):
    run_id = f"{method}_s{seed}"
    run = sweep / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    samples = [dict(prompt_id=p, prompt=f"prompt {p}", response=f"{run_id} <script>x</script> {p}",
                    proxy_reward=float(p), judge_reward=FINAL_JUDGE[method][p], judge="gold",
                    **(dict(chosen_judge_reward=CHOSEN[p], chosen_proxy_reward=0.0) if new_fields else {}))
               for p in range(N_PROMPTS)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    points = [dict(method=method, seed=seed, step=0, label="pi0", kl_k3=0.0, proxy_reward=0.0, judge_reward=0.0)]
    points += [dict(method=method, seed=seed, step=s, label="train", kl_k3=0.01 * s * s, proxy_reward=0.1 * s,
                    judge_reward=0.05 * s) for s in (1, 2)]
    if new_fields:
        points[0]["proxy_judge_spearman"] = 0.9
        for p in points[1:]:
            p["proxy_judge_agreement"] = AGREEMENT[p["step"]][seed]
            p["proxy_judge_spearman"] = 0.9 - 0.2 * p["step"]
    (run / "train_log.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (run / "metrics.json").write_text(json.dumps({"method": method, "seed": seed, "run_id": run_id, "final": {},
                                                  "cost": {"wall_s": 1.0}}))
    rows = []
    if new_fields:
        temps = _temperature_samples(method, seed)
        (run / "samples_by_temperature.jsonl").write_text("".join(json.dumps(r) + "\n" for r in temps))
        rows += [make_row(sweep=sweep.name, run=run_id, method=method, seed=seed, evaluator="temperature",
                          metric="judge_reward", slice=f"T={t:g}", n=N_PROMPTS,
                          value=float(np.mean([r["judge_reward"] for r in temps if r["temperature"] == t
                                               and r["sample"] == 0])))
                 for t in (0.5, 1.0)]
        for (config, t), per_seed in DIVERSITY.items():
            if config == method:
                rows += [make_row(sweep=sweep.name, run=run_id, method=method, seed=seed, evaluator="diversity",
                                  metric=m, slice=f"T={t:g}", value=v, n=N_PROMPTS)
                         for m, v in zip(views.DIVERSITY_METRICS, per_seed[seed])]
    write_rows(run / "results.csv", rows)
    (run / "DONE").write_text("")
    return dict(run_id=run_id, method=method, seed=seed, config=method, status="done", dir=f"runs/{run_id}")


def make_sweep(root, new_fields=True):
    root.mkdir(parents=True)
    entries = [write_run(root, m, s, new_fields) for m in (BASE, DPO) for s in range(3)]
    (root / "index.json").write_text(json.dumps({"sweep": root.name, "runs": entries}))
    return root


# --------------------------------------------------------------------------- known answers
def test_win_rate_vs_chosen_on_hand_scores():
    scores = {"a": np.array([1.0, 2.0, 3.0, 0.0]), "b": np.array([0.0, 2.0, 1.0, 1.0])}
    chosen = np.array([0.0, 2.0, 1.0, 1.0])  # a: win, tie, win, loss; b: ties everywhere
    rows = {r["method"]: r for r in views.vs_chosen_rows(scores, chosen, n_boot=500, seed=0)}
    assert rows["a"]["value"] == pytest.approx(2.5 / 4) and rows["a"]["n"] == 4
    assert rows["b"]["value"] == 0.5
    assert all(r["metric"] == "win_rate_vs_chosen" and r["slice"] == "vs:chosen" for r in rows.values())
    assert 0.0 <= rows["a"]["ci_low"] < 0.625 < rows["a"]["ci_high"] <= 1.0
    # a prompt whose chosen response has no judge reward drops out: 2 wins, 1 loss of 3
    nan_chosen = views.vs_chosen_rows({"a": scores["a"]}, np.array([0.0, np.nan, 1.0, 1.0]), n_boot=100)
    assert nan_chosen[0]["value"] == pytest.approx(2 / 3) and nan_chosen[0]["n"] == 3


def test_temperature_win_rates_use_sample_zero_and_seed_means():
    temps = pd.DataFrame([r for m in (BASE, DPO) for s in range(3) for r in _temperature_samples(m, s)])
    rows = pd.DataFrame(views.temperature_rows(temps, BASE, n_boot=300, seed=0))
    got = rows.set_index(["method", "metric", "slice"])["value"]
    assert got[(DPO, "win_rate", f"T=0.5|vs:{BASE}")] == 0.75
    assert got[(DPO, "win_rate", f"T=1|vs:{BASE}")] == 0.0
    assert got[(DPO, "win_rate_vs_chosen", "T=0.5|vs:chosen")] == 0.75
    assert got[(BASE, "win_rate_vs_chosen", "T=0.5|vs:chosen")] == 0.5  # equal scores tie
    assert set(rows["evaluator"]) == {"win_rate_by_temperature"}
    assert (BASE, "win_rate", f"T=0.5|vs:{BASE}") not in got.index  # no row of the baseline against itself


def test_reward_summary_quantiles_pool_seeds():
    samples = pd.DataFrame({"config": ["x"] * 11, "seed": [0] * 6 + [1] * 5,
                            "judge_reward": np.arange(11.0), "proxy_reward": np.arange(11.0) * 2})
    s = views.reward_summary(samples).set_index(["config", "reward"])
    judge = s.loc[("x", "judge_reward")]
    assert judge["n"] == 11 and judge["mean"] == 5.0 and judge["sd"] == pytest.approx(math.sqrt(11))
    assert (judge["q10"], judge["q25"], judge["q50"], judge["q75"], judge["q90"]) == (1.0, 2.5, 5.0, 7.5, 9.0)
    assert s.loc[("x", "proxy_reward"), "q90"] == 18.0
    table = views.reward_table(views.reward_summary(samples))
    assert table.rows[0][:5] == ["judge_reward", "x", "11", "5.000", "3.317"]


def test_interval_comparison_and_diversity_findings():
    assert views.compare_intervals(5, 4, 6, 1, 3) == "above"
    assert views.compare_intervals(0, -1, 0.5, 1, 3) == "below"
    assert views.compare_intervals(2, 1.5, 4, 1, 3) == "overlap"
    assert views.compare_intervals(2, float("nan"), 4, 1, 3) == "unknown"
    rows = [dict(config=c, evaluator="diversity", metric=m, slice=f"T={t:g}", value=v, ci_low=v - w, ci_high=v + w,
                 n_seeds=3, interval="t(n=3)")
            for (c, t, m, v, w) in [(BASE, 0.5, "self_bleu", 21, 2), ("hot", 0.5, "self_bleu", 40, 2),
                                    ("cold", 0.5, "self_bleu", 10, 2), ("same", 0.5, "self_bleu", 22, 2)]]
    findings = views.diversity_findings(views.diversity_frame(pd.DataFrame(rows)), BASE)
    assert findings == [f"At T=0.5: less diverse than {BASE} (self-BLEU higher or distinct-2 lower, intervals apart): "
                        f"hot; more diverse: cold; not separable from {BASE} (intervals overlap or missing): same."]
    assert views.diversity_findings(views.diversity_frame(pd.DataFrame(rows[1:])), BASE) == \
        [f"No diversity comparison: {BASE} has no diversity rows."]


def test_robustness_frame_means_seeds_per_log_point():
    points = [dict(config=DPO, seed=s, step=st, label="train", kl_k3=0.04 * st * st, proxy_judge_agreement=a)
              for st, per_seed in AGREEMENT.items() for s, a in enumerate(per_seed)]
    rob = views.robustness_frame(points)
    assert rob["proxy_judge_agreement"].tolist() == pytest.approx([0.8, 0.5])
    assert rob["d"].tolist() == pytest.approx([0.2, 0.4])
    table = views.robustness_table(rob)
    assert table.rows == [[views.ROBUSTNESS_KEYS["proxy_judge_agreement"], DPO, "0.800 (√KL 0.200)",
                           "0.500 (√KL 0.400)", "-0.300", "2"]]
    assert views.robustness_frame([dict(config=DPO, step=0, kl_k3=0.0)]).empty  # older points: nothing to show
    # the final evaluation's point (step -1) is the last point, not the first
    final = [dict(config=DPO, seed=s, step=-1, label="final", kl_k3=0.36, proxy_judge_agreement=0.3) for s in (0, 1)]
    rob = views.robustness_frame(points + final)
    assert rob["step"].tolist() == [1, 2, -1]
    assert views.robustness_table(rob).rows[0][2:5] == ["0.800 (√KL 0.200)", "0.300 (√KL 0.600)", "-0.500"]


def test_slugs_are_stable_and_unique():
    blocks = [Heading("Report <x>", 1), Heading("Win rates & Elo"), Para("p"), Heading("Win rates & Elo"),
              Heading("Contents"), Heading("!!!", 3)]
    assert list(slugs(blocks).values()) == ["win-rates-elo", "win-rates-elo-2", "contents-2", "section"]
    page = to_html(blocks, "t")
    assert '<h2 id="win-rates-elo">' in page and '<h2 id="win-rates-elo-2">' in page
    assert '<nav id="contents">' in page and page.count('href="#') == 4
    ids = re.findall(r'id="([^"]+)"', page)
    assert len(ids) == len(set(ids)) and all(f'id="{h}"' in page for h in re.findall(r'href="#([^"]+)"', page))
    assert "script-src 'none'" in page and "Content-Security-Policy" in page
    md = to_markdown(blocks)
    assert '<a id="win-rates-elo-2"></a>\n\n## Win rates &amp; Elo' in md and "- [Contents](#contents-2)" in md
    assert "  - [!!!](#section)" in md


# --------------------------------------------------------------------------- whole reports
def test_report_shows_every_view_on_a_sweep_with_the_new_fields(tmp_path):
    sweep = make_sweep(tmp_path / "new")
    out = tmp_path / "out"
    md = build_report(sweep, out, n_boot=200).read_text()
    res = read_rows(out / "results.csv")
    vs_chosen = res[res["metric"] == "win_rate_vs_chosen"].set_index(["config", "evaluator", "slice"])["value"]
    assert vs_chosen[(DPO, "win_rate", "vs:chosen")] == 0.75 and vs_chosen[(BASE, "win_rate", "vs:chosen")] == 0.0
    assert vs_chosen[(DPO, "win_rate_by_temperature", "T=0.5|vs:chosen")] == 0.75
    temp = res[(res["evaluator"] == "win_rate_by_temperature") & (res["metric"] == "win_rate")]
    assert temp.set_index("slice").loc[f"T=0.5|vs:{BASE}", "value"] == 0.75
    for png in ("temperature", "diversity", "reward_hist", "pm_robustness"):
        assert (out / f"{png}.png").exists() and f"]({png}.png)" in md
    assert f"At T=0.5: less diverse than {BASE} (self-BLEU higher or distinct-2 lower, intervals apart): dpo;" in md
    assert f"At T=1: less diverse than {BASE} (self-BLEU higher or distinct-2 lower, intervals apart): none;" in md
    # the final samples: dpo beats π0 on 3 prompts and ties on 1 (0.875), beside 3 of 4 against chosen
    assert re.search(rf"\| {DPO} \| 0\.875 [^|]* \| 0\.750 [^|]* \| 4 \|", md)
    # at T=0.5: judge reward 0.75 over the seeds' means 1, 0.5, 0.75; both win rates 3 of 4
    assert re.search(rf"\| {DPO} \| 0\.5 \| 0\.750 [^|]* \| 0\.750 [^|]* \| 0\.750 [^|]* \| 4 \|", md)
    assert "| temperature | judge_reward |" not in md and "| diversity |" not in md  # not again in Other results
    assert "| proxy–judge agreement vs π0 (real HH: proxy PM vs test PM) | dpo | 0.800 (√KL 0.100) | " \
           "0.500 (√KL 0.200) | -0.300 | 2 |" in md
    assert "| judge_reward | dpo | 12 | 0.750 | 0.452 |" in md
    page = (out / "index.html").read_text()
    assert '<h2 id="temperature-and-diversity">' in page and 'href="#pm-robustness"' in page
    assert "<script" not in page.lower()


def test_old_sweep_gets_notes_instead_of_views(tmp_path):
    sweep = make_sweep(tmp_path / "old", new_fields=False)
    out = tmp_path / "out"
    md = build_report(sweep, out, n_boot=100).read_text()
    assert "no win rate against the chosen response (the samples record no chosen_judge_reward)" in md
    assert "no run has samples_by_temperature.jsonl" in md
    assert "no diversity rows (eval.temperatures empty, or runs from before it)" in md
    assert "no train_log point records proxy_judge_agreement or proxy_judge_spearman" in md
    for png in ("temperature", "diversity", "pm_robustness"):
        assert not (out / f"{png}.png").exists()
    assert (out / "reward_hist.png").exists()  # final samples exist in every sweep
    res = read_rows(out / "results.csv")
    assert not (res["metric"] == "win_rate_vs_chosen").any()


def test_companion_reports_are_linked_and_escaped(tmp_path):
    assert companion_blocks(tmp_path) == []  # no sub-report: no section
    for name in ("pm-objectives", 'x"><img src=x onerror=alert(1)>'):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.md").write_text("# sub\n")
    (tmp_path / "figures").mkdir()  # a folder without a report is not linked
    blocks = companion_blocks(tmp_path)
    md, page = to_markdown(blocks), to_html(blocks, "t")
    assert "- [pm-objectives: report.md](pm-objectives/report.md)" in md
    assert '<a href="pm-objectives/index.html">pm-objectives: index.html</a>' in page
    assert "figures" not in md and "<img" not in page and "<img" not in md
