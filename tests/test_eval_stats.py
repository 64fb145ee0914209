"""Model-free evaluation: statistics, PM accuracy, win rates / Elo, KL-reward fits. Known answers only."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from alignbench.eval import kl_reward, pm_accuracy, win_rate
from alignbench.eval.stats import COLUMNS, binomial_ci, bootstrap_ci, make_row, read_rows, write_rows


def by(rows, **match):
    hits = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


def calibrated_pairs(n=200_000, scale=1.5, seed=0):
    """Scores r_A, r_B with A chosen with probability sigma(r_A - r_B): a perfectly calibrated PM."""
    rng = np.random.default_rng(seed)
    ra, rb = rng.normal(0, scale, n), rng.normal(0, scale, n)
    a_chosen = rng.random(n) < 1 / (1 + np.exp(-(ra - rb)))
    return np.where(a_chosen, ra, rb), np.where(a_chosen, rb, ra)


# --- stats -------------------------------------------------------------------------------------

def test_make_row_has_exactly_the_columns():
    row = make_row(method="dpo", metric="acc", value=0.5)
    assert tuple(row) == COLUMNS
    assert row["method"] == "dpo" and math.isnan(row["ci_low"]) and row["run"] is None
    with pytest.raises(TypeError):
        make_row(colour="red")


@pytest.mark.parametrize("k,n", [(0, 10), (3, 4), (30, 40), (57, 100), (100, 100), (1, 1)])
def test_binomial_ci_is_clopper_pearson(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert binomial_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_binomial_ci_empty_is_nan():
    assert all(math.isnan(x) for x in binomial_ci(0, 0))


def test_bootstrap_ci_seeded_and_sensible():
    x = np.random.default_rng(1).normal(3.0, 2.0, 2000)
    point, lo, hi = bootstrap_ci(x, seed=7)
    assert (point, lo, hi) == bootstrap_ci(x, seed=7)
    assert point == pytest.approx(x.mean())
    assert lo < point < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(x, seed=8) != (point, lo, hi)
    assert bootstrap_ci(x, stat="median")[0] == pytest.approx(np.median(x))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_write_read_rows_round_trip_atomic(tmp_path):
    rows = [make_row(sweep="s", run="r1", method="dpo", seed=0, evaluator="pm_accuracy",
                     metric="accuracy_by_turn", slice="1", value=0.7, ci_low=0.6, ci_high=0.8, n=100),
            make_row(run="pm-abc", method="pm", evaluator="e", metric="m", slice="", value=1.5)]
    path = write_rows(tmp_path / "out" / "results.csv", rows)
    write_rows(path, rows)  # overwriting works
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]  # no temp file left behind
    df = read_rows(path)
    assert list(df.columns) == list(COLUMNS)
    assert df.loc[0, "slice"] == "1" and df.loc[1, "slice"] == "" and df.loc[1, "sweep"] == ""
    assert df.loc[0, "seed"] == 0 and pd.isna(df.loc[1, "seed"]) and df.loc[0, "n"] == 100
    assert df.loc[0, "value"] == 0.7 and math.isnan(df.loc[1, "ci_low"])


# --- PM accuracy --------------------------------------------------------------------------------

def test_accuracy_by_turn_known_counts_and_ties_half():
    # turn 1: right, right, wrong, tie -> 2.5/4; turn 5 ("4+"): right, wrong -> 1/2
    sc = [2, 2, 0, 1, 3, 0]
    sr = [1, 1, 1, 1, 0, 3]
    turns = [1, 1, 1, 1, 5, 6]
    subsets = ["h", "h", "x", "x", "h", "h"]
    rows = pm_accuracy.accuracy_by_turn(sc, sr, turns, subsets, run="pm-1", method="pm")
    r = by(rows, slice="all|1")
    assert (r["value"], r["n"], r["run"], r["method"]) == (2.5 / 4, 4, "pm-1", "pm")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(binomial_ci(2.5, 4))
    assert by(rows, slice="all|4+")["value"] == 0.5
    assert by(rows, slice="all|all")["value"] == pytest.approx(3.5 / 6)
    assert by(rows, slice="h|1")["value"] == 1.0 and by(rows, slice="x|1")["value"] == 0.25
    assert not [r for r in rows if r["slice"] in ("all|2", "x|4+")]  # empty cells are skipped


def test_calibration_perfect_vs_overconfident():
    sc, sr = calibrated_pairs()
    rows, ece = pm_accuracy.calibration(sc, sr, n_bins=10)
    assert ece < 0.03
    assert by(rows, metric="ece")["value"] == ece
    observed = [r for r in rows if r["metric"] == "calib_observed"]
    assert len(observed) == 10 and sum(r["n"] for r in observed) == sc.size
    for r in observed:  # each bin's interval covers its prediction (loosely: 3 CI half-widths)
        pred = by(rows, metric="calib_predicted", slice=r["slice"])["value"]
        assert abs(r["value"] - pred) < 3 * (r["ci_high"] - r["ci_low"])
    _, ece_x3 = pm_accuracy.calibration(3 * sc, 3 * sr, n_bins=10)
    assert ece_x3 > 0.08 and ece_x3 > 4 * ece


def test_calibration_accuracy_rises_with_gap():
    sc, sr = calibrated_pairs(n=50_000)
    rows, _ = pm_accuracy.calibration(sc, sr, n_bins=5)
    observed = [r["value"] for r in sorted(rows, key=lambda r: r["slice"]) if r["metric"] == "calib_observed"]
    assert observed == sorted(observed)


def test_threshold_accuracy_known():
    sc = np.array([3.0, 3.0, 0.5, 2.0])
    sr = np.array([2.0, 4.0, 0.0, -1.0])
    rows = pm_accuracy.threshold_accuracy(sc, sr, [-2, 1, 10])
    assert by(rows, slice="-2")["value"] == 0.75 and by(rows, slice="-2")["n"] == 4
    assert by(rows, slice="1")["value"] == 0.5 and by(rows, slice="1")["n"] == 2
    assert by(rows, slice="10")["n"] == 0 and math.isnan(by(rows, slice="10")["value"])


def test_gold_agreement_known():
    sc, sr = [1, 1, 0, 5, 2], [0, 2, 0, 1, 1]  # PM: right, wrong, tie, right, right
    gc, gr = [1, 0, 1, 3, 3], [0, 1, 0, 3, 2]  # gold: chosen better, worse, better, tie (left out), better
    rows = pm_accuracy.gold_agreement(sc, sr, gc, gr)
    gold = by(rows, metric="gold_accuracy")
    # PM vs gold on the 4 ordered pairs: agrees, agrees (both say rejected better), tie (1/2), agrees
    assert gold["n"] == 4 and gold["value"] == pytest.approx(3.5 / 4)
    assert by(rows, metric="label_gold_agreement")["value"] == 0.75


# --- win rates and Elo --------------------------------------------------------------------------

def test_win_rates_known_counts():
    # 30 wins, 10 losses, 10 ties for "new" against "base" over 50 prompts
    new = np.array([1.0] * 30 + [-1.0] * 10 + [0.0] * 10)
    rows = win_rate.win_rates({"base": np.zeros(50), "new": new}, baseline="base", seed=3)
    w = by(rows, method="new", slice="vs:base", metric="win_rate")
    assert w["value"] == pytest.approx(0.7) and w["n"] == 50
    assert w["ci_low"] < 0.7 < w["ci_high"]
    d = by(rows, method="new", slice="vs:base", metric="win_rate_decisive")
    ref = sps.binomtest(30, 40).proportion_ci(method="exact")
    assert d["value"] == 0.75 and d["n"] == 40
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert by(rows, method="new", slice="vs:base", metric="tie_rate")["value"] == pytest.approx(0.2)
    assert by(rows, method="base", slice="vs:new", metric="win_rate")["value"] == pytest.approx(0.3)
    assert rows == win_rate.win_rates({"base": np.zeros(50), "new": new}, baseline="base", seed=3)


def test_win_rates_tie_eps_and_nan():
    rows = win_rate.win_rates({"a": [0.05, 1.0, np.nan], "b": [0.0, 0.0, 0.0]}, "b", tie_eps=0.1)
    w = by(rows, method="a", metric="win_rate")
    assert w["n"] == 2 and w["value"] == 0.75  # one tie (within eps), one win; the NaN prompt dropped


def test_identical_texts_tie_whatever_their_scores():
    """Scores 1e-7 apart (batch-padding noise on the same text): with the texts, every prompt ties;
    a different text still wins on its score; an unknown text (None) falls back to the score."""
    a, b = [0.5] * 4, [0.5 + 1e-7] * 4
    texts = {"a": ["x", "y", "z", "w"], "b": ["x", "y", "z", "w"]}
    rows = win_rate.win_rates({"a": a, "b": b}, "a", texts=texts)
    assert by(rows, method="b", metric="tie_rate")["value"] == 1.0
    assert by(rows, method="b", metric="win_rate")["value"] == 0.5
    assert by(win_rate.win_rates({"a": a, "b": b}, "a"), method="b", metric="tie_rate")["value"] == 0.0
    mixed = {"a": ["x", "y", None, "w"], "b": ["x", "other", None, "w"]}
    assert by(win_rate.win_rates({"a": a, "b": b}, "a", texts=mixed), method="b", metric="win_rate")["value"] == 0.75
    assert win_rate.pairwise_counts({"a": a, "b": b}, texts=texts) == [("a", "b", 0, 0, 4)]
    elo = {r["method"]: r["value"] for r in win_rate.elo_rows({"a": a, "b": b}, "a", n_boot=20, texts=texts)}
    assert elo["b"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="texts"):
        win_rate.win_rates({"a": a, "b": b}, "a", texts={"a": ["x"], "b": ["x"] * 4})


def test_win_rates_unequal_lengths_rejected():
    with pytest.raises(ValueError):
        win_rate.win_rates({"a": [1, 2], "b": [1]}, "a")


def test_fit_elo_recovers_known_strengths():
    elo_true = {"base": 0.0, "dpo": 150.0, "ppo": 300.0, "bad": -200.0}
    results = []
    names = sorted(elo_true)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = win_rate.win_probability(elo_true[a], elo_true[b])
            results.append((a, b, 1000 * p, 1000 * (1 - p), 0))
    fitted = win_rate.fit_elo(results, anchor="base")
    for m in names:
        assert fitted[m] == pytest.approx(elo_true[m], abs=0.5)
    centered = win_rate.fit_elo(results)
    assert np.mean(list(centered.values())) == pytest.approx(1000)
    assert centered["ppo"] - centered["bad"] == pytest.approx(500, abs=0.5)
    matrix = pd.DataFrame(0.0, index=names, columns=names)
    for a, b, wa, wb, _ in results:
        matrix.loc[a, b], matrix.loc[b, a] = wa, wb
    assert win_rate.fit_elo(matrix, anchor="base") == pytest.approx(fitted, abs=1e-6)


def test_fit_elo_from_sampled_judge_scores():
    # good - base ~ 1 + Logistic noise, so P(good beats base) = sigma(1): a strength gap of 1 logit
    n = 20_000
    scores = {"base": np.zeros(n), "good": 1.0 + np.random.default_rng(0).logistic(size=n)}
    elo = win_rate.fit_elo(win_rate.pairwise_counts(scores), anchor="base")
    assert elo["good"] == pytest.approx(win_rate.ELO_SCALE * 1.0, rel=0.05)
    rows = win_rate.elo_rows(scores, "base", n_boot=50)
    good = by(rows, method="good")
    assert good["ci_low"] < good["value"] < good["ci_high"] and good["value"] == pytest.approx(elo["good"])


def test_fit_elo_finite_when_one_side_always_wins():
    elo = win_rate.fit_elo([("a", "b", 50, 0, 0)], anchor="b")
    assert np.isfinite(elo["a"]) and elo["a"] > 400


# --- KL vs reward -------------------------------------------------------------------------------

def test_best_of_n_kl_values():
    assert kl_reward.best_of_n_kl_bound(1) == 0.0
    assert kl_reward.best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_reward.best_of_n_kl_bound(4) == pytest.approx(0.636294361)
    assert kl_reward.best_of_n_kl_bound(1000) == pytest.approx(math.log(1000) - 0.999)


def test_fits_recover_known_parameters():
    d = np.linspace(0, 6, 40)  # includes d = 0
    bon = kl_reward.fit_bon(d, 0.3 + d * (1.2 - 0.15 * d), offset=0.3)
    assert bon.params == pytest.approx({"alpha": 1.2, "beta": 0.15}) and bon.r2 == pytest.approx(1.0)
    assert bon(np.array([2.0])) == pytest.approx([0.3 + 2 * (1.2 - 0.3)])
    log_d = np.log(np.where(d > 0, d, 1))
    rl = kl_reward.fit_rl(d, d * (0.8 - 0.25 * log_d))
    assert rl.params == pytest.approx({"alpha": 0.8, "beta": 0.25}) and rl.r2 == pytest.approx(1.0)
    assert np.isfinite(rl(d)).all() and rl(np.array([0.0]))[0] == 0.0
    lin = kl_reward.fit_linear(d, 2.0 * d - 1.0)
    assert lin.params == pytest.approx({"slope": 2.0, "intercept": -1.0}) and lin.r2 == pytest.approx(1.0)
    assert math.isnan(kl_reward.fit_bon([1.0], [1.0]).r2)  # too few points


def test_kl_reward_rows_offset_fits_and_best_of_n():
    d = np.linspace(0, 3, 25)
    points = [dict(method="ppo", seed=0, step=i, label="train", kl_k3=float(x * x),
                   proxy_reward=float(0.5 + x * (1.0 - 0.2 * x)), judge_reward=float(x), judge="gold")
              for i, x in enumerate(d)]
    points += [dict(method="bon", seed=1, step=0, label=f"n={n}", kl_k3=kl_reward.best_of_n_kl_bound(n),
                    proxy_reward=0.1 * n, judge_reward=None) for n in (1, 2, 4)]
    rows = kl_reward.kl_reward_rows(points, sweep="s")
    ppo = {r["metric"]: r["value"] for r in rows if r["method"] == "ppo" and r["slice"] == "proxy_reward"}
    assert ppo["offset"] == 0.5
    assert (ppo["bon.alpha"], ppo["bon.beta"], ppo["bon.r2"]) == pytest.approx((1.0, 0.2, 1.0))
    assert by(rows, method="bon", metric="kl_best_of_n", slice="n=4")["value"] == pytest.approx(0.636294361)
    assert by(rows, method="bon", metric="kl_best_of_n_bound", slice="n=4")["value"] == pytest.approx(0.636294361)
    assert not [r for r in rows if r["method"] == "bon" and r["slice"] == "judge_reward"]  # no judge values
    assert all(r["sweep"] == "s" for r in rows)
