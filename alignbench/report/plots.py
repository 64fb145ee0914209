"""The report's figures. Each function draws one PNG and returns its path, or returns None when its
inputs are absent (the caller then puts a note in the report). Figures use the Agg canvas directly,
so importing this module changes no global matplotlib state."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignbench.eval.kl_reward import REWARD_KEYS, fits_for
from alignbench.eval.pm_accuracy import EVALUATOR as PM_EVAL, TURN_BUCKETS


def save_figure(fig: Figure, path: Path) -> Path:
    """Render ``fig`` with the Agg backend (no display needed) into ``path`` at the report's dpi."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def legend_outside(fig: Figure, ax) -> None:
    """One legend for the figure, right of the panels: a sweep's many configurations would cover the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def _pm_legend(fig: Figure, ax, n_pms: int) -> None:
    """Inside the axes for one PM; outside, right, for a sweep of PM variants."""
    if n_pms > 1:
        legend_outside(fig, ax)
    else:
        ax.legend(fontsize=8)


def _yerr(df: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from ci_low/ci_high (zero where the interval is missing)."""
    lo = (df["value"] - df["ci_low"]).fillna(0).clip(lower=0)
    hi = (df["ci_high"] - df["value"]).fillna(0).clip(lower=0)
    return np.vstack([lo.to_numpy(float), hi.to_numpy(float)])


def _pm(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    return agg[(agg["evaluator"] == PM_EVAL) & (agg["metric"] == metric)]


def accuracy_by_turn(agg: pd.DataFrame, path: Path) -> Path | None:
    acc = _pm(agg, "accuracy_by_turn")
    if acc.empty:
        return None
    parts = acc["slice"].str.rpartition("|")
    acc = acc.assign(subset=parts[0], turn=parts[2])
    acc = acc[acc["turn"].isin(TURN_BUCKETS)]
    if acc.empty:
        return None
    n_pms = acc["config"].nunique()
    if n_pms > 1:  # a sweep of PM variants: each PM's overall accuracy, its subsets are in the table
        acc = acc[acc["subset"] == "all"]
    fig = Figure(figsize=(7 + 3 * (n_pms > 1), 4), layout="constrained")
    ax = fig.add_subplot()
    groups = list(acc.groupby(["config", "subset"], sort=True))
    for i, ((method, subset), g) in enumerate(groups):
        g = g.assign(x=g["turn"].map(TURN_BUCKETS.index)).sort_values("x")
        label = subset if acc["config"].nunique() == 1 else f"{method}: {subset}"
        ax.errorbar(g["x"] + (i - len(groups) / 2) * 0.04, g["value"], yerr=_yerr(g), marker="o", capsize=3,
                    label=label, lw=2.5 if subset == "all" else 1)
    ax.set_xticks(range(len(TURN_BUCKETS)), TURN_BUCKETS)
    ax.set(xlabel="Human turns in the conversation", ylabel="PM accuracy", title="PM accuracy by turn (95% CI)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    _pm_legend(fig, ax, n_pms)
    return save_figure(fig, path)


def calibration(agg: pd.DataFrame, path: Path) -> Path | None:
    obs = _pm(agg, "calib_observed")
    if obs.empty:
        return None
    pred = _pm(agg, "calib_predicted").set_index(["config", "slice"])["value"]
    ece = _pm(agg, "ece").set_index("config")["value"]
    n_pms = obs["config"].nunique()
    fig = Figure(figsize=(5 + 3 * (n_pms > 1), 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0.5, 1], [0.5, 1], color="grey", ls="--", label="perfect calibration")
    for method, g in obs.groupby("config", sort=True):
        x = [pred.get((method, s), np.nan) for s in g["slice"]]
        ax.errorbar(x, g["value"], yerr=_yerr(g), marker="o", capsize=3,
                    label=f"{method} (ECE {ece.get(method, np.nan):.3f})")
    ax.set(xlabel="predicted P(higher-scored is chosen) = σ(|Δ|)", ylabel="observed frequency",
           title="PM calibration by score gap (95% CI)")
    _pm_legend(fig, ax, n_pms)
    return save_figure(fig, path)


def accuracy_vs_threshold(agg: pd.DataFrame, path: Path) -> Path | None:
    acc = _pm(agg, "accuracy_above").dropna(subset=["value"])
    if acc.empty:
        return None
    n_pms = acc["config"].nunique()
    fig = Figure(figsize=(6 + 3 * (n_pms > 1), 4), layout="constrained")
    ax = fig.add_subplot()
    for method, g in acc.assign(t=acc["slice"].astype(float)).sort_values("t").groupby("config", sort=True):
        ax.errorbar(g["t"], g["value"], yerr=_yerr(g), marker="o", capsize=3, label=method)
    ax.set(xlabel="threshold both PM scores must exceed", ylabel="PM accuracy",
           title="PM accuracy vs score threshold (95% CI)")
    _pm_legend(fig, ax, n_pms)
    return save_figure(fig, path)


def curve_form(g: pd.DataFrame) -> str:
    """Gao et al.'s best-of-n form for best-of-n points (labels "n=<N>"), else the RL form."""
    labels = g["label"].astype(str) if "label" in g else pd.Series(dtype=str)
    labels = labels[~labels.isin(["pi0", "final"])]  # every run has these two; they say nothing of its kind
    return "bon" if len(labels) and labels.map(lambda s: bool(re.fullmatch(r"n=\d+", s))).all() else "rl"


def reward_vs_kl(points: pd.DataFrame, path: Path) -> Path | None:
    """Proxy and judge reward vs sqrt(KL) per configuration (one panel each, its seeds pooled), with
    fitted curves (R² and points in the legend) only where the fit has p + 2 distinct d."""
    if points.empty or points["d"].isna().all():
        return None
    points = points.assign(config=points["config"].fillna(points["method"]) if "config" in points else points["method"])
    methods = sorted(points["config"].dropna().unique())
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(5 * cols, 4 * rows), layout="constrained")
    for i, method in enumerate(methods):
        ax = fig.add_subplot(rows, cols, i + 1)
        g = points[points["config"] == method].dropna(subset=["d"])
        form = curve_form(g)
        grid = np.linspace(0, g["d"].max() if len(g) else 1, 100)
        for key, color in zip(REWARD_KEYS, ("tab:blue", "tab:red")):
            valid = g.dropna(subset=[key])
            if valid.empty:
                continue
            name = "proxy" if key == "proxy_reward" else f"judge ({valid['judge'].iloc[0]})" if "judge" in valid \
                else "judge"
            fit = fits_for(valid["d"].to_numpy(), valid[key].to_numpy())[form]
            ax.scatter(valid["d"], valid[key], s=12, color=color, alpha=0.6, label=name)
            if fit.ok:  # only with p + 2 distinct d: fewer make any curve fit exactly
                ax.plot(grid, fit(grid), color=color, label=f"{name} {form} fit, R²={fit.r2:.3f} (n={fit.n})")
        ax.set(title=method, xlabel="sqrt(KL(π‖π0))", ylabel="reward")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def win_matrix(derived: pd.DataFrame, path: Path) -> Path | None:
    wins = derived[(derived["evaluator"] == "win_rate") & (derived["metric"] == "win_rate")]
    if wins.empty:
        return None
    elo = derived[(derived["evaluator"] == "win_rate") & (derived["metric"] == "elo")].sort_values("value")
    matrix = wins.assign(vs=wins["slice"].str.removeprefix("vs:")).pivot(index="config", columns="vs",
                                                                          values="value")
    names = sorted(set(matrix.index) | set(matrix.columns))
    matrix = matrix.reindex(index=names, columns=names)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    image = ax.imshow(matrix.to_numpy(float), vmin=0, vmax=1, cmap="RdBu")
    for (i, j), v in np.ndenumerate(matrix.to_numpy(float)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="opponent", ylabel="configuration", title="win rate of row vs column (ties ½)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if not elo.empty:
        bx = fig.add_subplot(1, 2, 2)
        bx.barh(elo["config"], elo["value"], xerr=_yerr(elo), capsize=3, color="tab:gray")
        bx.set(xlabel="Elo (Bradley-Terry, 95% bootstrap CI)", title="Elo")
    return save_figure(fig, path)


def nlp_deltas(deltas: pd.DataFrame, baseline: str, path: Path) -> Path | None:
    if deltas.empty:
        return None
    tasks, methods = sorted(deltas["task"].unique()), sorted(deltas["config"].unique())
    fig = Figure(figsize=(max(6, 1.2 * len(tasks) * len(methods)), 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        g = deltas[deltas["config"] == method].set_index("task").reindex(tasks)
        err = np.vstack([(g["delta"] - g["ci_low"]).to_numpy(float), (g["ci_high"] - g["delta"]).to_numpy(float)])
        ax.bar(np.arange(len(tasks)) + i * width, g["delta"], width, yerr=np.nan_to_num(err), capsize=3,
               label=method)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20, ha="right")
    ax.set(ylabel=f"accuracy − accuracy of {baseline}", title="NLP task regressions (95% CI)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def cost_vs_quality(cost: pd.DataFrame, path: Path, keys=("wall_s", "tokens_generated")) -> Path | None:
    """Each run's mean judge reward against each cost in ``keys`` present in any run (one colour
    per configuration); None when no run records any of them."""
    axes_keys = [k for k in keys if cost[k].notna().any()]
    if not axes_keys or cost["judge_reward"].isna().all():
        return None
    fig = Figure(figsize=(5 * len(axes_keys), 4), layout="constrained")
    for i, key in enumerate(axes_keys):
        ax = fig.add_subplot(1, len(axes_keys), i + 1)
        for method, g in cost.dropna(subset=[key, "judge_reward"]).groupby("config", sort=True):
            ax.errorbar(g[key], g["judge_reward"], yerr=_yerr(g.rename(columns={"judge_reward": "value"})),
                        marker="o", ls="none", capsize=3, label=method)
        name = "FLOPs" if key == "flops" else key.replace("_", " ")
        positive = cost.loc[cost[key] > 0, key]
        if key == "flops" and len(positive):
            # FLOPs of inference-time and trained methods differ by orders of magnitude, and π0 spends
            # none: symlog keeps the zero on the axis, logarithmic above a tenth of the smallest spend
            ax.set_xscale("symlog", linthresh=float(positive.min()) / 10)
        ax.set(xlabel=name, ylabel="mean judge reward (95% CI)", title=f"quality vs {name}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)
