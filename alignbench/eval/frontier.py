"""The reward–KL frontier across method families, and their ranking at a matched KL.

A method family is what the frontier compares (the DPO paper's Fig. 2 left; Gao et al.'s Fig. 1):
the method name, except rejection sampling, which is best-of-n (an inference-time policy, points
labelled "n=<k>") or RS fine-tuning. Its configurations (method plus overrides) are the points a
family sweeps out; seeds of one configuration are averaged, configurations never are.

Ranking at matched KL: the matched level L is a KL budget, the smallest sqrt(KL(π‖π0)) at which
every family with a nonzero KL has a configuration whose run ends at or below it (the maximum over
those families of their smallest final sqrt KL), so that no family drops out of the ranking. Each
family's best configuration among those whose final sqrt KL is ≤ L is chosen by its gold reward on the selection prompts (the EVAL split, never the reported
test prompts) when every run of the family records one; otherwise by the reported prompts, which
is optimistic and labelled so.

Choice at a common eval-split KL (the report's Findings): the level is the smallest, over families
with more than one configuration measured on the eval split, of the family's largest eval-split KL
(metrics.json ``selection.kl``), so every such family's KL range reaches it. Each family takes the
configuration with the highest eval-split judge reward among those at or below it, else its
lowest-KL configuration; a family with one configuration takes it, and a family whose runs lack the
selection measurement takes its first configuration by name, labelled so.
"""
from __future__ import annotations

import re
from itertools import combinations

import numpy as np
import pandas as pd

from alignbench.eval.stats import bootstrap_ci, make_row, seed_interval

EVALUATOR = "frontier"
SELECTED_EVAL = "selection prompts (eval split)"
SELECTED_TEST = "selected on the reported prompts (optimistic)"
# a configuration's final sqrt KL counts as reaching the level within this (float noise of a mean)
KL_TOL = 1e-9


def family_of(method: str, metrics: dict | None, labels=()) -> str:
    """metrics.json's ``family`` when present; else the method, with rejection_sampling split into
    "best_of_n" (its points are labelled "n=<k>") and "rs_finetune"."""
    if isinstance(metrics, dict) and metrics.get("family"):
        return str(metrics["family"])
    if method != "rejection_sampling":
        return method
    return "best_of_n" if any(re.fullmatch(r"n=\d+", str(label)) for label in labels) else "rs_finetune"


def upper_envelope(d, r) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto frontier of (d, r) points: at each distinct d (ascending), the best reward reached
    at sqrt KL ≤ d, E(d_i) = max{r_j : d_j ≤ d_i}. NaN points are ignored."""
    d, r = np.asarray(d, float).ravel(), np.asarray(r, float).ravel()
    keep = np.isfinite(d) & np.isfinite(r)
    d, r = d[keep], r[keep]
    if d.size == 0:
        return np.array([]), np.array([])
    xs = np.unique(d)
    best_at = np.array([r[d == x].max() for x in xs])
    return xs, np.maximum.accumulate(best_at)


def matched_level(final_d: pd.DataFrame) -> float:
    """L = max over families of min final sqrt KL over the family's configurations, among families
    whose smallest final sqrt KL is > 0 (π0's own family, at KL 0, is within every budget): the
    smallest budget at which every family has a configuration. ``final_d``: columns family, final_d.
    NaN when no family has a nonzero KL."""
    least = final_d.groupby("family")["final_d"].min()
    least = least[least > 0]
    return float(least.max()) if len(least) else float("nan")


def choose_configs(configs: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per family, the configuration with final_d ≤ level (+ KL_TOL) and the highest ``select``
    score. ``configs``: columns family, config, final_d, select, selected_on. One row per family that
    has an eligible configuration."""
    eligible = configs[(configs["final_d"] <= level + KL_TOL) & configs["select"].notna()]
    best = eligible.sort_values(["family", "select", "config"], ascending=[True, False, True])
    return best.drop_duplicates("family").reset_index(drop=True)


COMMON_BEST = "eval split: best judge reward at KL ≤ level"
COMMON_LOWEST = "eval split: none at KL ≤ level, lowest KL"
COMMON_ONLY = "only configuration"
COMMON_FIRST = "no eval-split selection: first configuration by name"


def common_kl_level(configs: pd.DataFrame) -> float:
    """L = min over families F with more than one configuration of max{selection_kl(c) : c in F,
    measured}, counting only configurations selected on the eval split (``selected_on`` ==
    SELECTED_EVAL) with a known eval-split KL. ``configs``: columns family, config, selection_kl,
    selected_on (``config_frame``). NaN when no family qualifies."""
    sizes = configs.groupby("family")["config"].nunique()
    measured = configs[(configs["selected_on"] == SELECTED_EVAL) & configs["selection_kl"].notna()
                       & (configs["family"].map(sizes) > 1)]
    top = measured.groupby("family")["selection_kl"].max()
    return float(top.min()) if len(top) else float("nan")


def choose_at_common_kl(configs: pd.DataFrame, level: float) -> pd.DataFrame:
    """One row per family (sorted), the columns of ``configs`` with ``how`` (one of the COMMON_*
    labels): a family of one configuration takes it; a family not selected on the eval split its
    first configuration by name; otherwise ``choose_configs`` on the eval-split KL (the highest
    eval-split judge reward at KL ≤ level), else the configuration with the lowest eval-split KL
    (then by name). A NaN level leaves no configuration eligible."""
    out = []
    for _, g in configs.sort_values("config").groupby("family", sort=True):
        if len(g) == 1:
            pick, how = g.iloc[0], COMMON_ONLY
        elif not (g["selected_on"] == SELECTED_EVAL).all():
            pick, how = g.iloc[0], COMMON_FIRST
        else:
            best = choose_configs(g.assign(final_d=g["selection_kl"]), level)
            if len(best):
                pick, how = g[g["config"] == best["config"].iloc[0]].iloc[0], COMMON_BEST
            else:
                pick = g.sort_values(["selection_kl", "config"], na_position="last").iloc[0]
                how = COMMON_LOWEST
        out.append({**pick.to_dict(), "how": how})
    return pd.DataFrame(out, columns=[*configs.columns, "how"])


def prompt_means(samples: pd.DataFrame, config: str, column: str = "judge_reward") -> pd.Series:
    """A configuration's reward per prompt, mean over its seeds (index prompt_id)."""
    mine = samples[samples["config"] == config]
    return mine.groupby("prompt_id")[column].mean().dropna()


def seed_means(samples: pd.DataFrame, config: str, column: str = "judge_reward") -> np.ndarray:
    """A configuration's mean reward over prompts, one value per seed."""
    mine = samples[samples["config"] == config]
    return mine.groupby("seed")[column].mean().dropna().to_numpy(float)


def ranking_rows(samples: pd.DataFrame, chosen: pd.DataFrame, level: float, n_boot: int = 2000, seed: int = 0,
                 evaluator: str = EVALUATOR, **ident) -> list[dict]:
    """Rows (evaluator "frontier", or ``evaluator``) for the matched-KL ranking of the ``chosen``
    configurations:

    * "matched_sqrt_kl": L (config "", n = families ranked);
    * per family (config and method = the family, slice = "<chosen config>|<how it was selected>"):
      "matched_gold_reward": mean over prompts of the seed-mean gold reward, percentile bootstrap
      over prompts (n = prompts); "matched_gold_reward_seeds": the mean over seeds with the seed
      interval (``seed_interval``; n = seeds); "final_sqrt_kl": the chosen configuration's final sqrt KL;
    * per ordered pair of families A, B with A ahead ("matched_gold_diff", config A, slice "vs:B"):
      mean over the prompts both answered of (seed-mean A − seed-mean B), paired percentile bootstrap
      over prompts; it separates the two when the interval excludes 0.
    """
    rows = [make_row(evaluator=evaluator, metric="matched_sqrt_kl", config="", method="", value=level,
                     n=int(len(chosen)), **ident)]
    per_prompt = {}
    for c in chosen.itertuples():
        common = dict(evaluator=evaluator, config=c.family, method=c.family, slice=f"{c.config}|{c.selected_on}",
                      **ident)
        per_prompt[c.family] = prompt_means(samples, c.config)
        value, lo, hi = bootstrap_ci(per_prompt[c.family].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append(make_row(metric="matched_gold_reward", value=value, ci_low=lo, ci_high=hi,
                             n=int(len(per_prompt[c.family])), **common))
        by_seed = seed_means(samples, c.config)
        mean, s_lo, s_hi, _ = seed_interval(by_seed, n_boot=n_boot, seed=seed)
        rows.append(make_row(metric="matched_gold_reward_seeds", value=mean, ci_low=s_lo, ci_high=s_hi,
                             n=int(by_seed.size), **common))
        rows.append(make_row(metric="final_sqrt_kl", value=c.final_d, **common))
    order = sorted(per_prompt, key=lambda f: -per_prompt[f].mean())
    for a, b in combinations(order, 2):
        both = per_prompt[a].index.intersection(per_prompt[b].index)
        diff = (per_prompt[a][both] - per_prompt[b][both]).to_numpy(float)
        value, lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
        rows.append(make_row(evaluator=evaluator, metric="matched_gold_diff", config=a, method=a, slice=f"vs:{b}",
                             value=value, ci_low=lo, ci_high=hi, n=int(both.size), **ident))
    return rows


def separates(lo: float, hi: float) -> bool:
    """A paired difference separates two families when its interval excludes 0."""
    return bool(np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0))
