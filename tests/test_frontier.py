"""Reward–KL fits with enough points, their bootstrap intervals and peaks, the upper envelope, and the
ranking of families at a matched KL, on inputs with known answers; and the report's frontier
section on a fake multi-family, multi-seed sweep."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from alignbench.eval import frontier, kl_reward
from alignbench.eval.stats import read_rows
from alignbench.report.build import build_report
from alignbench.report.frontier import ranking_blocks


def _rl(d, alpha, beta):
    return d * (alpha - beta * np.log(np.where(d > 0, d, 1.0)))


# --- fits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("form,curve", [("bon", lambda d: d * (1.2 - 0.3 * d)), ("rl", lambda d: _rl(d, 0.8, 0.4))])
def test_fit_recovers_noisy_coefficients_and_ci_covers_truth(form, curve):
    truth = {"bon": (1.2, 0.3), "rl": (0.8, 0.4)}[form]
    rng = np.random.default_rng(3)
    d = np.concatenate([np.zeros(6), np.tile(np.linspace(0.2, 3.0, 15), 4)])
    r = 0.5 + curve(d) + rng.normal(0, 0.05, d.size)
    fit = kl_reward.fits_for(d, r)[form]
    assert fit.ok and fit.p == 3 and fit.n == d.size
    assert fit.offset == pytest.approx(0.5, abs=0.05)
    assert (fit.params["alpha"], fit.params["beta"]) == pytest.approx(truth, abs=0.06)
    ci = kl_reward.bootstrap_fit(form, d, r, n_boot=400, seed=0)
    for name, true in zip(("alpha", "beta"), truth):
        lo, hi = ci[name]
        assert lo <= true <= hi and hi - lo < 0.3, (name, lo, hi)
    # bootstrap over seeds' point sets: 4 seeds of one curve, each with its own π0 point
    units = np.concatenate([np.arange(6) % 4, np.repeat(np.arange(4), 15)])
    by_unit = kl_reward.bootstrap_fit(form, d, r, units=units, n_boot=400, seed=0)
    assert by_unit["alpha"][0] <= truth[0] <= by_unit["alpha"][1]
    assert kl_reward.bootstrap_fit(form, d, r, n_boot=100, seed=1) == kl_reward.bootstrap_fit(form, d, r, n_boot=100,
                                                                                             seed=1)


def test_fit_needs_p_plus_two_distinct_d():
    d4 = np.array([0.0, 0.5, 1.0, 1.5])  # with π0's point the offset is estimated: p = 3, 5 needed
    r4 = 0.2 + d4 * (1.0 - 0.2 * d4)
    assert not kl_reward.fits_for(d4, r4)["bon"].ok and not kl_reward.fits_for(d4, r4)["rl"].ok
    assert kl_reward.fits_for(d4, r4)["linear"].ok  # linear: p = 2, 4 distinct d suffice
    assert not kl_reward.fits_for(np.repeat(d4, 5), np.repeat(r4, 5))["bon"].ok  # repeats add no distinct d
    d5 = np.append(d4, 2.0)
    assert kl_reward.fits_for(d5, 0.2 + d5 * (1.0 - 0.2 * d5))["bon"].ok
    assert kl_reward.fit_bon(d4[1:] - 0.25, d4[1:], offset=0.0).ok is False  # 3 < p+2 = 4 with a given offset
    assert kl_reward.fit_bon(np.arange(1, 5.0), np.arange(1, 5.0), offset=0.0).ok  # 4 = p+2
    points = [dict(method="dpo", config="dpo_b0.1", seed=0, step=i, label="train", kl_k3=float(x * x),
                   proxy_reward=float(x), judge_reward=float(x)) for i, x in enumerate(d4)]
    rows = kl_reward.kl_reward_rows(points, n_boot=50)
    bon = {r["metric"]: r for r in rows if r["slice"] == "judge_reward" and r["metric"].startswith("bon.")}
    assert set(bon) == {"bon.n_params"} and bon["bon.n_params"]["value"] == 3 and bon["bon.n_params"]["n"] == 4


def test_peak_formula_on_exact_curves():
    assert kl_reward.peak("bon", 1.2, 0.15, offset=0.3) == pytest.approx((4.0, 0.3 + 1.44 / 0.6))
    d_star, r_star = kl_reward.peak("rl", 0.8, 0.4, offset=0.1)
    assert d_star == pytest.approx(math.e) and r_star == pytest.approx(0.1 + 0.4 * math.e)
    assert _rl(np.array([d_star]), 0.8, 0.4)[0] + 0.1 == pytest.approx(r_star)  # it is the curve's value there
    assert all(math.isnan(v) for v in kl_reward.peak("bon", 1.0, -0.1))  # β ≤ 0: no interior maximum
    d = np.linspace(0, 5, 30)
    fit = kl_reward.fits_for(d, 0.3 + d * (1.2 - 0.15 * d))["bon"]
    assert kl_reward.fit_peak(fit, d) == pytest.approx((4.0, 0.3 + 2.4))
    assert all(math.isnan(v) for v in kl_reward.fit_peak(fit, d[d < 3]))  # d* = 4 outside the measured range
    rows = kl_reward.fit_rows(fit, d, 0.3 + d * (1.2 - 0.15 * d), n_boot=100, slice="judge_reward")
    peak_d = next(r for r in rows if r["metric"] == "bon.peak_d")
    assert peak_d["value"] == pytest.approx(4.0) and peak_d["ci_low"] == pytest.approx(4.0)


# --- frontier ------------------------------------------------------------------------------------

def test_upper_envelope_is_best_reward_at_or_below_d():
    d = [0.0, 1.0, 0.5, 2.0, 1.0, 3.0, np.nan]
    r = [0.0, 0.4, 0.6, 0.5, 0.7, 0.9, 5.0]
    xs, env = frontier.upper_envelope(d, r)
    assert xs.tolist() == [0.0, 0.5, 1.0, 2.0, 3.0]
    assert env.tolist() == [0.0, 0.6, 0.7, 0.7, 0.9]
    assert frontier.upper_envelope([], [])[0].size == 0


def test_matched_level_and_choice():
    configs = pd.DataFrame(dict(
        family=["ppo", "ppo", "dpo", "dpo", "context_distilled"], config=["p1", "p2", "d1", "d2", "cd"],
        final_d=[1.0, 2.0, 0.7, 1.5, 0.0], select=[0.5, 0.9, 0.4, 0.8, 0.0],
        selected_on=[frontier.SELECTED_EVAL] * 5))
    level = frontier.matched_level(configs)
    assert level == 1.0  # max(ppo's smallest 1.0, dpo's smallest 0.7); π0's family (KL 0) does not set it
    chosen = frontier.choose_configs(configs, level).set_index("family")["config"].to_dict()
    assert chosen == {"context_distilled": "cd", "dpo": "d1", "ppo": "p1"}  # p2, d2 (d = 2.0, 1.5) are past it
    assert frontier.family_of("rejection_sampling", {}, ["pi0", "n=4"]) == "best_of_n"
    assert frontier.family_of("rejection_sampling", None, ["pi0", "round 1"]) == "rs_finetune"
    assert frontier.family_of("rejection_sampling", {"family": "rs_finetune"}, ["n=4"]) == "rs_finetune"


# --- the report on a fake sweep ------------------------------------------------------------------

N_PROMPTS = 40
SEED_SHIFT = {0: -0.05, 1: 0.0, 2: 0.05}
RNG = np.random.default_rng(0)
SHARED = RNG.normal(0, 1, N_PROMPTS)  # every configuration's per-prompt difficulty
OWN = RNG.normal(0, 0.5, N_PROMPTS)
OWN -= OWN.mean()  # so dpo_b0.1's mean is exactly 0.02 below ppo_a's: their difference cannot separate
BON_KL = {4: kl_reward.best_of_n_kl_bound(4), 16: kl_reward.best_of_n_kl_bound(16)}
# config: (method, family in metrics.json, final sqrt KL, selection gold or None, test gold level, extra noise)
CONFIGS = {
    "ppo_a": ("ppo", "ppo", 1.4, 0.5, 1.0, 0.0), "ppo_b": ("ppo", "ppo", 2.0, 0.9, 1.2, 0.0),
    "dpo_b0.1": ("dpo", "dpo", 0.7, 0.4, 0.98, 1.0), "dpo_b0.5": ("dpo", "dpo", 1.5, 0.1, 0.1, 0.0),
    # best-of-n: no family in metrics.json (inferred from the n=<k> labels); selection prefers n=4
    # although n=16 has the higher gold on the reported prompts
    "rejection_sampling_n4": ("rejection_sampling", None, math.sqrt(BON_KL[4]), 0.4, 0.3, 0.0),
    "rejection_sampling_n16": ("rejection_sampling", None, math.sqrt(BON_KL[16]), 0.3, 0.35, 0.0),
    "context_distilled": ("context_distilled", "context_distilled", 0.0, None, 0.0, 0.0),  # no selection
}


def _log(config, method, final_d, seed):
    if method == "rejection_sampling":  # Gao et al.'s best-of-n curve, α = 1.0, β = 0.4: peaks at d* = 1.25
        n = int(config.rsplit("_n", 1)[1])
        pts = [dict(step=k, label=f"n={k}", kl_estimate=kl_reward.best_of_n_kl_bound(k),
                    judge_reward=float(0.1 + (x := math.sqrt(kl_reward.best_of_n_kl_bound(k))) * (1 - 0.4 * x)),
                    proxy_reward=float(x)) for k in (1, 2, 4, 8, 16) if k <= n]
        return pts + [dict(pts[-1], step=-1, label="final")]
    if method == "dpo":  # π0 and the end only: too few points for any fit
        steps = [0.0, final_d]
    else:  # RL form α = 1, β = 0.5: d* = e ≈ 2.72, past the measured range
        steps = np.linspace(0, final_d, 9).tolist()
    pts = [dict(step=i, label="pi0" if i == 0 else "train", kl_k3=x * x,
                judge_reward=float(0.1 + _rl(np.array(x), 1, 0.5) + 0.01 * seed),
                proxy_reward=float(0.1 + 1.5 * x)) for i, x in enumerate(steps)]
    return pts + [dict(pts[-1], step=-1, label="final")]


def _write_sweep(root):
    entries = []
    for config, (method, family, final_d, selection, level, noise) in CONFIGS.items():
        for seed, shift in SEED_SHIFT.items():
            run_id = f"{config}_s{seed}"
            run = root / "runs" / run_id
            run.mkdir(parents=True)
            (run / "status.json").write_text(json.dumps({"status": "done"}))
            gold = level + SHARED + noise * OWN + shift
            (run / "samples.jsonl").write_text("".join(
                json.dumps(dict(prompt_id=i, prompt=f"prompt {i}", response=f"{config} {seed} {i}", proxy_reward=0.0,
                                judge_reward=float(g), judge="gold")) + "\n" for i, g in enumerate(gold)))
            (run / "train_log.jsonl").write_text("".join(
                json.dumps(dict(p, method=method, seed=seed, judge="gold")) + "\n"
                for p in _log(config, method, final_d, seed)))
            metrics = {"method": method, "seed": seed, "run_id": run_id, "config": config, "final": {}}
            if family:
                metrics["family"] = family
            if selection is not None:
                metrics["selection"] = {"split": "eval", "n": 16, "judge_reward": selection + shift, "kl": final_d ** 2}
            (run / "metrics.json").write_text(json.dumps(metrics))
            (run / "DONE").write_text("")
            entries.append(dict(run_id=run_id, method=method, seed=seed, config=config, status="done",
                                dir=f"runs/{run_id}"))
    (root / "index.json").write_text(json.dumps({"sweep": "frontier-fake", "runs": entries}))


def test_report_frontier_section_on_multi_family_sweep(tmp_path):
    _write_sweep(tmp_path / "sweep")
    md = build_report(tmp_path / "sweep", tmp_path / "out", n_boot=300).read_text()
    assert (tmp_path / "out" / "frontier.png").exists() and "](frontier.png)" in md
    assert (tmp_path / "out" / "reward_vs_kl.png").exists()

    fit_rows = [line for line in md.splitlines() if line.startswith("| family ")]
    ppo = next(line for line in fit_rows if line.startswith("| family ppo | judge_reward | rl |"))
    assert "alpha = 1.0" in ppo and "beta = 0.5" in ppo and "(n = 60)" in ppo  # 6 runs × (9 + final) points
    assert "too few points (n = 3 distinct d &lt; p+2 = 5)" in \
        next(line for line in fit_rows if line.startswith("| family dpo | judge_reward |"))
    assert "| ppo | rl | no peak in the measured range |" in md
    assert "| best_of_n | bon | 1.250 " in md  # d* = α/(2β) = 1.25 inside [0, 1.355]
    assert "| dpo | rl | no fit: too few points (n &lt; p+2) |" in md

    level = 1.4  # max over families of their smallest final sqrt KL: ppo_a's 1.4 (best-of-16's 1.355 is within)
    assert (f"Ranking at matched sqrt KL ≤ {level:.3f} by test gold reward: (1) ppo, (2) dpo, "
            "(3) best_of_n, (4) context_distilled.") in md
    assert "Pairs it cannot separate (paired 95% interval contains 0): ppo vs dpo." in md

    res = read_rows(tmp_path / "out" / "results.csv")
    front = res[res["evaluator"] == "frontier"]
    assert front.loc[front["metric"] == "matched_sqrt_kl", "value"].iloc[0] == pytest.approx(level)
    gold = front[front["metric"] == "matched_gold_reward"].set_index("config")
    assert gold.loc["best_of_n", "slice"] == f"rejection_sampling_n4|{frontier.SELECTED_EVAL}"  # not n16
    assert gold.loc["ppo", "slice"] == f"ppo_a|{frontier.SELECTED_EVAL}"  # ppo_b is past the level
    assert gold.loc["context_distilled", "slice"] == f"context_distilled|{frontier.SELECTED_TEST}"
    assert gold.loc["ppo", "value"] == pytest.approx(1.0 + SHARED.mean())
    assert gold.loc["ppo", "n"] == N_PROMPTS
    assert gold.loc["ppo", "ci_low"] < gold.loc["ppo", "value"] < gold.loc["ppo", "ci_high"]
    seeds = front[front["metric"] == "matched_gold_reward_seeds"].set_index("config")
    assert seeds.loc["ppo", "n"] == 3 and seeds.loc["ppo", "value"] == pytest.approx(1.0 + SHARED.mean())
    diff = front[front["metric"] == "matched_gold_diff"].set_index(["config", "slice"])
    assert diff.loc[("ppo", "vs:dpo"), "value"] == pytest.approx(0.02)
    assert diff.loc[("ppo", "vs:best_of_n"), "value"] == pytest.approx(0.7)
    assert diff.loc[("ppo", "vs:best_of_n"), "ci_low"] > 0
    assert diff.loc[("dpo", "vs:context_distilled"), "ci_low"] > 0
    family_fit = res[(res["evaluator"] == "kl_reward") & (res["config"] == "family:ppo")
                     & (res["slice"] == "judge_reward")].set_index("metric")
    assert family_fit.loc["rl.alpha", "ci_low"] <= 1.0 <= family_fit.loc["rl.alpha", "ci_high"]


def test_ranking_of_one_family_says_there_is_nothing_to_rank():
    samples = pd.DataFrame(dict(config="dpo_a", seed=[0, 0, 1, 1], prompt_id=[0, 1, 0, 1],
                                judge_reward=[1.0, 2.0, 3.0, 4.0]))
    chosen = pd.DataFrame(dict(family=["dpo"], config=["dpo_a"], final_d=[0.5], selected_on=[frontier.SELECTED_EVAL]))
    rows = pd.DataFrame(frontier.ranking_rows(samples, chosen, 0.5, n_boot=50))
    gold = rows[rows["metric"] == "matched_gold_reward"].iloc[0]
    assert gold["value"] == 2.5 and gold["n"] == 2  # prompt means over seeds: 2.0 and 3.0
    seeds = rows[rows["metric"] == "matched_gold_reward_seeds"].iloc[0]
    assert seeds["value"] == 2.5 and seeds["n"] == 2  # seed means 1.5 and 3.5
    text = ranking_blocks(rows)[-1].text
    assert text.startswith("Ranking at matched sqrt KL ≤ 0.500 by test gold reward: (1) dpo.")
    assert "nothing to rank it against" in text
