"""The report's views of how methods sample: win rate against the dataset's chosen response, win
rates and diversity against sampling temperature, reward distributions, and PM robustness along
training. Each frame function is pure; each table returns None and each plot returns None when the
sweep lacks its data (older sweeps), so the caller puts a note instead.

The unit is the configuration: a configuration's seeds are averaged per prompt (win rates) or
combined by ``aggregate_seeds`` (diversity rows), configurations never are.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.kl_reward import points_frame
from alignbench.eval.win_rate import win_rates
from alignbench.report.aggregate import judge_scores, response_texts
from alignbench.report.load import Sweep
from alignbench.report.plots import legend_outside, save_figure
from alignbench.report.render import Table
from alignbench.report.tables import fmt, fmt_ci, fmt_n, select

CHOSEN = "chosen"  # the dataset's chosen response, as a competitor in win_rates
TEMP_EVAL = "win_rate_by_temperature"
DIVERSITY_METRICS = ("distinct_1", "distinct_2", "self_bleu")
ROBUSTNESS_KEYS = {"proxy_judge_agreement": "proxy–judge agreement vs π0 (real HH: proxy PM vs test PM)",
                   "proxy_judge_spearman": "proxy–judge Spearman ρ (hh_synth: proxy vs gold)"}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


# --------------------------------------------------------------------------- win rate vs chosen
def chosen_scores(samples: pd.DataFrame, prompt_ids: list[int]) -> np.ndarray | None:
    """The judge reward of the dataset's chosen response on each of ``prompt_ids`` (the mean of the
    rows that record it: every run scores the same chosen text), NaN where none does; None when the
    samples do not record it (runs from before the field)."""
    if samples.empty or "chosen_judge_reward" not in samples or samples["chosen_judge_reward"].isna().all():
        return None
    per_prompt = pd.to_numeric(samples["chosen_judge_reward"], errors="coerce").groupby(samples["prompt_id"]).mean()
    return per_prompt.reindex(prompt_ids).to_numpy(float)


def vs_chosen_rows(scores: dict[str, np.ndarray], chosen: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   **ident) -> list[dict]:
    """Per configuration (in ``method``, as ``win_rates`` does): win rate of its response against the
    chosen one, (wins + ties/2) / prompts with judge(config) − judge(chosen) deciding, seeded
    percentile bootstrap over prompts (``win_rates`` with the chosen response as the baseline).
    Rows: evaluator "win_rate", metric "win_rate_vs_chosen", slice "vs:chosen"."""
    rows = []
    for config, s in sorted(scores.items()):
        pair = win_rates({config: s, CHOSEN: chosen}, CHOSEN, n_boot=n_boot, seed=seed, **ident)
        rows += [{**r, "metric": "win_rate_vs_chosen"} for r in pair
                 if r["method"] == config and r["metric"] == "win_rate"]
    return rows


def temperature_frame(sweep: Sweep) -> pd.DataFrame:
    """Every usable run's samples_by_temperature.jsonl rows, with config, method, seed and run."""
    frames = [pd.DataFrame(r.temperature_samples).assign(config=r.config or r.method, method=r.method, seed=r.seed,
                                                         run=r.run_id)
              for r in sweep.ok_runs if r.temperature_samples]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def temperature_rows(temps: pd.DataFrame, baseline: str, n_boot: int = 2000, seed: int = 0, **ident) -> list[dict]:
    """Per temperature T and configuration, from sample 0 of each prompt (seeds averaged per prompt):
    the win rate against the baseline configuration at the same T (metric "win_rate", slice
    "T=<t>|vs:<baseline>") and against the chosen response (metric "win_rate_vs_chosen", slice
    "T=<t>|vs:chosen"); evaluator "win_rate_by_temperature"; intervals as ``win_rates``."""
    if temps.empty or not {"temperature", "judge_reward"} <= set(temps):
        return []
    first = temps[temps["sample"] == 0] if "sample" in temps else temps
    rows = []
    for t, part in first.groupby("temperature", sort=True):
        scores, prompt_ids = judge_scores(part)
        if not scores:
            continue
        prefix = f"T={float(t):g}|"
        if baseline in scores and len(scores) >= 2:
            wins = win_rates(scores, baseline, n_boot=n_boot, seed=seed,
                             texts=response_texts(part, scores, prompt_ids) or None, **ident)
            rows += [{**r, "evaluator": TEMP_EVAL, "slice": prefix + r["slice"]} for r in wins
                     if r["metric"] == "win_rate" and r["slice"] == f"vs:{baseline}"]
        chosen = chosen_scores(part, prompt_ids)
        if chosen is not None:
            rows += [{**r, "evaluator": TEMP_EVAL, "slice": prefix + r["slice"]}
                     for r in vs_chosen_rows(scores, chosen, n_boot=n_boot, seed=seed, **ident)]
    return rows


def _temperature_of(slices: pd.Series) -> pd.Series:
    return slices.str.extract(r"^T=([^|]+)")[0].astype(float)


def vs_chosen_table(derived: pd.DataFrame, baseline: str) -> Table | None:
    """Win rate against the baseline beside the win rate against the chosen response."""
    chosen = select(derived, "win_rate", "win_rate_vs_chosen")
    if chosen.empty:
        return None
    wins = select(derived, "win_rate", "win_rate")
    wins = wins[wins["slice"] == f"vs:{baseline}"].set_index("config")
    rows = []
    for r in chosen.sort_values("config").itertuples():
        w = wins.loc[r.config] if r.config in wins.index else {}
        rows.append([r.config, fmt_ci(w.get("value"), w.get("ci_low"), w.get("ci_high")),
                     fmt_ci(r.value, r.ci_low, r.ci_high), fmt_n(r.n)])
    return Table(["configuration", f"win rate vs {baseline} [95% CI]", "win rate vs chosen [95% CI]",
                  "prompts (vs chosen)"], rows)


def _cell(by_metric: pd.DataFrame, metric: str) -> str:
    """"value [lo, hi]" of the row of ``metric`` (the index), "–" when there is none."""
    if metric not in by_metric.index:
        return "–"
    return fmt_ci(*by_metric.loc[metric, ["value", "ci_low", "ci_high"]])


def temperature_table(derived: pd.DataFrame, agg: pd.DataFrame, baseline: str) -> Table | None:
    """Per configuration and T: the win rates (``temperature_rows``) and the mean judge reward at T
    (the runs' "temperature" rows, combined over seeds by ``aggregate_seeds``)."""
    part = select(derived, TEMP_EVAL)
    judge = select(agg, "temperature", "judge_reward")
    if part.empty and judge.empty:
        return None
    cells = pd.concat([part[["config", "metric", "slice", "value", "ci_low", "ci_high", "n"]],
                       judge[["config", "metric", "slice", "value", "ci_low", "ci_high", "n"]]], ignore_index=True)
    cells = cells.assign(t=_temperature_of(cells["slice"])).dropna(subset=["t"])
    rows = []
    for (config, t), g in cells.groupby(["config", "t"], sort=True):
        by = g.drop_duplicates("metric").set_index("metric")
        rows.append([config, f"{t:g}", *(_cell(by, m) for m in ("judge_reward", "win_rate", "win_rate_vs_chosen")),
                     fmt_n(part.loc[(part["config"] == config) & (_temperature_of(part["slice"]) == t), "n"].max())])
    return Table(["configuration", "T", "judge reward at T (over seeds) [95% CI]",
                  f"win rate vs {baseline} at T [95% CI]", "win rate vs chosen [95% CI]", "prompts"], rows)


def config_colors(configs) -> dict:
    """One colour per configuration, distinct for up to 20 (a sweep's configurations in one panel;
    matplotlib's default cycle repeats after 10)."""
    names = sorted({str(c) for c in configs})
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(names)}


def panel_row(n: int) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` panels side by side, 6 inches wide each."""
    fig = Figure(figsize=(6 * n, 4), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n))


def _errorbars(ax, part: pd.DataFrame, x: str, offset_step: float) -> None:
    """One line with interval bars per configuration, slightly offset in x so bars do not hide."""
    configs = sorted(part["config"].unique())
    colors = config_colors(configs)
    for i, (config, g) in enumerate((c, part[part["config"] == c].sort_values(x)) for c in configs):
        lo = (g["value"] - g["ci_low"]).fillna(0).clip(lower=0)
        hi = (g["ci_high"] - g["value"]).fillna(0).clip(lower=0)
        ax.errorbar(g[x] + (i - (len(configs) - 1) / 2) * offset_step, g["value"], yerr=np.vstack([lo, hi]),
                    marker="o", capsize=3, label=config, color=colors[config])


def temperature_plot(derived: pd.DataFrame, baseline: str, path: Path) -> Path | None:
    part = select(derived, TEMP_EVAL)
    if part.empty:
        return None
    part = part.assign(t=_temperature_of(part["slice"]))
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, title in zip(axes, ("win_rate", "win_rate_vs_chosen"),
                                 (f"against {baseline} at the same T", "against the chosen response")):
        _errorbars(ax, part[part["metric"] == metric], "t", 0.01)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="sampling temperature T", title=f"Win rate {title} (95% CI)")
    legend_outside(fig, axes[1])  # the baseline has no row against itself: the chosen panel has every config
    axes[0].set_ylabel("win rate (ties ½)")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- diversity
def diversity_frame(agg: pd.DataFrame) -> pd.DataFrame:
    """The aggregated "diversity" rows (seeds combined per configuration) with their temperature t."""
    part = agg[(agg["evaluator"] == "diversity") & agg["metric"].isin(DIVERSITY_METRICS)]
    return part.assign(t=_temperature_of(part["slice"])).dropna(subset=["t"])


def diversity_table(div: pd.DataFrame) -> Table | None:
    if div.empty:
        return None
    rows = []
    for (config, t), g in div.groupby(["config", "t"], sort=True):
        by = g.set_index("metric")
        cells = [_cell(by, m) for m in DIVERSITY_METRICS]
        rows.append([config, f"{t:g}", *cells, f"{int(g['n_seeds'].max())} ({g['interval'].iloc[0]})"])
    return Table(["configuration", "T", "distinct-1 [95% CI]", "distinct-2 [95% CI]", "self-BLEU [95% CI]",
                  "runs (interval)"], rows)


def compare_intervals(value: float, lo: float, hi: float, base_lo: float, base_hi: float) -> str:
    """"above" when [lo, hi] lies wholly above [base_lo, base_hi], "below" when wholly below,
    "overlap" when they share a point, "unknown" when either interval is missing."""
    if any(pd.isna(v) for v in (lo, hi, base_lo, base_hi)):
        return "unknown"
    return "above" if lo > base_hi else "below" if hi < base_lo else "overlap"


def diversity_findings(div: pd.DataFrame, baseline: str) -> list[str]:
    """Per temperature, which configurations are measurably less diverse than the baseline: self-BLEU
    interval wholly above the baseline's (samples of one prompt more alike) or distinct-2 interval
    wholly below; which are measurably more diverse; and which cannot be told apart."""
    if div.empty:
        return []
    if baseline not in set(div["config"]):
        return [f"No diversity comparison: {baseline} has no diversity rows."]
    base = div[div["config"] == baseline].set_index(["t", "metric"])
    out = []
    for t, g in div[div["config"] != baseline].groupby("t", sort=True):
        verdicts = {"less": [], "more": [], "apart": []}
        for config, c in g.groupby("config", sort=True):
            sides = {}
            for r in c.itertuples():
                if (t, r.metric) in base.index and r.metric in ("self_bleu", "distinct_2"):
                    b = base.loc[(t, r.metric)]
                    sides[r.metric] = compare_intervals(r.value, r.ci_low, r.ci_high, b["ci_low"], b["ci_high"])
            less = sides.get("self_bleu") == "above" or sides.get("distinct_2") == "below"
            more = sides.get("self_bleu") == "below" or sides.get("distinct_2") == "above"
            key = "less" if less and not more else "more" if more and not less else "apart"
            verdicts[key].append(config)
        out.append(f"At T={t:g}: less diverse than {baseline} (self-BLEU higher or distinct-2 lower, intervals "
                   f"apart): {', '.join(verdicts['less']) or 'none'}; more diverse: "
                   f"{', '.join(verdicts['more']) or 'none'}; not separable from {baseline} (intervals overlap "
                   f"or missing): {', '.join(verdicts['apart']) or 'none'}.")
    return out


def diversity_plot(div: pd.DataFrame, path: Path) -> Path | None:
    if div.empty:
        return None
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, DIVERSITY_METRICS):
        _errorbars(ax, div[div["metric"] == metric], "t", 0.01)
        ax.set(xlabel="sampling temperature T", ylabel=metric.replace("_", "-"), title=f"{metric} (95% CI over seeds)")
    legend_outside(fig, axes[0])
    return save_figure(fig, path)


# --------------------------------------------------------------------------- reward distributions
def reward_summary(samples: pd.DataFrame, columns=("judge_reward", "proxy_reward")) -> pd.DataFrame:
    """Per configuration and reward column, over its final samples with seeds pooled: n, mean,
    sample sd (ddof 1) and the quantiles ``QUANTILES`` (linear interpolation, numpy's default)."""
    out = []
    for col in columns:
        if samples.empty or col not in samples:
            continue
        for config, g in samples.groupby("config", sort=True):
            x = pd.to_numeric(g[col], errors="coerce").dropna().to_numpy(float)
            if x.size == 0:
                continue
            out.append(dict(config=config, reward=col, n=x.size, mean=x.mean(),
                            sd=x.std(ddof=1) if x.size > 1 else float("nan"),
                            **{f"q{round(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}))
    quantiles = [f"q{round(q * 100)}" for q in QUANTILES]
    return pd.DataFrame(out, columns=["config", "reward", "n", "mean", "sd", *quantiles])


def reward_table(summary: pd.DataFrame) -> Table | None:
    if summary.empty:
        return None
    qs = [f"q{round(q * 100)}" for q in QUANTILES]
    rows = [[r["reward"], r["config"], fmt_n(r["n"]), fmt(r["mean"]), fmt(r["sd"]), *(fmt(r[q]) for q in qs)]
            for _, r in summary.sort_values(["reward", "config"]).iterrows()]
    return Table(["reward", "configuration", "samples", "mean", "sd", *(f"{q[1:]}%" for q in qs)], rows)


def reward_hist_plot(samples: pd.DataFrame, path: Path, bins: int = 20) -> Path | None:
    """Histograms (density, step) of judge and proxy reward per configuration; each panel's bins are
    shared by all its configurations so their shapes compare."""
    cols = [c for c in ("judge_reward", "proxy_reward") if not samples.empty and c in samples
            and pd.to_numeric(samples[c], errors="coerce").notna().any()]
    if not cols:
        return None
    fig, axes = panel_row(len(cols))
    colors = config_colors(samples["config"])
    for ax, col in zip(axes, cols):
        values = pd.to_numeric(samples[col], errors="coerce")
        edges = np.histogram_bin_edges(values.dropna().to_numpy(float), bins=bins)
        for config, x in values.groupby(samples["config"], sort=True):
            ax.hist(x.dropna().to_numpy(float), bins=edges, density=True, histtype="step", lw=1.5, label=config,
                    color=colors[str(config)])
        ax.set(xlabel=col.replace("_", " "), ylabel="density", title=f"{col.replace('_', ' ')} of final samples")
    legend_outside(fig, axes[0])
    return save_figure(fig, path)


# --------------------------------------------------------------------------- PM robustness
def robustness_frame(points: list[dict]) -> pd.DataFrame:
    """Per configuration and log point (step, label): the seed means of sqrt(KL) (``d``, as in the
    reward-vs-KL view) and of the robustness keys the points record; only points that record one."""
    keys = [k for k in ROBUSTNESS_KEYS if any(k in p for p in points)]
    if not keys:
        return pd.DataFrame()
    df = points_frame(points)
    for k in keys:
        df[k] = pd.to_numeric(df[k], errors="coerce") if k in df else np.nan
    df = df.assign(label=df["label"].fillna("") if "label" in df else "")
    mean = df.groupby(["config", "step", "label"], sort=True)[["d", *keys]].mean().reset_index()
    # the final evaluation's point (step -1) comes after every training step
    order = mean["step"].where(mean["step"] >= 0, np.inf)
    return mean.assign(_order=order).dropna(subset=keys, how="all").sort_values(["config", "_order"]).drop(
        columns="_order")


def robustness_table(rob: pd.DataFrame) -> Table | None:
    """Per configuration and key: its value at the first point that has one (π0's, where measured)
    and at the last, with the sqrt(KL) of each."""
    if rob.empty:
        return None
    rows = []
    for key, name in ROBUSTNESS_KEYS.items():
        if key not in rob:
            continue
        for config, g in rob.dropna(subset=[key]).groupby("config", sort=True):
            first, last = g.iloc[0], g.iloc[-1]
            rows.append([name, config, f"{fmt(first[key])} (√KL {fmt(first['d'])})",
                         f"{fmt(last[key])} (√KL {fmt(last['d'])})", fmt(last[key] - first[key]), str(len(g))])
    if not rows:
        return None
    return Table(["measure", "configuration", "first point", "last point", "last − first", "points"], rows)


def robustness_plot(rob: pd.DataFrame, path: Path) -> Path | None:
    keys = [k for k in ROBUSTNESS_KEYS if k in rob and rob[k].notna().any()]
    if not keys:
        return None
    fig, axes = panel_row(len(keys))
    colors = config_colors(rob["config"])
    for ax, key in zip(axes, keys):
        for config, g in rob.dropna(subset=[key]).groupby("config", sort=True):
            g = g.sort_values("d")
            ax.plot(g["d"], g[key], marker="o", label=config, color=colors[str(config)])
        ax.set(xlabel="sqrt(KL(π‖π0))", ylabel=key)
        ax.set_title(textwrap.fill(ROBUSTNESS_KEYS[key] + ", seed means", 48), fontsize=9)  # two panels' titles met
    legend_outside(fig, axes[-1])  # the Spearman panel (if any) has π0's own point too
    return save_figure(fig, path)
