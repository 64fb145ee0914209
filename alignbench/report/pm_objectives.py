"""The report's "PM objectives" section: PM variants (``stages.pm.objective``, ``harmless_weight``,
``judgements``, hh_synth's ``rank_k``) compared on one common held-out set, the pairwise test
comparisons (``alignbench.stages.preference.build_pm``).

- Label efficiency: held-out accuracy (against gold on hh_synth, else against the labels) by
  objective × human judgements (one judgement = one prompt labelled: a pair, or a ranking of K),
  the InstructGPT ranking PM against pairwise, pointwise-classifier and LM-score baselines.
- Helpful/harmless weighting: accuracy on the helpful and the harmless comparisons against λ.

Each run's metrics.json ``pm`` names its proxy PM (``label``, the ``config`` of the PM rows) and
settings; intervals are the PM rows' percentile bootstraps over held-out pairs. The section
appears only when the sweep holds more than one PM variant.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL
from alignbench.report.load import Sweep
from alignbench.report.plots import save_figure
from alignbench.report.render import Heading, Note, Para, Table
from alignbench.report.tables import fmt_ci, fmt_n

VARIANT_COLUMNS = ["label", "objective", "rank_k", "harmless_weight", "judgements"]
GROUPS = ("all", "helpful", "harmless")

EXPLAIN = (
    "Every PM is scored on the same held-out comparisons: the pairwise test split (for ranked hh_synth data, "
    "the pairwise data regenerated on the same prompts). Accuracy is against the gold reward on hh_synth (pairs "
    "gold ties are left out) and against the labels on real HH; a PM tie counts half. Intervals: 95% "
    "percentile bootstrap over held-out pairs (across stage seeds, the seed interval). Judgements: prompts "
    "a human labelled for the PM, one comparison of 2 or one ranking of K (stages.pm.judgements). Objectives: "
    "pairwise = −log σ(r_c − r_r) per pair (ranked data: every sub-pair its own element); ranking = "
    "InstructGPT's loss, a prompt's C(K,2) pairs in one element scaled by 1/C(K,2); classifier = pointwise "
    "good/bad BCE; lm = the summed log-probability of the response under the PM's init LM (no training).")


def variant_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per proxy-PM variant (its ``label``) of the usable runs' metrics.json ``pm``, with
    the judgements it trained on (``judgements_used``)."""
    recs = {}
    for run in sweep.ok_runs:
        pm = run.metrics.get("pm") if isinstance(run.metrics, dict) else None
        if isinstance(pm, dict) and pm.get("label"):
            recs[pm["label"]] = {"label": pm["label"], "objective": pm.get("objective", "pairwise"),
                                 "rank_k": pm.get("rank_k") or 2, "harmless_weight": pm.get("harmless_weight", 1.0),
                                 "judgements": pm.get("judgements_used")}
    return pd.DataFrame(list(recs.values()), columns=VARIANT_COLUMNS)


def accuracy_frame(agg: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """Variants × groups: held-out accuracy against gold where recorded, else against the labels
    (``against``), with its interval and pairs."""
    rows = agg[(agg["evaluator"] == PM_EVAL) & agg["metric"].isin(["heldout_gold_accuracy", "heldout_accuracy"])]
    gold = rows[rows["metric"] == "heldout_gold_accuracy"]
    rows = pd.concat([gold, rows[(rows["metric"] == "heldout_accuracy") & ~rows["config"].isin(gold["config"])]])
    rows = rows.assign(against=np.where(rows["metric"] == "heldout_gold_accuracy", "gold", "labels"))
    rows = rows.rename(columns={"config": "label", "slice": "group"})[
        ["label", "group", "against", "value", "ci_low", "ci_high", "n", "interval"]]
    return variants.merge(rows, on="label")


def _cell(r) -> str:
    return f"{fmt_ci(r.value, r.ci_low, r.ci_high)} n={fmt_n(r.n)}"


def efficiency_table(acc: pd.DataFrame) -> Table | None:
    part = acc[acc["group"] == "all"]
    part = part.assign(other_weight=part["harmless_weight"] != 1.0).sort_values(
        ["other_weight", "objective", "rank_k", "judgements", "harmless_weight"])
    if part.empty:
        return None
    rows = [[r.objective, fmt_n(r.rank_k), f"{r.harmless_weight:g}", fmt_n(r.judgements), r.against, _cell(r),
             r.label] for r in part.itertuples()]
    return Table(["objective", "K", "λ", "judgements", "against", "held-out accuracy [95% CI]", "PM"], rows)


def efficiency_findings(acc: pd.DataFrame) -> list[str]:
    """At each judgement count held by two or more objectives (λ = 1): the best one, and whether its
    interval clears every other's (else the view cannot tell them apart)."""
    part = acc[(acc["group"] == "all") & (acc["harmless_weight"] == 1.0)]
    out = []
    for n, g in part.groupby("judgements", sort=True):
        if g["objective"].nunique() < 2:
            continue
        g = g.sort_values("value", ascending=False)
        best, rest = g.iloc[0], g.iloc[1:]
        name = f"{best.objective} (K={fmt_n(best.rank_k)})"
        if (best.ci_low > rest["ci_high"]).all():
            out.append(f"At {fmt_n(n)} judgements, {name} is the most accurate PM ({best.value:.3f}); its interval "
                       "lies above every other objective's.")
        else:
            close = ", ".join(sorted(set(rest[rest["ci_high"] >= best.ci_low]["objective"])))
            out.append(f"At {fmt_n(n)} judgements, {name} scores highest ({best.value:.3f}), but its interval "
                       f"overlaps {close}'s: this sweep cannot tell them apart.")
    return out


def efficiency_plot(acc: pd.DataFrame, path: Path) -> Path | None:
    """Held-out accuracy against judgements, a line per trained (objective, K) at λ = 1 (slightly
    offset so the intervals stay apart); untrained PMs (lm: no judgements) as a level with its band."""
    part = acc[(acc["group"] == "all") & (acc["harmless_weight"] == 1.0)].dropna(subset=["judgements", "value"])
    if part.empty:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    trained, untrained = part[part["judgements"] > 0], part[part["judgements"] <= 0]
    lines = list(trained.groupby(["objective", "rank_k"], sort=True))
    for i, ((objective, k), g) in enumerate(lines):
        g = g.sort_values("judgements")
        yerr = np.vstack([(g["value"] - g["ci_low"]).clip(lower=0), (g["ci_high"] - g["value"]).clip(lower=0)])
        x = g["judgements"].astype(float) * 1.03 ** (i - (len(lines) - 1) / 2)
        ax.errorbar(x, g["value"], yerr=np.nan_to_num(yerr), marker="o", capsize=3, label=f"{objective}, K={k}")
    for r in untrained.itertuples():
        ax.axhline(r.value, color="grey", ls="--", lw=1, label=f"{r.objective} (no judgements)")
        ax.axhspan(r.ci_low, r.ci_high, color="grey", alpha=0.15)
    ax.set_xscale("log")
    ticks = sorted(trained["judgements"].unique())
    ax.set_xticks(ticks, [fmt_n(t) for t in ticks])
    ax.minorticks_off()
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="human judgements (prompts labelled)", ylabel=f"held-out accuracy vs {part['against'].iloc[0]}",
           title="PM label efficiency (95% CI)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def weight_table(acc: pd.DataFrame) -> Table | None:
    """Helpful and harmless accuracy per λ, for each (objective, K, judgements) swept over λ."""
    part = acc[acc["group"].isin(["helpful", "harmless"])]
    swept = part.groupby(["objective", "rank_k", "judgements"], dropna=False)["harmless_weight"].transform("nunique")
    part = part[swept > 1]
    if part.empty:
        return None
    rows = []
    for (objective, k, n, lam), g in part.groupby(["objective", "rank_k", "judgements", "harmless_weight"],
                                                  sort=True, dropna=False):
        cells = {r.group: _cell(r) for r in g.itertuples()}
        rows.append([objective, fmt_n(k), fmt_n(n), f"{lam:g}", g["against"].iloc[0],
                     cells.get("helpful", "–"), cells.get("harmless", "–")])
    return Table(["objective", "K", "judgements", "λ", "against", "helpful accuracy [95% CI]",
                  "harmless accuracy [95% CI]"], rows)


def weight_plot(acc: pd.DataFrame, path: Path) -> Path | None:
    """Helpful and harmless held-out accuracy against λ (one line per subset and PM family)."""
    part = acc[acc["group"].isin(["helpful", "harmless"])]
    swept = part.groupby(["objective", "rank_k", "judgements"], dropna=False)["harmless_weight"].transform("nunique")
    part = part[swept > 1]
    if part.empty:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    families = part.groupby(["objective", "rank_k", "judgements"], dropna=False).ngroups
    for (objective, k, n, group), g in part.groupby(["objective", "rank_k", "judgements", "group"], sort=True,
                                                    dropna=False):
        g = g.sort_values("harmless_weight")
        yerr = np.vstack([(g["value"] - g["ci_low"]).clip(lower=0), (g["ci_high"] - g["value"]).clip(lower=0)])
        label = group if families == 1 else f"{objective} K={k} n={fmt_n(n)}: {group}"
        ax.errorbar(g["harmless_weight"], g["value"], yerr=np.nan_to_num(yerr), marker="o", capsize=3, label=label,
                    ls="-" if group == "helpful" else "--")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="λ (stages.pm.harmless_weight)", ylabel=f"held-out accuracy vs {part['against'].iloc[0]}",
           title="PM accuracy on helpful and harmless comparisons vs λ (95% CI)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def pm_objective_blocks(sweep: Sweep, agg: pd.DataFrame, out_dir: Path, figure) -> list:
    """The section's blocks, or none when the sweep has a single PM variant. ``figure``: build's
    ``_figure`` helper."""
    variants = variant_frame(sweep)
    if len(variants) < 2:
        return []
    acc = accuracy_frame(agg, variants)
    if acc.empty:
        return [Heading("PM objectives"), Note("no held-out accuracy rows for the PM variants (runs from before them).")]
    effic, weights = efficiency_table(acc), weight_table(acc)
    return [Heading("PM objectives"), Para(EXPLAIN),
            *([effic] if effic is not None else []),
            *(Para(f) for f in efficiency_findings(acc)),
            *figure(out_dir, "pm_label_efficiency.png", lambda p: efficiency_plot(acc, p),
                    "Held-out PM accuracy against human judgements per objective (λ = 1)", "no λ = 1 variant"),
            *([weights] if weights is not None else [Note("no table: no PM family is swept over λ.")]),
            *figure(out_dir, "pm_harmless_weight.png", lambda p: weight_plot(acc, p),
                    "Held-out accuracy on helpful and harmless comparisons against λ", "no PM family is swept over λ")]
