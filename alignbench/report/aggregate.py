"""Turn the usable runs of a sweep into the frames the tables and plots draw from.

The unit is the configuration (``config``: method plus its own overrides, the run id without its
seed); runs of one configuration are its seeds, and only they are aggregated together."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from alignbench.eval.stats import COLUMNS, bootstrap_ci, make_row, seed_interval
from alignbench.eval.win_rate import win_rates
from alignbench.report.load import Sweep

KEYS = ["config", "method", "evaluator", "metric", "slice"]
# measure_s: time spent measuring (KL, reward points), excluded from wall_s; flops: the
# training + generation + PM compute charged to the run. Both absent in runs before they existed.
COST_KEYS = ("wall_s", "measure_s", "flops", "tokens_trained", "tokens_generated", "pm_calls")


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
        # the run (index.json) knows its method, configuration and seed best: a damaged or hand-edited
        # copy in its results.csv must not split one configuration's rows in two
        df.loc[own, "method"] = run.method if run.method != "?" else df.loc[own, "method"]
        df.loc[own, "config"] = run.config or run.method
        df.loc[df["config"] == "", "config"] = df["method"]  # shared rows (the PM's): one per method
        if run.seed is not None:
            df.loc[own, "seed"] = run.seed
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True).drop_duplicates(ignore_index=True)


def aggregate_seeds(rows: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (config, method, evaluator, metric, slice): only seeds of one configuration are
    aggregated, never configurations of one method.

    Several runs (seeds): the mean of the runs' values; with 5 or more a percentile bootstrap across
    them (``interval`` = "bootstrap(n=N)"), with 2-4 a Student-t interval (``interval`` =
    "t(n=N)"); ``range_low``/``range_high`` are their min and max. One run: its own value and
    interval (``interval`` = "run"). ``n`` sums the runs' n (NA when none is known).
    """
    out = []
    for key, g in rows.groupby(KEYS, sort=True, dropna=False):
        per_run = g.groupby("run", dropna=False).agg(value=("value", "mean"), ci_low=("ci_low", "mean"),
                                                    ci_high=("ci_high", "mean"))
        if len(per_run) == 1:
            value, lo, hi = per_run.iloc[0][["value", "ci_low", "ci_high"]]
            interval = "run"
        else:
            value, lo, hi, interval = seed_interval(per_run["value"].to_numpy(), n_boot=n_boot, seed=seed)
        out.append(dict(zip(KEYS, key), value=value, ci_low=lo, ci_high=hi, n=g["n"].sum(min_count=1),
                        n_seeds=len(per_run), interval=interval, range_low=per_run["value"].min(),
                        range_high=per_run["value"].max()))
    return pd.DataFrame(out, columns=[*KEYS, "value", "ci_low", "ci_high", "n", "n_seeds", "interval",
                                      "range_low", "range_high"])


def samples_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per (usable run, prompt) with config, method, seed, run, prompt_id and the sample
    fields."""
    frames = [pd.DataFrame(r.samples).assign(config=r.config or r.method, method=r.method, seed=r.seed,
                                             run=r.run_id)
              for r in sweep.ok_runs if r.samples]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def judge_scores(samples: pd.DataFrame, column: str = "judge_reward") -> tuple[dict[str, np.ndarray], list[int]]:
    """Per config, the judge reward (or another per-sample ``column``) on each prompt (mean over the
    config's seeds), on the prompts every config answered. Returns (scores, prompt_ids)."""
    if samples.empty or column not in samples:
        return {}, []
    table = samples.pivot_table(index="prompt_id", columns="config", values=column, aggfunc="mean")
    table = table.dropna(axis=1, how="all").dropna()  # a config without judge rewards drops out, not the prompts
    return {m: table[m].to_numpy(float) for m in table.columns}, [int(p) for p in table.index]


def response_texts(samples: pd.DataFrame, configs, prompt_ids: list[int]) -> dict[str, list]:
    """Per config, its response text on each of ``prompt_ids``: the text when every seed of the
    config gave that same text, else None (then only the scores decide a comparison)."""
    if samples.empty or "response" not in samples:
        return {}
    one = samples.groupby(["config", "prompt_id"])["response"].agg(lambda r: r.iloc[0] if r.nunique() == 1 else None)
    return {c: [one.get((c, p)) for p in prompt_ids] for c in configs}


def baseline_config(configs, methods: dict[str, str], baseline: str) -> str | None:
    """The configuration of the baseline method (``baseline`` itself when it is a configuration's
    name; else the first configuration of that method), or None."""
    if baseline in configs:
        return baseline
    return next((c for c in sorted(configs) if methods.get(c) == baseline), None)


def train_points(sweep: Sweep) -> list[dict]:
    """Every usable run's train_log points, with config, method and seed filled in from the run; a
    point that repeats an earlier one of its run (``repeats_step``: the final evaluation of the
    weights its last log point measured) is left out, so no measurement counts twice."""
    return [{**p, "method": p.get("method") or r.method, "config": r.config or r.method, "seed": p.get("seed", r.seed)}
            for r in sweep.ok_runs for p in r.train_log if p.get("repeats_step") is None]


def _se(value: float, lo: float, hi: float, n, z: float) -> float:
    if np.isfinite(lo) and np.isfinite(hi):
        return (hi - lo) / (2 * z)
    if pd.notna(n) and n > 0:
        return float(np.sqrt(value * (1 - value) / n))
    return float("nan")


def nlp_deltas(agg: pd.DataFrame, baseline: str, alpha: float = 0.05) -> pd.DataFrame:
    """acc(config) - acc(baseline config) per task, from rows evaluator="nlp_tasks", metric="acc".

    Interval: normal approximation, delta +- z sqrt(se_m^2 + se_b^2), where each side's standard
    error is its interval's half-width / z (Wald sqrt(p(1-p)/n) when it has no interval). It treats
    the two sides as independent, which is conservative for the same task items.
    """
    nlp = agg[(agg["evaluator"] == "nlp_tasks") & (agg["metric"] == "acc")]
    base = nlp[nlp["config"] == baseline].set_index("slice")
    z = float(sps.norm.ppf(1 - alpha / 2))
    out = []
    for _, r in nlp[nlp["config"] != baseline].iterrows():
        if r["slice"] not in base.index:
            continue
        b = base.loc[r["slice"]]
        delta = r["value"] - b["value"]
        se = np.hypot(_se(r["value"], r["ci_low"], r["ci_high"], r["n"], z),
                      _se(b["value"], b["ci_low"], b["ci_high"], b["n"], z))
        out.append(dict(config=r["config"], method=r["method"], task=r["slice"], acc=r["value"],
                        baseline_acc=b["value"], delta=delta, ci_low=delta - z * se, ci_high=delta + z * se))
    return pd.DataFrame(out, columns=["config", "method", "task", "acc", "baseline_acc", "delta", "ci_low", "ci_high"])


def _truncation(samples: pd.DataFrame) -> float:
    """Fraction of a run's responses cut at max_new_tokens (samples' ``finished`` False); NaN when
    the samples do not say."""
    if "finished" not in samples or samples["finished"].isna().all():
        return float("nan")
    return float(1.0 - samples["finished"].dropna().astype(bool).mean())


def cost_frame(sweep: Sweep, samples: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per usable run: cost from metrics.json (NaN where a field is absent), mean judge reward of its
    samples (bootstrap CI) and their truncation rate."""
    out = []
    for r in sweep.ok_runs:
        cost = r.metrics.get("cost", {}) if isinstance(r.metrics, dict) else {}
        mine = samples[samples["run"] == r.run_id] if not samples.empty else pd.DataFrame()
        judge = mine["judge_reward"].to_numpy(float) if "judge_reward" in mine else np.array([])
        value, lo, hi = bootstrap_ci(judge, n_boot=n_boot, seed=seed)
        out.append(dict(run=r.run_id, config=r.config or r.method, method=r.method, seed=r.seed, judge_reward=value,
                        ci_low=lo, ci_high=hi, truncation_rate=_truncation(mine),
                        **{k: cost.get(k) for k in COST_KEYS}))
    df = pd.DataFrame(out, columns=["run", "config", "method", "seed", "judge_reward", "ci_low", "ci_high",
                                    "truncation_rate", *COST_KEYS])
    df[list(COST_KEYS)] = df[list(COST_KEYS)].apply(pd.to_numeric, errors="coerce")
    return df


# --------------------------------------------------------------------------- evaluation-prompt mix
def prompt_meta(sweep: Sweep, samples: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation prompt (prompt_id, subset, n_turns): from the samples' ``subset`` and
    ``n_turns``, else from a run's metrics.json ``eval_prompts`` (a list of {subset, n_turns} in
    prompt order); empty when neither says."""
    if not samples.empty and "subset" in samples:
        cols = ["prompt_id", "subset", *(["n_turns"] if "n_turns" in samples else [])]
        return samples.dropna(subset=["subset"]).drop_duplicates("prompt_id")[cols].sort_values("prompt_id")
    for r in sweep.ok_runs:
        meta = r.metrics.get("eval_prompts") if isinstance(r.metrics, dict) else None
        if isinstance(meta, list) and meta and all(isinstance(m, dict) and "subset" in m for m in meta):
            return pd.DataFrame([{"prompt_id": i, **m} for i, m in enumerate(meta)])
    return pd.DataFrame(columns=["prompt_id", "subset", "n_turns"])


def subset_groups(subsets) -> dict[str, list[str]]:
    """Each subset on its own, plus "harmless*" and "helpful*" (every subset whose name contains the
    word, e.g. HH's helpful-base, helpful-online, helpful-rejection-sampled) where such a group
    holds more than one subset."""
    names = sorted({str(s) for s in subsets})
    groups = {f"{w}*": [s for s in names if w in s] for w in ("harmless", "helpful")}
    return {**{g: m for g, m in groups.items() if len(m) > 1}, **{s: [s] for s in names}}


def subset_rows(scores: dict[str, np.ndarray], texts: dict, prompt_ids: list[int], meta: pd.DataFrame,
                baseline: str | None, n_boot: int = 2000, seed: int = 0, **ident) -> list[dict]:
    """Per subset group (``subset_groups``) and config (in ``method``, as ``win_rates`` does): the
    mean judge reward on the group's prompts (evaluator "judge_by_subset", metric "judge_reward",
    percentile bootstrap over prompts) and the win rate against the baseline config (evaluator
    "win_rate_by_subset", slice "<group>|vs:<baseline>", as ``win_rates``)."""
    if not scores or meta.empty:
        return []
    subset_of = dict(zip(meta["prompt_id"].astype(int), meta["subset"].astype(str)))
    subsets = np.array([subset_of.get(p) for p in prompt_ids], dtype=object)
    rows = []
    for group, members in subset_groups(v for v in subsets if v is not None).items():
        mask = np.isin(subsets, members)
        for config, s in sorted(scores.items()):
            value, lo, hi = bootstrap_ci(s[mask], n_boot=n_boot, seed=seed)
            rows.append(make_row(evaluator="judge_by_subset", metric="judge_reward", method=config, slice=group,
                                 value=value, ci_low=lo, ci_high=hi, n=int(mask.sum()), **ident))
        if baseline not in scores or len(scores) < 2:
            continue
        part = win_rates({c: s[mask] for c, s in scores.items()}, baseline, n_boot=n_boot, seed=seed,
                         texts={c: list(np.asarray(t, dtype=object)[mask]) for c, t in texts.items()} or None)
        rows += [{**r, "evaluator": "win_rate_by_subset", "slice": f"{group}|{r['slice']}"}
                 for r in part if r["metric"] == "win_rate" and r["slice"] == f"vs:{baseline}"]
    return rows
