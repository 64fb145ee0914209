"""Report section: Llama 2's two reward models (Touvron et al. 2023 §3.2.2) against the single proxy PM.

Per configuration (method × reward kind; seeds aggregated, configurations never): the gold reward's
harmless and helpful parts, the violation rate (harmful prompts answered with compliance) and the
false-refusal rate (benign edgy prompts refused), from each run's "safety" rows
(``alignbench.eval.safety``), and the judge reward. Then, for PPO, two-RM minus single-RM differences
of the violation and false-refusal rates with a sentence saying whether two-RM PPO lowers violations
without raising false refusals as much as single-RM PPO does, and the reward PMs' held-out accuracy
next to the single PM's (metrics.json ``reward.pms``).

Intervals (95%): a configuration's value is the mean over its seeds with ``seed_interval`` (Student-t
below 5 seeds); with one seed, the run's own percentile bootstrap over prompts. A difference is
paired by seed (two-RM seed s minus single-RM seed s, same π0 and sampling streams) with
``seed_interval`` over the seed differences; a PM's accuracy has the Clopper–Pearson interval over its
held-out pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from alignbench.eval.safety import SAFETY_METRICS
from alignbench.eval.stats import binomial_ci, seed_interval
from alignbench.report.load import Sweep
from alignbench.report.render import Heading, Note, Para, Table

TITLE = "Safety and helpfulness (two reward models)"
LABELS = {"gold_harmless": "gold harmless part", "gold_helpful": "gold helpful part",
          "violation_rate": "violation rate", "false_refusal_rate": "false-refusal rate", "judge": "judge reward"}
REWARD_NAMES = {"single": "single RM", "safety_helpful": "two RMs (safety + helpful)", "none": "none (π0)"}
EXPLAIN = (
    "Llama 2's reward (reward=safety_helpful): a safety PM trained on the harmless comparisons and a "
    "helpfulness PM on the helpful ones, each score whitened with its PM's eval-split statistics; a response "
    "gets the safety score when its prompt is tagged harmful (reward.tag) or σ(safety score) < reward.threshold, "
    "else the helpfulness score. Single RM: the one proxy PM. Columns, on the fixed test prompts, scored by the "
    "gold reward's parts: gold harmless part (mean over harmful and edgy prompts), gold helpful part (mean over "
    "the prompts that are not harmful), violation rate (share of harmful prompts answered with compliance), "
    "false-refusal rate (share of benign edgy prompts refused), judge reward (the whole gold reward). "
    "\"safety share\": responses the safety PM's rule scored / all the reward scored in training. "
    "Intervals: 95% over the seeds of one configuration (t below 5 seeds); with one seed, the run's bootstrap "
    "over prompts (\"prompts\").")


def reward_kind(run) -> str:
    return run.metrics.get("reward", {}).get("kind", "single")


def method_settings(run) -> str:
    """The run's method section (config.yaml), to pair single- and two-RM configurations that differ
    only in the reward."""
    path = Path(run.dir) / "config.yaml"
    method = OmegaConf.to_container(OmegaConf.load(path)).get("method", {}) if path.exists() else {}
    return json.dumps(method, sort_keys=True, default=str)


def safety_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per usable run with safety rows: its configuration, family, reward kind, seed, and
    each metric's value and own interval (``<metric>``, ``<metric>_lo``, ``<metric>_hi``)."""
    rows = []
    for run in sweep.ok_runs:
        if run.rows is None or not len(run.rows):
            continue
        own = run.rows[run.rows["evaluator"].isin(["safety", "policy"])]
        found = {m: own[(own["evaluator"] == "safety") & (own["metric"] == m)] for m in SAFETY_METRICS}
        if all(f.empty for f in found.values()):
            continue
        found["judge"] = own[(own["evaluator"] == "policy") & own["metric"].str.endswith("_reward")
                             & (own["metric"] != "proxy_reward")]
        family = run.metrics.get("family", run.method)
        row = {"config": run.config, "family": family, "method": run.method,
               "reward": "none" if family == "context_distilled" else reward_kind(run), "seed": run.seed, "settings": method_settings(run),
               "safety_share": run.metrics.get("reward", {}).get("used_safety_share")}
        for m, f in found.items():
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = ((float(f["value"].iloc[0]), float(f["ci_low"].iloc[0]),
                                                       float(f["ci_high"].iloc[0])) if len(f) else (np.nan,) * 3)
        rows.append(row)
    return pd.DataFrame(rows)


def config_interval(g: pd.DataFrame, metric: str) -> tuple[float, float, float, str]:
    """(mean, lo, hi, label) of ``metric`` over a configuration's seeds; one seed: its run's interval."""
    ok = g.dropna(subset=[metric])
    if len(ok) == 1:
        return float(ok[metric].iloc[0]), float(ok[f"{metric}_lo"].iloc[0]), float(ok[f"{metric}_hi"].iloc[0]), "prompts"
    return seed_interval(ok[metric].to_numpy()) if len(ok) else (np.nan, np.nan, np.nan, "none")


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[float, float, float, str]:
    """a − b paired by seed: Δ_s = a_s − b_s over the seeds both have, mean and ``seed_interval``
    over the Δ_s (one common seed: its Δ without an interval)."""
    va, vb = a.set_index("seed")[metric].dropna(), b.set_index("seed")[metric].dropna()
    d = (va - vb).dropna()
    if len(d) == 0:
        return np.nan, np.nan, np.nan, "no common seed"
    if len(d) == 1:
        return float(d.iloc[0]), np.nan, np.nan, "one seed"
    return seed_interval(d.to_numpy())


def fmt(stat: tuple, signed: bool = False) -> str:
    mean, lo, hi, label = stat
    if pd.isna(mean):
        return "–"
    num = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return num if pd.isna(lo) else f"{num} [{lo:.3f}, {hi:.3f}] {label}"


def config_table(frame: pd.DataFrame) -> Table:
    rows = []
    order = frame.assign(first=frame["reward"] != "none")  # π0 first, then each method's two rewards together
    for (_, family, reward, config), g in order.groupby(["first", "family", "reward", "config"], sort=True):
        share = g["safety_share"].dropna()
        rows.append([config, family, REWARD_NAMES.get(reward, reward), *(fmt(config_interval(g, m)) for m in LABELS),
                     f"{share.mean():.3f}" if len(share) else "–", str(g["seed"].nunique())])
    return Table(["configuration", "method", "reward", *LABELS.values(), "safety share", "seeds"], rows)


def sign_vs_zero(stat: tuple) -> int | None:
    """−1 when the interval lies below 0, 1 above, 0 when it holds 0, None without an interval."""
    mean, lo, hi, _ = stat
    if any(pd.isna(x) for x in (mean, lo, hi)):
        return None
    return -1 if hi < 0 else 1 if lo > 0 else 0


def two_rm_verdict(d_violation: tuple, d_false_refusal: tuple) -> str:
    """The issue's claim from Δ = two-RM − single-RM PPO (each (mean, lo, hi, label)): two-RM PPO
    lowers violations (Δviolation's interval below 0) without raising false refusals as much as
    single-RM PPO does (Δfalse-refusal's interval not above 0)."""
    v, f = sign_vs_zero(d_violation), sign_vs_zero(d_false_refusal)
    nums = f"(Δviolation {fmt(d_violation, True)}, Δfalse-refusal {fmt(d_false_refusal, True)})"
    if v is None or f is None:
        return f"An interval is missing (fewer than two seeds of each), so this sweep cannot tell {nums}."
    if v < 0 and f < 0:
        return f"Two-RM PPO lowers the violation rate and also refuses fewer benign edgy requests than single-RM PPO {nums}."
    if v < 0 and f == 0:
        return ("Two-RM PPO lowers the violation rate without raising false refusals as much as single-RM PPO: "
                f"the false-refusal difference's interval holds 0 {nums}.")
    if v > 0:
        return f"Two-RM PPO does not lower violations: its violation rate is higher than single-RM PPO's {nums}."
    if f > 0:
        return (f"Two-RM PPO does not hold false refusals down: it refuses more benign edgy requests than single-RM "
                f"PPO {nums}.")
    return (f"The intervals cannot tell whether two-RM PPO lowers violations: the violation difference's interval "
            f"holds 0 {nums}.")


def pairs_of(frame: pd.DataFrame, family: str) -> list[tuple[str, str]]:
    """(single-RM config, two-RM config) of ``family`` with the same method settings."""
    fam = frame[frame["family"] == family]
    one = fam[fam["reward"] == "single"].groupby(["settings", "config"]).size().reset_index()
    two = fam[fam["reward"] == "safety_helpful"].groupby(["settings", "config"]).size().reset_index()
    both = one.merge(two, on="settings", suffixes=("_one", "_two"))
    return list(zip(both["config_one"], both["config_two"]))


def ppo_blocks(frame: pd.DataFrame) -> list:
    pairs = pairs_of(frame, "ppo")
    if not pairs:
        return [Note("no PPO configuration ran with both the single and the two reward models (same method "
                     "settings): nothing to compare for PPO.")]
    rows, paras = [], []
    for one, two in pairs:
        a, b = frame[frame["config"] == two], frame[frame["config"] == one]
        diffs = {m: paired_difference(a, b, m) for m in LABELS}
        rows.append([f"{two} − {one}", *(fmt(diffs[m], True) for m in LABELS), str(len(set(a["seed"]) & set(b["seed"])))])
        paras.append(Para(f"{two} vs {one}: " + two_rm_verdict(diffs["violation_rate"], diffs["false_refusal_rate"])))
    table = Table(["PPO: two RMs − single RM", *(f"Δ {v}" for v in LABELS.values()), "paired seeds"], rows)
    return [Para("PPO, two reward models minus the single one, paired by seed (95% t-interval over the seed "
                 "differences below 5 seeds):"), table, *paras]


def pm_table(sweep: Sweep) -> Table | None:
    """The reward PMs' held-out accuracy next to the single PM's (the first run recording both)."""
    pms = next((r.metrics["reward"]["pms"] for r in sweep.ok_runs
                if "safety" in r.metrics.get("reward", {}).get("pms", {})), None)
    if pms is None:
        return None
    cols = [("heldout_accuracy", "label acc."), ("heldout_gold_accuracy", "gold acc."),
            ("heldout_gold_accuracy_harmless", "gold acc. harmless"), ("heldout_gold_accuracy_helpful", "gold acc. helpful")]

    def cell(rec: dict, key: str) -> str:
        if rec.get(key) is None:
            return "–"
        n = rec[f"n_{key}"]
        lo, hi = binomial_ci(rec[key] * n, n)
        return f"{rec[key]:.3f} [{lo:.3f}, {hi:.3f}] n={n}"

    rows = [[name, f"{rec['stage']}-{rec['key']}", *(cell(rec, k) for k, _ in cols)] for name, rec in pms.items()]
    return Table(["PM", "stage", *(c for _, c in cols)], rows)


def tag_advantage(sweep: Sweep) -> list:
    """A note when a serving-time method (best-of-n) chose with the two RMs under reward.tag=subset: it
    read the TEST prompts' true harm tags, which the trained methods never saw (they were tagged on
    their training prompts only), an advantage its row must be read with."""
    served = sorted({run.config for run in sweep.ok_runs if run.metrics.get("family") == "best_of_n"
                     and (run.metrics.get("reward") or {}).get("tag") == "subset"})
    if not served:
        return []
    return [Note(f"{', '.join(served)}: best-of-n chose with the two RMs using the test prompts' true harm tags "
                 "(reward.tag=subset), which the trained methods never saw (they saw tags on training prompts "
                 "only): its rows carry that advantage. reward.tag=classifier (the safety PM decides) removes it.")]


def safety_blocks(sweep: Sweep) -> list:
    """The section (none unless the sweep has a usable reward=safety_helpful run with safety rows)."""
    frame = safety_frame(sweep)
    if frame.empty or not (frame["reward"] == "safety_helpful").any():
        return []
    blocks = [Heading(TITLE), Para(EXPLAIN), config_table(frame), *tag_advantage(sweep), *ppo_blocks(frame)]
    pms = pm_table(sweep)
    blocks += [Para("Held-out accuracy of the reward PMs and of the single proxy PM (the pairwise test split; a "
                    "reward PM's of its harm group only; gold accuracy leaves gold ties out; 95% Clopper–Pearson "
                    "over the pairs):"), pms] if pms else [Note("no run recorded the reward PMs' held-out accuracy")]
    return blocks
