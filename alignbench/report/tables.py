"""Tables of the report, built from the aggregated and derived frames. Each returns a ``Table``, or
None when it has nothing to show (the caller adds a note)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL, TURN_BUCKETS
from alignbench.eval.stats import seed_interval
from alignbench.report.load import Sweep
from alignbench.report.render import Table


def fmt(value, digits: int = 3) -> str:
    if value is None or pd.isna(value):
        return "–"
    if isinstance(value, (int, np.integer)) or abs(float(value)) >= 1000:
        return f"{float(value):,.0f}"
    return f"{float(value):.{digits}f}"


def fmt_ci(value, lo, hi, digits: int = 3) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_n(n) -> str:
    return "–" if n is None or pd.isna(n) else str(int(n))


def select(df: pd.DataFrame, evaluator: str, metric: str | None = None) -> pd.DataFrame:
    mask = df["evaluator"] == evaluator
    return df[mask & (df["metric"] == metric)] if metric else df[mask]


def runs_table(sweep: Sweep, cost: pd.DataFrame) -> Table:
    by_run = cost.set_index("run")
    rows = []
    for r in sweep.runs:
        c = by_run.loc[r.run_id].to_dict() if r.run_id in by_run.index else {}
        rows.append([r.run_id, r.config, r.method, fmt_n(r.seed), r.mark,
                     fmt_ci(c.get("judge_reward"), c.get("ci_low"), c.get("ci_high")),
                     fmt(c.get("wall_s"), 1), fmt(c.get("measure_s"), 1), fmt_flops(c.get("flops")),
                     fmt(c.get("tokens_generated"))])
    return Table(["run", "configuration", "method", "seed", "status", "judge reward (mean [95% CI])", "wall s",
                  "measure s", "FLOPs", "tokens generated"], rows)


def fmt_flops(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.3g}"


def fmt_seeds(values) -> str:
    """Mean over a configuration's seeds with its interval (``seed_interval``) and range."""
    x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna().to_numpy(float)
    if x.size == 0:
        return "–"
    if x.size == 1:
        return f"{fmt(x[0])} (1 run)"
    value, lo, hi, label = seed_interval(x)
    return f"{fmt_ci(value, lo, hi)} {label}, range {fmt(x.min())}–{fmt(x.max())}"


def _truncation(agg: pd.DataFrame, cost: pd.DataFrame, config: str) -> str:
    """From the policy rows' ``truncation_rate`` (mean over seeds), else the samples' ``finished``."""
    rows = select(agg, "policy", "truncation_rate")
    rows = rows[rows["config"] == config]
    if not rows.empty:
        return fmt(rows["value"].iloc[0])
    return fmt(cost.loc[cost["config"] == config, "truncation_rate"].mean())


def config_table(sweep: Sweep, cost: pd.DataFrame, derived: pd.DataFrame, agg: pd.DataFrame,
                 baseline: str) -> Table:
    """One row per configuration: its seeds combined, never other configurations of its method."""
    wins = select(derived, "win_rate", "win_rate")
    wins = wins[wins["slice"] == f"vs:{baseline}"].set_index("config")
    elo = select(derived, "win_rate", "elo").set_index("config")
    gains = {m: select(derived, "gain", m).set_index("config") for m in ("proxy_gain", "judge_gain")}
    rows = []
    for config in sorted({r.config for r in sweep.runs}):
        runs = [r for r in sweep.runs if r.config == config]
        c = cost[cost["config"] == config]
        w = wins.loc[config] if config in wins.index else {}
        e = elo.loc[config] if config in elo.index else {}
        g = {k: (v.loc[config] if config in v.index else {}) for k, v in gains.items()}
        rows.append([config, runs[0].method, f"{sum(r.ok for r in runs)}/{len(runs)}", fmt_seeds(c["judge_reward"]),
                     *[fmt_ci(g[k].get("value"), g[k].get("ci_low"), g[k].get("ci_high")) for k in gains],
                     fmt_ci(w.get("value"), w.get("ci_low"), w.get("ci_high")),
                     fmt_ci(e.get("value"), e.get("ci_low"), e.get("ci_high"), 1), _truncation(agg, cost, config),
                     fmt(c["wall_s"].mean(), 1), fmt(c["measure_s"].mean(), 1), fmt_flops(c["flops"].mean()),
                     fmt(c["tokens_generated"].mean())])
    return Table(["configuration", "method", "runs usable", "judge reward (mean over seeds [95% CI])",
                  f"proxy gain vs {baseline}", f"judge gain vs {baseline}", f"win rate vs {baseline}",
                  "Elo (baseline 0)", "truncation rate", "wall s (mean)", "measure s (mean)", "FLOPs (mean)",
                  "tokens generated (mean)"], rows)


def prompt_mix_table(meta: pd.DataFrame, column: str) -> Table | None:
    """How many evaluation prompts each subset (or number of Human turns) contributes."""
    if meta.empty or column not in meta or meta[column].isna().all():
        return None
    counts = meta[column].dropna().value_counts().sort_index()
    name = {"subset": "subset", "n_turns": "Human turns"}.get(column, column)
    return Table([f"evaluation prompts by {name}", "prompts", "share"],
                 [[str(k), str(int(v)), fmt(v / counts.sum())] for k, v in counts.items()])


def subset_table(derived: pd.DataFrame, baseline: str) -> Table | None:
    """Judge reward and win rate against the baseline per subset group and configuration."""
    judge = select(derived, "judge_by_subset", "judge_reward")
    if judge.empty:
        return None
    wins = select(derived, "win_rate_by_subset", "win_rate").set_index(["config", "slice"])
    rows = []
    for r in judge.sort_values(["slice", "config"]).itertuples():
        key = (r.config, f"{r.slice}|vs:{baseline}")
        w = wins.loc[key] if key in wins.index else {}
        rows.append([r.slice, r.config, fmt_n(r.n), fmt_ci(r.value, r.ci_low, r.ci_high),
                     fmt_ci(w.get("value"), w.get("ci_low"), w.get("ci_high"))])
    return Table(["subset", "configuration", "prompts", "judge reward [95% CI]", f"win rate vs {baseline}"], rows)


def pm_turn_table(agg: pd.DataFrame) -> Table | None:
    acc = select(agg, PM_EVAL, "accuracy_by_turn")
    if acc.empty:
        return None
    parts = acc["slice"].str.rpartition("|")
    acc = acc.assign(subset=parts[0], turn=parts[2])
    turns = [*TURN_BUCKETS, "all"]
    rows = []
    for (method, subset), g in acc.groupby(["config", "subset"], sort=True):
        cell = {r.turn: f"{fmt_ci(r.value, r.ci_low, r.ci_high)} n={fmt_n(r.n)}" for r in g.itertuples()}
        rows.append([method, subset, *(cell.get(t, "–") for t in turns)])
    rows.sort(key=lambda row: (row[0], row[1] != "all", row[1]))
    return Table(["PM", "subset", *(f"turn {t}" for t in turns)], rows)


def calibration_table(agg: pd.DataFrame) -> Table | None:
    pm = select(agg, PM_EVAL)
    obs = pm[pm["metric"] == "calib_observed"]
    if obs.empty:
        return None
    other = pm.set_index(["config", "metric", "slice"])["value"]
    ece = pm[pm["metric"] == "ece"].set_index("config")["value"]
    rows = [[r.config, r.slice, fmt(other.get((r.config, "calib_gap", r.slice))),
             fmt(other.get((r.config, "calib_predicted", r.slice))), fmt_ci(r.value, r.ci_low, r.ci_high),
             fmt_n(r.n), fmt(ece.get(r.config))] for r in obs.sort_values(["config", "slice"]).itertuples()]
    return Table(["PM", "bin", "mean |Δ|", "predicted σ(|Δ|)", "observed [95% CI]", "n", "ECE"], rows)


def threshold_table(agg: pd.DataFrame) -> Table | None:
    part = select(agg, PM_EVAL, "accuracy_above")
    if part.empty:
        return None
    part = part.assign(t=part["slice"].astype(float)).sort_values(["config", "t"])
    rows = [[r.config, r.slice, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n)] for r in part.itertuples()]
    return Table(["PM", "both scores >", "accuracy [95% CI]", "n"], rows)


def gold_table(agg: pd.DataFrame) -> Table | None:
    part = select(agg, PM_EVAL)
    part = part[part["metric"].isin(["gold_accuracy", "label_gold_agreement"])]
    if part.empty:
        return None
    rows = [[r.config, r.metric, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n)] for r in part.itertuples()]
    return Table(["PM", "metric", "agreement with gold [95% CI]", "n"], rows)


def win_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "win_rate")
    if part.empty:
        return None
    wide = part[~part["metric"].isin(["elo", "win_rate_vs_chosen"])].set_index(["config", "slice", "metric"])
    rows = []
    for (method, vs), g in wide.groupby(level=[0, 1], sort=True):
        g = g.droplevel([0, 1])
        w, d, t = (g.loc[m] if m in g.index else None for m in ("win_rate", "win_rate_decisive", "tie_rate"))
        rows.append([method, vs.removeprefix("vs:"), fmt_ci(w["value"], w["ci_low"], w["ci_high"]),
                     fmt_ci(d["value"], d["ci_low"], d["ci_high"]), f"{fmt_n(d['n'])}/{fmt_n(w['n'])}",
                     fmt(t["value"])])
    return Table(["configuration", "vs", "win rate, ties ½ [bootstrap 95% CI]", "decisive win rate [exact 95% CI]",
                  "decisive/prompts", "tie rate"], rows)


def elo_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "win_rate", "elo")
    if part.empty:
        return None
    rows = [[r.config, fmt_ci(r.value, r.ci_low, r.ci_high, 1), fmt_n(r.n)]
            for r in part.sort_values("value", ascending=False).itertuples()]
    return Table(["configuration", "Elo [bootstrap 95% CI]", "prompts"], rows)


def bon_kl_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "kl_reward")
    if not (part["metric"] == "kl_best_of_n").any():
        return None
    bound = part[part["metric"] == "kl_best_of_n_bound"].set_index(["config", "slice"])["value"]
    measured = part[part["metric"] == "kl_best_of_n"]
    measured = measured.assign(k=measured["slice"].str.removeprefix("n=").astype(int)).sort_values(["config", "k"])
    rows = [[r.config, r.slice, fmt(r.value, 4), fmt(bound.get((r.config, r.slice)), 4), fmt_n(r.n)]
            for r in measured.itertuples()]
    return Table(["configuration", "n", "measured KL (plug-in, biased low)", "log n − (n−1)/n (upper bound)",
                  "points"], rows)


def nlp_table(deltas: pd.DataFrame, baseline: str) -> Table | None:
    if deltas.empty:
        return None
    rows = [[r.config, r.task, fmt(r.acc), fmt(r.baseline_acc), fmt_ci(r.delta, r.ci_low, r.ci_high)]
            for r in deltas.sort_values(["task", "config"]).itertuples()]
    return Table(["configuration", "task", "acc", f"acc of {baseline}", "Δ acc [95% CI]"], rows)


def other_rows_table(part: pd.DataFrame) -> Table | None:
    """Aggregated rows no other table shows, so no result is hidden."""
    if part.empty:
        return None
    rows = [[r.config, r.evaluator, r.metric, r.slice, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n),
             f"{r.n_seeds} ({r.interval})" + (f", range {fmt(r.range_low)}–{fmt(r.range_high)}" if r.n_seeds > 1 else "")]
            for r in part.itertuples()]
    return Table(["configuration", "evaluator", "metric", "slice", "value [95% CI]", "n", "runs (interval)"], rows)
