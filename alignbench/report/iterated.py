"""Report section: online iterated RLHF against static RLHF given the same labels (Bai et al. §4.5).

Per configuration of ``method=iterated_rlhf`` and round: the judge (gold) reward and the PM's
accuracy on the policy's own samples, overall and in the high-score region, at the round's end
(``metrics.json`` ``info.rounds``); then, for every total of labels that both regimes reached, the
final policy of the iterated configuration against the static one (``rounds=1``), with a measured
sentence on whether iterating kept the PM more accurate on its own policy's samples.

Intervals (95%): over the seeds of one configuration (``seed_interval``: Student-t below 5 seeds,
bootstrap from 5); with one seed, an accuracy gets the Clopper–Pearson interval over its sample
pairs and the judge reward the run's bootstrap over prompts (results.csv), each labelled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.stats import binomial_ci, seed_interval
from alignbench.report.load import Sweep
from alignbench.report.plots import save_figure
from alignbench.report.render import Heading, Note, Para, Table

METHOD = "iterated_rlhf"
ACCURACIES = (("pm_accuracy_own", "pm_own_pairs"), ("pm_accuracy_own_high", "pm_own_pairs_high"))
EXPLAIN = (
    "Online iterated RLHF (Bai et al. 2022 §4.5): each round the current policy samples two responses for M "
    "fresh prompts, the simulated annotator labels them (bought: the annotations cost), the PM is updated and "
    "the policy trained against it. Static RLHF is the same method with one round: every label bought at once "
    "on π0's samples. Round 0 is π0 with the shared proxy PM, before any label is bought. \"PM acc. own\" is the share of pairs of the measured policy's own samples (one prompt, "
    "judge rewards differing) that the PM the policy trains against orders like the judge; \"high\" keeps "
    "pairs whose two PM scores are both above the check's method.high_score_quantile of its PM scores "
    "(default the median), the region Bai found "
    "unreliable. Intervals: 95% over seeds (t below 5 seeds); with one seed, Clopper–Pearson over the sample "
    "pairs (accuracies) or the run's bootstrap over prompts (judge reward).")


def iterated_runs(sweep: Sweep) -> list:
    return [r for r in sweep.ok_runs if r.method == METHOD and r.metrics.get("info", {}).get("rounds") is not None]


def round_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per (configuration, seed, round): the round's end as recorded in info.rounds, after
    round 0, π0's point (the shared proxy PM on π0's own samples, before any label is bought)."""
    rows = []
    for run in iterated_runs(sweep):
        info = run.metrics["info"]
        pi0 = next((p for p in run.train_log if p.get("label") == "pi0"), None)
        start = [{"round": 0, "annotations_total": 0, **pi0}] if pi0 else []
        for rec in [*start, *info["rounds"]]:
            rows.append({"config": run.config, "seed": run.seed, "regime": info.get("regime"),
                         "labels_planned": info.get("labels_planned"), "round": rec["round"],
                         "labels": rec.get("annotations_total"), "judge_reward": rec.get("judge_reward"),
                         "pm_heldout_gold_accuracy": rec.get("pm_heldout_gold_accuracy"),
                         **{k: rec.get(k) for pair in ACCURACIES for k in pair}})
    return pd.DataFrame(rows)


def final_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per run: its final evaluation (judge reward with the run's own prompt interval, the
    own-sample accuracies under its last PM) and its regime and planned labels."""
    rows = []
    for run in iterated_runs(sweep):
        info, final = run.metrics["info"], run.metrics.get("final", {})
        lo = hi = np.nan
        if run.rows is not None and len(run.rows):
            own = run.rows[(run.rows["evaluator"] == "policy") & run.rows["metric"].str.endswith("_reward")
                           & (run.rows["metric"] != "proxy_reward")]
            if len(own):
                lo, hi = float(own["ci_low"].iloc[0]), float(own["ci_high"].iloc[0])
        rows.append({"config": run.config, "seed": run.seed, "regime": info.get("regime"),
                     "labels_planned": info.get("labels_planned"),
                     "labels": run.metrics.get("cost", {}).get("annotations"),
                     "judge_reward": final.get("judge_reward"), "judge_lo": lo, "judge_hi": hi,
                     **{k: final.get(k) for pair in ACCURACIES for k in pair}})
    return pd.DataFrame(rows)


def accuracy_interval(values, pairs) -> tuple[float, float, float, str]:
    """(mean, lo, hi, label) of an accuracy over the seeds of one configuration: ``seed_interval``
    with 2+ seeds; with one, Clopper–Pearson on acc·n credited pairs of n."""
    ok = [(v, n) for v, n in zip(values, pairs) if v is not None and not pd.isna(v) and n]
    if not ok:
        return np.nan, np.nan, np.nan, "no pairs"
    if len(ok) == 1:
        v, n = ok[0]
        lo, hi = binomial_ci(v * n, n)
        return v, lo, hi, f"pairs(n={int(n)})"
    return seed_interval([v for v, _ in ok])


def reward_interval(g: pd.DataFrame) -> tuple[float, float, float, str]:
    """(mean, lo, hi, label) of the judge reward: over seeds, or the one run's prompt bootstrap."""
    vals = g["judge_reward"].dropna()
    if len(vals) == 1:
        return float(vals.iloc[0]), float(g["judge_lo"].iloc[0]), float(g["judge_hi"].iloc[0]), "prompts"
    return seed_interval(vals.to_numpy()) if len(vals) else (np.nan, np.nan, np.nan, "none")


def summarise(g: pd.DataFrame, with_reward_ci: bool) -> dict:
    """Mean and interval of the judge reward and both own-sample accuracies over ``g``'s seeds."""
    out = {"seeds": int(g["seed"].nunique())}
    if with_reward_ci:
        out["judge_reward"] = reward_interval(g)
    else:
        vals = g["judge_reward"].dropna().to_numpy()
        out["judge_reward"] = seed_interval(vals) if len(vals) > 1 else \
            ((float(vals[0]), np.nan, np.nan, "one seed") if len(vals) else (np.nan,) * 3 + ("none",))
    for acc, n in ACCURACIES:
        out[acc] = accuracy_interval(g[acc].tolist(), g[n].tolist())
    return out


def _fmt(stat: tuple) -> str:
    mean, lo, hi, label = stat
    if pd.isna(mean):
        return "–"
    return f"{mean:.3f}" if pd.isna(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}] {label}"


def round_table(rounds: pd.DataFrame) -> Table | None:
    if rounds.empty:
        return None
    out = []
    for (config, rnd), g in rounds.groupby(["config", "round"], sort=True):
        s = summarise(g, with_reward_ci=False)
        out.append([config, g["regime"].iloc[0], str(rnd), f"{g['labels'].mean():.0f}", _fmt(s["judge_reward"]),
                    _fmt(s["pm_accuracy_own"]), _fmt(s["pm_accuracy_own_high"]), str(s["seeds"])])
    return Table(["configuration", "regime", "round", "labels so far", "judge reward", "PM acc. own",
                  "PM acc. own (high)", "seeds"], out)


def comparisons(final: pd.DataFrame) -> list[dict]:
    """Each iterated configuration against each static one with the same planned labels."""
    out = []
    for labels, g in final.groupby("labels_planned"):
        static = g[g["regime"] == "static"]
        for it_config, it in g[g["regime"] == "iterated"].groupby("config"):
            for st_config, st in static.groupby("config"):
                out.append({"labels": int(labels), "iterated": it_config, "static": st_config,
                            "it": summarise(it, True), "st": summarise(st, True)})
    return out


def separation(a: tuple, b: tuple) -> int | None:
    """1 when interval a lies above interval b, −1 below, 0 when they overlap, None when one is
    missing; a and b are (mean, lo, hi, label)."""
    if any(pd.isna(x) for x in (*a[:3], *b[:3])):
        return None
    return 1 if a[1] > b[2] else -1 if a[2] < b[1] else 0


def verdict(it: tuple, st: tuple, what: str) -> str:
    """A sentence from two (mean, lo, hi, label) intervals: which is higher when they separate."""
    side = separation(it, st)
    if side is None:
        return f"{what}: an interval is missing (too few seeds or pairs), so this sweep cannot compare them."
    if side:
        return (f"{what}: iterated {it[0]:.3f} {'>' if side > 0 else '<'} static {st[0]:.3f}, the 95% intervals "
                "do not overlap.")
    return (f"{what}: iterated {it[0]:.3f} vs static {st[0]:.3f}; the 95% intervals overlap, so this sweep "
            "does not separate them.")


CLAIM = {1: "Iterating kept the PM more accurate on its own policy's samples than static RLHF.",
         -1: "Iterating did not keep the PM more accurate on its own policy's samples: static RLHF's was "
             "more accurate.",
         0: "This sweep cannot say whether iterating kept the PM more accurate on its own policy's samples.",
         None: "This sweep cannot say whether iterating kept the PM more accurate on its own policy's samples."}


def comparison_blocks(comps: list[dict]) -> list:
    rows, paras = [], []
    for c in comps:
        for side in ("iterated", "static"):
            s = c["it" if side == "iterated" else "st"]
            rows.append([str(c["labels"]), side, c[side], _fmt(s["judge_reward"]), _fmt(s["pm_accuracy_own"]),
                         _fmt(s["pm_accuracy_own_high"]), str(s["seeds"])])
        it, st = c["it"], c["st"]
        acc = verdict(it["pm_accuracy_own"], st["pm_accuracy_own"], "PM accuracy on its own policy's samples")
        claim = CLAIM[separation(it["pm_accuracy_own"], st["pm_accuracy_own"])]
        paras.append(Para(f"{c['labels']} labels, {c['iterated']} vs {c['static']}: {claim} " + " ".join([
            acc, verdict(it["pm_accuracy_own_high"], st["pm_accuracy_own_high"], "In the high-score region"),
            verdict(it["judge_reward"], st["judge_reward"], "Judge reward")])))
    table = Table(["labels", "regime", "configuration", "judge reward (final)", "PM acc. own", "PM acc. own (high)",
                   "seeds"], rows)
    return [table, *paras]


def round_plot(rounds: pd.DataFrame, path: Path) -> Path | None:
    """Judge reward and PM accuracy on own samples against labels bought, per configuration (means
    over seeds; a static configuration is its one round)."""
    if rounds.empty:
        return None
    fig = Figure(figsize=(10, 4))
    ax_r, ax_a = fig.subplots(1, 2)
    for config, g in rounds.groupby("config"):
        m = g.groupby("labels")[["judge_reward", "pm_accuracy_own", "pm_accuracy_own_high"]].mean().reset_index()
        line = ax_r.plot(m["labels"], m["judge_reward"], marker="o", label=config)[0]
        ax_a.plot(m["labels"], m["pm_accuracy_own"], marker="o", color=line.get_color(), label=f"{config}")
        ax_a.plot(m["labels"], m["pm_accuracy_own_high"], marker="x", ls="--", color=line.get_color())
    ax_r.set(xlabel="labels bought", ylabel="judge reward", title="Judge reward at each round's end")
    ax_a.set(xlabel="labels bought", ylabel="PM accuracy on own samples",
             title="PM accuracy on own samples (dashed: high-score)")
    ax_r.legend(fontsize=7)
    return save_figure(fig, path)


def iterated_blocks(sweep: Sweep, out_dir: Path, figure) -> list:
    """The section's blocks (none when the sweep has no iterated_rlhf run); ``figure`` is build's
    ``_figure(out_dir, name, draw, caption, missing)``."""
    if not iterated_runs(sweep):
        return []
    rounds, comps = round_frame(sweep), comparisons(final_frame(sweep))
    blocks = [Heading("Iterated online RLHF"), Para(EXPLAIN), round_table(rounds)]
    blocks += comparison_blocks(comps) if comps else [
        Note("no iterated and static configuration share a total of labels: nothing to compare at equal labels.")]
    blocks += figure(out_dir, "iterated_rounds.png", lambda p: round_plot(rounds, p),
                     "Judge reward and PM accuracy on the policy's own samples per round", "no rounds recorded")
    return blocks
