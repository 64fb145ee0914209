"""Tables of the report, built from the aggregated and derived frames. Each returns a ``Table``, or
None when it has nothing to show (the caller adds a note)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL, TURN_BUCKETS
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
        rows.append([r.run_id, r.method, fmt_n(r.seed), r.mark,
                     fmt_ci(c.get("judge_reward"), c.get("ci_low"), c.get("ci_high")),
                     fmt(c.get("wall_s"), 1), fmt(c.get("tokens_generated"))])
    return Table(["run", "method", "seed", "status", "judge reward (mean [95% CI])", "wall s", "tokens generated"],
                 rows)


def method_table(sweep: Sweep, cost: pd.DataFrame, derived: pd.DataFrame, baseline: str) -> Table:
    wins = select(derived, "win_rate", "win_rate")
    wins = wins[wins["slice"] == f"vs:{baseline}"].set_index("method")
    elo = select(derived, "win_rate", "elo").set_index("method")
    gains = {m: select(derived, "gain", m).set_index("method") for m in ("proxy_gain", "judge_gain")}
    rows = []
    for method in sorted({r.method for r in sweep.runs}):
        runs = [r for r in sweep.runs if r.method == method]
        c = cost[cost["method"] == method]
        w = wins.loc[method] if method in wins.index else {}
        e = elo.loc[method] if method in elo.index else {}
        g = {k: (v.loc[method] if method in v.index else {}) for k, v in gains.items()}
        rows.append([method, f"{sum(r.ok for r in runs)}/{len(runs)}", fmt(c["judge_reward"].mean()),
                     *[fmt_ci(g[k].get("value"), g[k].get("ci_low"), g[k].get("ci_high")) for k in gains],
                     fmt_ci(w.get("value"), w.get("ci_low"), w.get("ci_high")),
                     fmt_ci(e.get("value"), e.get("ci_low"), e.get("ci_high"), 1),
                     fmt(c["wall_s"].mean(), 1), fmt(c["tokens_generated"].mean())])
    return Table(["method", "runs usable", "judge reward (mean over seeds)", f"proxy gain vs {baseline}",
                  f"judge gain vs {baseline}", f"win rate vs {baseline}",
                  "Elo (baseline 0)", "wall s (mean)", "tokens generated (mean)"], rows)


def pm_turn_table(agg: pd.DataFrame) -> Table | None:
    acc = select(agg, PM_EVAL, "accuracy_by_turn")
    if acc.empty:
        return None
    parts = acc["slice"].str.rpartition("|")
    acc = acc.assign(subset=parts[0], turn=parts[2])
    turns = [*TURN_BUCKETS, "all"]
    rows = []
    for (method, subset), g in acc.groupby(["method", "subset"], sort=True):
        cell = {r.turn: f"{fmt_ci(r.value, r.ci_low, r.ci_high)} n={fmt_n(r.n)}" for r in g.itertuples()}
        rows.append([method, subset, *(cell.get(t, "–") for t in turns)])
    rows.sort(key=lambda row: (row[0], row[1] != "all", row[1]))
    return Table(["PM", "subset", *(f"turn {t}" for t in turns)], rows)


def calibration_table(agg: pd.DataFrame) -> Table | None:
    pm = select(agg, PM_EVAL)
    obs = pm[pm["metric"] == "calib_observed"]
    if obs.empty:
        return None
    other = pm.set_index(["method", "metric", "slice"])["value"]
    ece = pm[pm["metric"] == "ece"].set_index("method")["value"]
    rows = [[r.method, r.slice, fmt(other.get((r.method, "calib_gap", r.slice))),
             fmt(other.get((r.method, "calib_predicted", r.slice))), fmt_ci(r.value, r.ci_low, r.ci_high),
             fmt_n(r.n), fmt(ece.get(r.method))] for r in obs.sort_values(["method", "slice"]).itertuples()]
    return Table(["PM", "bin", "mean |Δ|", "predicted σ(|Δ|)", "observed [95% CI]", "n", "ECE"], rows)


def threshold_table(agg: pd.DataFrame) -> Table | None:
    part = select(agg, PM_EVAL, "accuracy_above")
    if part.empty:
        return None
    part = part.assign(t=part["slice"].astype(float)).sort_values(["method", "t"])
    rows = [[r.method, r.slice, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n)] for r in part.itertuples()]
    return Table(["PM", "both scores >", "accuracy [95% CI]", "n"], rows)


def gold_table(agg: pd.DataFrame) -> Table | None:
    part = select(agg, PM_EVAL)
    part = part[part["metric"].isin(["gold_accuracy", "label_gold_agreement"])]
    if part.empty:
        return None
    rows = [[r.method, r.metric, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n)] for r in part.itertuples()]
    return Table(["PM", "metric", "agreement with gold [95% CI]", "n"], rows)


def win_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "win_rate")
    if part.empty:
        return None
    wide = part[part["metric"] != "elo"].set_index(["method", "slice", "metric"])
    rows = []
    for (method, vs), g in wide.groupby(level=[0, 1], sort=True):
        g = g.droplevel([0, 1])
        w, d, t = (g.loc[m] if m in g.index else None for m in ("win_rate", "win_rate_decisive", "tie_rate"))
        rows.append([method, vs.removeprefix("vs:"), fmt_ci(w["value"], w["ci_low"], w["ci_high"]),
                     fmt_ci(d["value"], d["ci_low"], d["ci_high"]), f"{fmt_n(d['n'])}/{fmt_n(w['n'])}",
                     fmt(t["value"])])
    return Table(["method", "vs", "win rate, ties ½ [bootstrap 95% CI]", "decisive win rate [exact 95% CI]",
                  "decisive/prompts", "tie rate"], rows)


def elo_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "win_rate", "elo")
    if part.empty:
        return None
    rows = [[r.method, fmt_ci(r.value, r.ci_low, r.ci_high, 1), fmt_n(r.n)]
            for r in part.sort_values("value", ascending=False).itertuples()]
    return Table(["method", "Elo [bootstrap 95% CI]", "prompts"], rows)


def kl_fit_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "kl_reward")
    part = part[part["metric"].str.contains(".", regex=False)]
    if part.empty:
        return None
    part = part.assign(form=part["metric"].str.split(".").str[0], param=part["metric"].str.split(".").str[1])
    rows = []
    for (method, reward, form), g in part.groupby(["method", "slice", "form"], sort=True):
        values = dict(zip(g["param"], g["value"]))
        params = ", ".join(f"{k}={fmt(v)}" for k, v in values.items() if k != "r2")
        rows.append([method, reward, form, params, fmt(values.get("r2")), fmt_n(g["n"].iloc[0])])
    return Table(["method", "reward", "form", "parameters", "R²", "points"], rows)


def bon_kl_table(derived: pd.DataFrame) -> Table | None:
    part = select(derived, "kl_reward")
    if not (part["metric"] == "kl_best_of_n").any():
        return None
    theory = part[part["metric"] == "kl_best_of_n_theory"].set_index(["method", "slice"])["value"]
    measured = part[part["metric"] == "kl_best_of_n"]
    measured = measured.assign(k=measured["slice"].str.removeprefix("n=").astype(int)).sort_values(["method", "k"])
    rows = [[r.method, r.slice, fmt(r.value, 4), fmt(theory.get((r.method, r.slice)), 4), fmt_n(r.n)]
            for r in measured.itertuples()]
    return Table(["method", "n", "measured KL", "log n − (n−1)/n", "points"], rows)


def nlp_table(deltas: pd.DataFrame, baseline: str) -> Table | None:
    if deltas.empty:
        return None
    rows = [[r.method, r.task, fmt(r.acc), fmt(r.baseline_acc), fmt_ci(r.delta, r.ci_low, r.ci_high)]
            for r in deltas.sort_values(["task", "method"]).itertuples()]
    return Table(["method", "task", "acc", f"acc of {baseline}", "Δ acc [95% CI]"], rows)


def other_rows_table(part: pd.DataFrame) -> Table | None:
    """Aggregated rows no other table shows, so no result is hidden."""
    if part.empty:
        return None
    rows = [[r.method, r.evaluator, r.metric, r.slice, fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n),
             f"{r.n_seeds} ({r.interval})"] for r in part.itertuples()]
    return Table(["method", "evaluator", "metric", "slice", "value [95% CI]", "n", "runs (interval)"], rows)
