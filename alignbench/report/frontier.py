"""The report's reward–KL frontier section: every configuration of a sweep on shared axes (judge
reward solid, proxy reward dashed), each family's upper envelope and fit with its peak, the fits and
peaks tables, and the ranking of the families' best configurations at a matched KL
(``alignbench.eval.frontier``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from alignbench.eval.frontier import (EVALUATOR, SELECTED_EVAL, SELECTED_TEST, choose_configs, family_of,
                                      matched_level, ranking_rows, separates, upper_envelope)
from alignbench.eval.kl_reward import (EVALUATOR as KL_EVAL, REWARD_KEYS, fit_peak, fits_for, kl_reward_rows,
                                      points_frame)
from alignbench.report.aggregate import train_points
from alignbench.report.load import Sweep
from alignbench.report.plots import save_figure
from alignbench.report.render import Note, Para, Table
from alignbench.report.tables import fmt, fmt_ci, fmt_n

FAMILY_FORM = {"best_of_n": "bon"}  # Gao et al.'s best-of-n form for best-of-n; the RL form for the rest
PARAM_NAMES = {"linear": ("slope", "intercept"), "bon": ("alpha", "beta"), "rl": ("alpha", "beta")}

FITS_TEXT = (
    "Fits: least squares of R(d) = offset + d(α − βd) (best-of-n form, for best-of-n) or offset + d(α − β"
    " log d) (RL form, for every other family), d = sqrt(KL(π‖π0)); the offset is π0's mean reward "
    "(points at d = 0) and then counts as a parameter (p = 3). A fit is made only from at least p + 2 "
    "distinct d; below that the table says \"too few points\" and no curve is drawn. A family's fit pools "
    "the points of all its configurations and seeds. Coefficient intervals: percentile bootstrap that "
    "resamples whole (configuration, seed) point sets when there are several, else the points (π0's and "
    "the others separately). Peak (β > 0): best-of-n d* = α/(2β), R* = offset + α²/(4β); RL d* = exp(α/β "
    "− 1), R* = offset + βd*; reported only when d* lies inside the measured d range. A bootstrap "
    "resample without an interior maximum counts as d* = ∞, so an unstable peak has an open interval.")


def form_of(family: str) -> str:
    return FAMILY_FORM.get(family, "rl")


@dataclass
class FrontierData:
    points: pd.DataFrame  # every train_log point, with d and family
    means: pd.DataFrame  # seed means per (family, config, step, label)
    configs: pd.DataFrame  # per configuration: family, final_d, select, selected_on
    level: float = float("nan")
    chosen: pd.DataFrame = field(default_factory=pd.DataFrame)
    rows: list[dict] = field(default_factory=list)


def _final_d(log: list[dict]) -> float:
    """sqrt KL of a run's final point (label "final"; else its last point)."""
    if not log:
        return float("nan")
    frame = points_frame(log)
    final = frame[frame["label"].astype(str) == "final"] if "label" in frame else frame.iloc[0:0]
    return float((final if len(final) else frame.tail(1))["d"].iloc[-1])


def run_frame(sweep: Sweep, samples: pd.DataFrame) -> pd.DataFrame:
    """Per usable run: config, family, seed, final sqrt KL and its square (final_kl), selection gold
    and KL (metrics.json ``selection.judge_reward`` and ``selection.kl``, eval split; NaN when absent)
    and its mean gold on the reported prompts."""
    out = []
    for r in sweep.ok_runs:
        labels = [p.get("label") for p in r.train_log]
        selection = r.metrics.get("selection") if isinstance(r.metrics, dict) else None
        selection = selection if isinstance(selection, dict) else {}
        mine = samples[samples["run"] == r.run_id] if "run" in samples else pd.DataFrame()
        final_d = _final_d(r.train_log)
        out.append(dict(run=r.run_id, config=r.config or r.method, method=r.method, seed=r.seed,
                        family=family_of(r.method, r.metrics, labels), final_d=final_d, final_kl=final_d ** 2,
                        selection=selection.get("judge_reward", np.nan),
                        selection_kl=_number(selection.get("kl")),
                        test=mine["judge_reward"].mean() if "judge_reward" in mine else np.nan))
    return pd.DataFrame(out, columns=["run", "config", "method", "seed", "family", "final_d", "final_kl", "selection",
                                      "selection_kl", "test"])


def _number(value) -> float:
    """A float, NaN for None or anything not a number (a plugin's own KL record)."""
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def config_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (seed means): family, final_d, final_kl, selection, selection_kl, and the
    score it is selected by: the selection gold when every run of its family has one, else the
    reported prompts' gold."""
    runs = runs.astype({"selection": float, "selection_kl": float, "test": float})
    on_eval = runs.groupby("family")["selection"].apply(lambda s: bool(s.notna().all()))
    out = runs.groupby(["family", "config"], as_index=False).agg(
        final_d=("final_d", "mean"), final_kl=("final_kl", "mean"), selection=("selection", "mean"),
        selection_kl=("selection_kl", "mean"), test=("test", "mean"))
    use_eval = out["family"].map(on_eval).astype(bool)
    out["select"] = np.where(use_eval, out["selection"], out["test"])
    out["selected_on"] = np.where(use_eval, SELECTED_EVAL, SELECTED_TEST)
    return out


def frontier_data(sweep: Sweep, samples: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> FrontierData:
    """Everything the section shows, and its results.csv rows: the families' fits (evaluator
    "kl_reward", config "family:<family>") and the matched-KL ranking (evaluator "frontier")."""
    ident = dict(sweep=sweep.name, run="")
    runs = run_frame(sweep, samples)
    family = dict(zip(runs["config"], runs["family"]))
    raw = [{**p, "family": family.get(p["config"], p["method"])} for p in train_points(sweep)]
    points = points_frame(raw) if raw else pd.DataFrame(columns=["family", "config", "d", "step", "label",
                                                                  *REWARD_KEYS])
    keys = ["family", "config", "step", "label"]
    for key in ("step", "label"):
        if key not in points:  # a log from before the field: its points still average by what they have
            points[key] = None
    means = (points.dropna(subset=["d"]).assign(step=points["step"].fillna(-1), label=points["label"].fillna(""))
             .groupby(keys, as_index=False)[["d", *REWARD_KEYS]].mean()) if len(points) else points
    data = FrontierData(points=points, means=means, configs=config_frame(runs) if len(runs) else pd.DataFrame())
    if raw:
        data.rows += kl_reward_rows(raw, by="family", n_boot=n_boot, boot_seed=seed, **ident)
    if len(data.configs) and "judge_reward" in samples:
        data.level = matched_level(data.configs)
        if np.isfinite(data.level):
            data.chosen = choose_configs(data.configs, data.level)
            data.rows += ranking_rows(samples, data.chosen, data.level, n_boot=n_boot, seed=seed, **ident)
    return data


# ----------------------------------------------------------------------------------------- figure
def frontier_plot(data: FrontierData, path: Path) -> Path | None:
    """Judge reward (solid, left) and proxy reward (dashed, right) against sqrt KL for every
    configuration (seed means per log point, coloured by family), each family's upper envelope
    (thick step line) and its fit on the pooled points when it has one, peak marked with a star."""
    means = data.means
    if means.empty or means["d"].isna().all():
        return None
    families = sorted(means["family"].unique())
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    judge = data.points["judge"].dropna().iloc[0] if "judge" in data.points and data.points["judge"].notna().any() \
        else "judge"
    fig = Figure(figsize=(13, 5), layout="constrained")
    for i, (key, style) in enumerate(zip(("judge_reward", "proxy_reward"), ("-", "--"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for fam in families:
            fm, color = means[(means["family"] == fam)].dropna(subset=[key]), colors[fam]
            for _, g in fm.groupby("config"):
                g = g.sort_values("d")
                ax.plot(g["d"], g[key], style, marker="o", ms=3, lw=0.6, alpha=0.45, color=color)
            xs, env = upper_envelope(fm["d"], fm[key])
            if xs.size:
                ax.step(xs, env, style, where="post", lw=2.2, color=color, label=f"{fam} envelope")
            raw = data.points[data.points["family"] == fam].dropna(subset=["d", key])
            fit = fits_for(raw["d"].to_numpy(), raw[key].to_numpy())[form_of(fam)]
            if fit.ok:
                grid = np.linspace(0, raw["d"].max(), 100)
                ax.plot(grid, fit(grid), ":", color=color, lw=1.5, label=f"{fam} {fit.form} fit (n={fit.n})")
                d_star, r_star = fit_peak(fit, raw["d"])
                if np.isfinite(d_star):
                    ax.plot([d_star], [r_star], marker="*", ms=14, color=color, mec="black")
        if key == "judge_reward" and np.isfinite(data.level):
            ax.axvline(data.level, color="grey", lw=0.8, ls="-.", label="matched sqrt KL")
        name = f"judge reward ({judge})" if key == "judge_reward" else "proxy reward"
        ax.set(xlabel="sqrt(KL(π‖π0))", ylabel=name, title=f"{name} vs sqrt KL, every configuration")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------- tables
def _fit_cell(part: pd.DataFrame, form: str) -> tuple[str, str]:
    """(coefficients with CIs, "R² (n = …)") of one form's rows, or the too-few-points sentence."""
    rows = part.set_index("metric")
    p_row = rows.loc[f"{form}.n_params"] if f"{form}.n_params" in rows.index else None
    if f"{form}.r2" not in rows.index:
        if p_row is None:
            return "no points", "–"
        p = int(p_row["value"])
        return f"too few points (n = {fmt_n(p_row['n'])} distinct d < p+2 = {p + 2})", "–"
    names = ["offset", *PARAM_NAMES[form]] if form != "linear" else list(PARAM_NAMES[form])
    cells = []
    for name in names:
        metric = name if name == "offset" else f"{form}.{name}"
        if metric in rows.index:
            r = rows.loc[metric]
            cells.append(f"{name} = {fmt_ci(r['value'], r['ci_low'], r['ci_high'])}")
    r2 = rows.loc[f"{form}.r2"]
    return ", ".join(cells), f"{fmt(r2['value'])} (n = {fmt_n(r2['n'])})"


def fits_table(kl_rows: pd.DataFrame, data: FrontierData) -> Table | None:
    """Each family's fit, then each configuration's, in the family's form, both rewards."""
    part = kl_rows[kl_rows["evaluator"] == KL_EVAL]
    if part.empty:
        return None
    family_of_config = dict(zip(data.configs.get("config", []), data.configs.get("family", [])))
    out = []
    for name, g in part.groupby("config", sort=True):
        fam = name.removeprefix("family:")
        is_family = name.startswith("family:")
        form = form_of(fam if is_family else family_of_config.get(name, g["method"].iloc[0]))
        for key in REWARD_KEYS:
            cell = g[g["slice"] == key]
            if cell.empty:
                continue
            coefs, r2 = _fit_cell(cell, form)
            out.append([f"family {fam}" if is_family else name, key, form, coefs, r2])
    out.sort(key=lambda row: (not row[0].startswith("family "), row[0], row[1]))
    return Table(["family / configuration", "reward", "form", "coefficients [95% bootstrap CI]",
                  "R² (n = points)"], out)


def peak_table(kl_rows: pd.DataFrame, data: FrontierData) -> Table | None:
    """Where each family's judge (gold) reward peaks, or why the report cannot say."""
    part = kl_rows[(kl_rows["evaluator"] == KL_EVAL) & kl_rows["config"].str.startswith("family:")
                   & (kl_rows["slice"] == "judge_reward")]
    if part.empty:
        return None
    out = []
    for name, g in part.groupby("config", sort=True):
        fam = name.removeprefix("family:")
        form = form_of(fam)
        rows = g.set_index("metric")
        if f"{form}.r2" not in rows.index:
            out.append([fam, form, "no fit: too few points (n < p+2)", "–"])
        elif f"{form}.peak_d" not in rows.index:
            out.append([fam, form, "no peak in the measured range", "–"])
        else:
            d, r = rows.loc[f"{form}.peak_d"], rows.loc[f"{form}.peak_reward"]
            out.append([fam, form, fmt_ci(d["value"], d["ci_low"], d["ci_high"]),
                        fmt_ci(r["value"], r["ci_low"], r["ci_high"])])
    return Table(["family", "form", "peak sqrt KL [95% CI]", "peak judge reward [95% CI]"], out)


def ranking_blocks(front: pd.DataFrame) -> list:
    """The matched-KL ranking table, the pairwise differences, and the sentence stating the ranking
    and the pairs it cannot separate."""
    level = front[front["metric"] == "matched_sqrt_kl"]
    gold = front[front["metric"] == "matched_gold_reward"].sort_values("value", ascending=False)
    if level.empty or gold.empty:
        return [Note("no ranking at matched KL: no family with a nonzero final KL, or no judged samples.")]
    seeds = front[front["metric"] == "matched_gold_reward_seeds"].set_index("config")
    kl = front[front["metric"] == "final_sqrt_kl"].set_index("config")["value"]
    rows = []
    for rank, r in enumerate(gold.itertuples(), 1):
        config, how = r.slice.split("|", 1)
        s = seeds.loc[r.config]
        rows.append([str(rank), r.config, config, how, fmt(kl.get(r.config)),
                     f"{fmt_ci(r.value, r.ci_low, r.ci_high)} (n = {fmt_n(r.n)} prompts)",
                     f"{fmt_ci(s['value'], s['ci_low'], s['ci_high'])} (n = {fmt_n(s['n'])} seeds)"])
    diffs = front[front["metric"] == "matched_gold_diff"]
    pair_rows, unseparated = [], []
    for d in diffs.itertuples():
        other = d.slice.removeprefix("vs:")
        sep = separates(d.ci_low, d.ci_high)
        pair_rows.append([d.config, other, f"{fmt_ci(d.value, d.ci_low, d.ci_high)}", fmt_n(d.n),
                          "yes" if sep else "no"])
        if not sep:
            unseparated.append(f"{d.config} vs {other}")
    order = ", ".join(f"({i}) {f}" for i, f in enumerate(gold["config"], 1))
    sentence = (f"Ranking at matched sqrt KL ≤ {fmt(level['value'].iloc[0])} by test gold reward: {order}. "
                + ("Only one family has a configuration at or below the level: there is nothing to rank it against."
                   if len(gold) < 2 else "Every pair separates (paired 95% interval excludes 0)." if not unseparated
                   else f"Pairs it cannot separate (paired 95% interval contains 0): {'; '.join(unseparated)}."))
    how = ("The matched level is a KL budget: the smallest sqrt KL at which every family with a nonzero KL has a "
           "configuration whose run ends at or below it (max over families of their smallest final sqrt KL), so no "
           "family drops out. Per family, the configuration "
           "with final sqrt KL ≤ that level and the highest gold reward on the selection prompts (EVAL split, "
           f"never the reported prompts) is chosen; a family without selection rows is marked \"{SELECTED_TEST}\". "
           "Test gold: the seed-mean reward per prompt, percentile bootstrap over prompts; beside it the mean over "
           "seeds with the seed interval. Differences: paired over the prompts both answered, percentile bootstrap.")
    return [Para(how),
            Table(["rank", "family", "chosen configuration", "selected on", "final sqrt KL",
                   "test gold [95% CI, prompts]", "test gold [95% CI, seeds]"], rows),
            *([Table(["family", "vs", "gold difference [paired 95% CI]", "prompts", "separates"], pair_rows)]
              if pair_rows else []),
            Para(sentence)]


def frontier_figure(data: FrontierData, out_dir: Path, figure) -> list:
    """frontier.png (``frontier_plot``) with its caption; ``figure``: build's ``_figure`` helper. The
    report shows it once, in Findings."""
    return figure(out_dir, "frontier.png", lambda p: frontier_plot(data, p),
                  "Reward–KL frontier: judge reward (solid) and proxy reward (dashed) vs sqrt(KL(π‖π0)), every "
                  "configuration's seed means per log point, each family's upper envelope (thick), fit (dotted) "
                  "and peak (star); the dash-dotted line is the matched sqrt KL of the ranking in \"Reward–KL "
                  "frontier\"", "no train_log points with KL")


def frontier_blocks(data: FrontierData, derived: pd.DataFrame) -> list:
    """The section's blocks (its figure, ``frontier_figure``, is in Findings). ``derived``: the
    report's cross-run rows, ``data.rows`` among them (configurations' and families' fits, the
    ranking)."""
    kl_rows = derived[derived["evaluator"] == KL_EVAL]
    fits, peaks = fits_table(kl_rows, data), peak_table(kl_rows, data)
    return [Para("The frontier figure (frontier.png) is shown in Findings, at the top of the report."),
            Para(FITS_TEXT),
            *([fits] if fits is not None else [Note("no table: no train_log points.")]),
            *([peaks] if peaks is not None else [Note("no peak table: no family has judge rewards.")]),
            *ranking_blocks(derived[derived["evaluator"] == EVALUATOR])]
