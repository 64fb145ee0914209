"""Turn the usable runs of a sweep into the frames the tables and plots draw from."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from alignbench.eval.stats import COLUMNS, bootstrap_ci
from alignbench.report.load import Sweep

KEYS = ["method", "evaluator", "metric", "slice"]
COST_KEYS = ("wall_s", "tokens_trained", "tokens_generated", "pm_calls")


def combine_rows(sweep: Sweep) -> pd.DataFrame:
    """All usable runs' rows, identity blanks filled from the run, exact duplicates (the shared
    PM's rows, copied into every run) dropped."""
    frames = []
    for run in sweep.ok_runs:
        if run.rows is None or run.rows.empty:
            continue
        df = run.rows.copy()
        df.loc[df["sweep"] == "", "sweep"] = sweep.name
        df.loc[df["run"] == "", "run"] = run.run_id
        own = df["run"] == run.run_id
        df.loc[own & (df["method"] == ""), "method"] = run.method
        df.loc[own & df["seed"].isna(), "seed"] = run.seed
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True).drop_duplicates(ignore_index=True)


def aggregate_seeds(rows: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, evaluator, metric, slice).

    Several runs (seeds): the mean of the runs' values with a percentile bootstrap across them
    (``interval`` = "seeds"). One run: its own value and interval (``interval`` = "run").
    ``n`` sums the runs' n (NA when none is known).
    """
    out = []
    for key, g in rows.groupby(KEYS, sort=True, dropna=False):
        per_run = g.groupby("run", dropna=False).agg(value=("value", "mean"), ci_low=("ci_low", "mean"),
                                                    ci_high=("ci_high", "mean"))
        if len(per_run) == 1:
            value, lo, hi = per_run.iloc[0][["value", "ci_low", "ci_high"]]
            interval = "run"
        else:
            value, lo, hi = bootstrap_ci(per_run["value"].to_numpy(), n_boot=n_boot, seed=seed)
            interval = "seeds"
        out.append(dict(zip(KEYS, key), value=value, ci_low=lo, ci_high=hi, n=g["n"].sum(min_count=1),
                        n_seeds=len(per_run), interval=interval))
    return pd.DataFrame(out, columns=[*KEYS, "value", "ci_low", "ci_high", "n", "n_seeds", "interval"])


def samples_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per (usable run, prompt) with method, seed, run, prompt_id and the sample fields."""
    frames = [pd.DataFrame(r.samples).assign(method=r.method, seed=r.seed, run=r.run_id)
              for r in sweep.ok_runs if r.samples]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def judge_scores(samples: pd.DataFrame, column: str = "judge_reward") -> tuple[dict[str, np.ndarray], list[int]]:
    """Per method, the judge reward (or another per-sample ``column``) on each prompt (mean over the
    method's seeds), on the prompts every method answered. Returns (scores, prompt_ids)."""
    if samples.empty or column not in samples:
        return {}, []
    table = samples.pivot_table(index="prompt_id", columns="method", values=column, aggfunc="mean")
    table = table.dropna(axis=1, how="all").dropna()  # a method without judge rewards drops out, not the prompts
    return {m: table[m].to_numpy(float) for m in table.columns}, [int(p) for p in table.index]


def train_points(sweep: Sweep) -> list[dict]:
    """Every usable run's train_log points, with method and seed filled in from the run."""
    return [{**p, "method": p.get("method") or r.method, "seed": p.get("seed", r.seed)}
            for r in sweep.ok_runs for p in r.train_log]


def _se(value: float, lo: float, hi: float, n, z: float) -> float:
    if np.isfinite(lo) and np.isfinite(hi):
        return (hi - lo) / (2 * z)
    if pd.notna(n) and n > 0:
        return float(np.sqrt(value * (1 - value) / n))
    return float("nan")


def nlp_deltas(agg: pd.DataFrame, baseline: str, alpha: float = 0.05) -> pd.DataFrame:
    """acc(method) - acc(baseline) per task, from rows evaluator="nlp_tasks", metric="acc".

    Interval: normal approximation, delta +- z sqrt(se_m^2 + se_b^2), where each side's standard
    error is its interval's half-width / z (Wald sqrt(p(1-p)/n) when it has no interval). It treats
    the two sides as independent, which is conservative for the same task items.
    """
    nlp = agg[(agg["evaluator"] == "nlp_tasks") & (agg["metric"] == "acc")]
    base = nlp[nlp["method"] == baseline].set_index("slice")
    z = float(sps.norm.ppf(1 - alpha / 2))
    out = []
    for _, r in nlp[nlp["method"] != baseline].iterrows():
        if r["slice"] not in base.index:
            continue
        b = base.loc[r["slice"]]
        delta = r["value"] - b["value"]
        se = np.hypot(_se(r["value"], r["ci_low"], r["ci_high"], r["n"], z),
                      _se(b["value"], b["ci_low"], b["ci_high"], b["n"], z))
        out.append(dict(method=r["method"], task=r["slice"], acc=r["value"], baseline_acc=b["value"],
                        delta=delta, ci_low=delta - z * se, ci_high=delta + z * se))
    return pd.DataFrame(out, columns=["method", "task", "acc", "baseline_acc", "delta", "ci_low", "ci_high"])


def cost_frame(sweep: Sweep, samples: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per usable run: cost from metrics.json and mean judge reward of its samples (bootstrap CI)."""
    out = []
    for r in sweep.ok_runs:
        cost = r.metrics.get("cost", {}) if isinstance(r.metrics, dict) else {}
        mine = samples[samples["run"] == r.run_id] if not samples.empty else pd.DataFrame()
        judge = mine["judge_reward"].to_numpy(float) if "judge_reward" in mine else np.array([])
        value, lo, hi = bootstrap_ci(judge, n_boot=n_boot, seed=seed)
        out.append(dict(run=r.run_id, method=r.method, seed=r.seed, judge_reward=value, ci_low=lo, ci_high=hi,
                        **{k: cost.get(k) for k in COST_KEYS}))
    df = pd.DataFrame(out, columns=["run", "method", "seed", "judge_reward", "ci_low", "ci_high", *COST_KEYS])
    df[list(COST_KEYS)] = df[list(COST_KEYS)].apply(pd.to_numeric, errors="coerce")
    return df
