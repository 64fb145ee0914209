"""Preference-model accuracy, model-free: the PM's scores are computed elsewhere and passed in.

Conventions shared by every function here:

* ``score_chosen[i]`` / ``score_rejected[i]`` are the PM scores of pair i's labelled-better and
  labelled-worse responses. The PM is right on a pair when it scores the chosen one higher.
* A tie (equal scores) counts as half right: the PM expresses no preference, so it is credited
  with the 0.5 a coin flip would get.
* Intervals are exact Clopper-Pearson (``stats.binomial_ci``; with ties, k may be fractional).
* Extra keyword arguments (``run=..., method="pm"`` ...) are stamped into every row.

Row layout (evaluator ``"pm_accuracy"``):

====================  ===========================  ==========================================
metric                slice                        value
====================  ===========================  ==========================================
accuracy_by_turn      "<subset>|<turn>"            accuracy; subset or "all", turn in
                                                   "1", "2", "3", "4+" or "all"
calib_observed        "bin=NN"                     frequency the higher-scored is the chosen
calib_predicted       "bin=NN"                     mean sigma(|delta|) in the bin
calib_gap             "bin=NN"                     mean |delta| in the bin
ece                   "all"                        expected calibration error
accuracy_above        "<threshold>"                accuracy where both scores > threshold
gold_accuracy         "all"                        PM agrees with the gold ordering
label_gold_agreement  "all"                        labels agree with the gold ordering
heldout_accuracy      "all", "helpful", "harmless"  accuracy against the labels (bootstrap CI)
heldout_gold_accuracy "all", "helpful", "harmless"  accuracy against gold (bootstrap CI)
====================  ===========================  ==========================================
"""
from __future__ import annotations

import numpy as np

from alignbench.eval.stats import bootstrap_ci, make_row, proportion_row

EVALUATOR = "pm_accuracy"
TURN_BUCKETS = ("1", "2", "3", "4+")


def _credit(score_chosen, score_rejected) -> np.ndarray:
    """1 where the chosen scores higher, 0 where lower, 0.5 on ties."""
    delta = np.asarray(score_chosen, float) - np.asarray(score_rejected, float)
    return np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5))


def _turn_bucket(n_turns: int) -> str:
    return str(n_turns) if n_turns < 4 else "4+"


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def accuracy_by_turn(score_chosen, score_rejected, n_turns, subsets, **ident) -> list[dict]:
    """Accuracy per (subset, Human-turn bucket), with "all" rows for both, skipping empty cells."""
    credit = _credit(score_chosen, score_rejected)
    turns = np.array([_turn_bucket(int(t)) for t in n_turns])
    subsets = np.asarray(subsets, dtype=str)
    rows = []
    for subset in ["all", *sorted(set(subsets))]:
        in_subset = np.ones(len(credit), bool) if subset == "all" else subsets == subset
        for turn in [*TURN_BUCKETS, "all"]:
            mask = in_subset if turn == "all" else in_subset & (turns == turn)
            if mask.any():
                rows.append(proportion_row(credit[mask].sum(), int(mask.sum()), evaluator=EVALUATOR,
                                           metric="accuracy_by_turn", slice=f"{subset}|{turn}", **ident))
    return rows


def calibration(score_chosen, score_rejected, n_bins: int = 10, **ident) -> tuple[list[dict], float]:
    """Calibration over quantile bins of |delta| = |r_A - r_B|.

    Per bin: the observed frequency that the higher-scored response is the chosen one (ties half),
    with its exact interval, against the predicted mean sigma(|delta|). Returns (rows, ece) with
    ece = sum_b (n_b / N) |observed_b - predicted_b|.
    """
    higher_is_chosen = _credit(score_chosen, score_rejected)  # the chosen scores higher <=> right
    gap = np.abs(np.asarray(score_chosen, float) - np.asarray(score_rejected, float))
    if gap.size == 0:
        return [], float("nan")
    edges = np.unique(np.quantile(gap, np.linspace(0, 1, n_bins + 1)))
    bins = np.clip(np.searchsorted(edges, gap, side="right") - 1, 0, max(len(edges) - 2, 0))
    rows, ece = [], 0.0
    for b in np.unique(bins):
        mask = bins == b
        n = int(mask.sum())
        observed, predicted = higher_is_chosen[mask].mean(), _sigmoid(gap[mask]).mean()
        ece += n / gap.size * abs(observed - predicted)
        ident_b = dict(evaluator=EVALUATOR, slice=f"bin={b:02d}", **ident)
        rows.append(proportion_row(higher_is_chosen[mask].sum(), n, metric="calib_observed", **ident_b))
        rows.append(make_row(metric="calib_predicted", value=float(predicted), n=n, **ident_b))
        rows.append(make_row(metric="calib_gap", value=float(gap[mask].mean()), n=n, **ident_b))
    rows.append(make_row(evaluator=EVALUATOR, metric="ece", slice="all", value=float(ece), n=int(gap.size),
                         **ident))
    return rows, float(ece)


def threshold_accuracy(score_chosen, score_rejected, thresholds, **ident) -> list[dict]:
    """Accuracy on the pairs where BOTH scores exceed each threshold (value NaN if none do)."""
    sc, sr = np.asarray(score_chosen, float), np.asarray(score_rejected, float)
    credit = _credit(sc, sr)
    rows = []
    for t in thresholds:
        mask = (sc > t) & (sr > t)
        rows.append(proportion_row(credit[mask].sum(), int(mask.sum()), evaluator=EVALUATOR,
                                   metric="accuracy_above", slice=f"{float(t):g}", **ident))
    return rows


def gold_agreement(score_chosen, score_rejected, gold_chosen, gold_rejected, **ident) -> list[dict]:
    """On hh_synth: how often the PM (``gold_accuracy``) and the labels themselves
    (``label_gold_agreement``) order a pair as the gold reward does.

    Pairs the gold reward ties are left out of both (they have no gold ordering); ``n`` counts
    the pairs used. PM ties count half.
    """
    gold_delta = np.asarray(gold_chosen, float) - np.asarray(gold_rejected, float)
    ordered = gold_delta != 0
    n = int(ordered.sum())
    pm_agrees = gold_credit(score_chosen, score_rejected, gold_chosen, gold_rejected)[ordered]
    gold_says_chosen = gold_delta[ordered] > 0
    common = dict(evaluator=EVALUATOR, slice="all", **ident)
    return [proportion_row(float(pm_agrees.sum()), n, metric="gold_accuracy", **common),
            proportion_row(float(gold_says_chosen.sum()), n, metric="label_gold_agreement", **common)]


def gold_credit(score_chosen, score_rejected, gold_chosen, gold_rejected) -> np.ndarray:
    """Per pair: 1 where the PM orders the two responses as the gold reward does, 0 where it
    reverses them, 0.5 on a PM tie, NaN where gold ties (no gold order)."""
    gold_delta = np.asarray(gold_chosen, float) - np.asarray(gold_rejected, float)
    pm_credit = _credit(score_chosen, score_rejected)
    agrees = np.where(pm_credit == 0.5, 0.5, (pm_credit == 1.0) == (gold_delta > 0)).astype(float)
    return np.where(gold_delta == 0, np.nan, agrees)


def heldout_credit(score_chosen, score_rejected, groups, gold_chosen=None, gold_rejected=None) -> dict:
    """Per-pair credit on a held-out set, by (metric, group): ``heldout_accuracy`` against the
    labels and, given gold rewards, ``heldout_gold_accuracy`` against gold (gold ties dropped); group
    "all" and each value of ``groups`` (e.g. helpful / harmless)."""
    groups = np.asarray(groups, dtype=str)
    credits = {"heldout_accuracy": _credit(score_chosen, score_rejected)}
    if gold_chosen is not None:
        credits["heldout_gold_accuracy"] = gold_credit(score_chosen, score_rejected, gold_chosen, gold_rejected)
    out = {}
    for metric, credit in credits.items():
        for group in ["all", *sorted(set(groups))]:
            part = credit if group == "all" else credit[groups == group]
            out[(metric, group)] = part[~np.isnan(part)]
    return out


def heldout_rows(credits: dict, n_boot: int, boot_seed: int, **ident) -> list[dict]:
    """One row per ``heldout_credit`` entry: the mean credit with a seeded percentile bootstrap over
    pairs (slice = the group)."""
    rows = []
    for (metric, group), credit in credits.items():
        value, lo, hi = bootstrap_ci(credit, n_boot=n_boot, seed=boot_seed)
        rows.append(make_row(evaluator=EVALUATOR, metric=metric, slice=group, value=value, ci_low=lo, ci_high=hi,
                             n=int(credit.size), **ident))
    return rows
