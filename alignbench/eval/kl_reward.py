"""Reward against d = sqrt(KL(pi || pi0)), from train_log points.

Three least-squares fits (Bai et al. 2022 §4.3; Gao et al. 2022):

* linear:     R(d) = slope * d + intercept
* best-of-n:  R(d) = d (alpha - beta d)
* RL:         R(d) = d (alpha - beta log d)     (d log d -> 0 at d = 0)

The last two pass through R(0) = 0, i.e. they model the reward gained over pi0. ``offset`` is
subtracted before fitting and added back when the curve is drawn; ``kl_reward_rows`` takes it
from the points with d = 0 (pi0 itself) when there are any. R^2 = 1 - SS_res / SS_tot of the
fitted rewards (NaN when they are all equal). A fit needs as many distinct design rows as it has
parameters; otherwise every value is NaN.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from alignbench.eval.stats import make_row

EVALUATOR = "kl_reward"
REWARD_KEYS = ("proxy_reward", "judge_reward")


def best_of_n_kl_bound(n) -> float:
    """Upper bound on KL(best-of-n ‖ π0): log n − (n − 1)/n (Beirami et al. 2024, arXiv
    2401.01879). Equality only for a continuous reward (no ties); repeated responses make it lower."""
    return float(np.log(n) - (n - 1) / n)


def _d_log_d(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


_FEATURES = {  # form -> (parameter names, design matrix of d)
    "linear": (("slope", "intercept"), lambda d: np.column_stack([d, np.ones_like(d)])),
    "bon": (("alpha", "beta"), lambda d: np.column_stack([d, -d * d])),
    "rl": (("alpha", "beta"), lambda d: np.column_stack([d, -_d_log_d(d)])),
}


@dataclass
class Fit:
    """A fitted curve; call it on d to draw it."""

    form: str
    params: dict[str, float]
    r2: float
    n: int
    offset: float = 0.0
    _coef: np.ndarray = field(default=None, repr=False)

    def __call__(self, d) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        return self.offset + _FEATURES[self.form][1](d.ravel()) @ self._coef


def _fit(form: str, d, r, offset: float = 0.0) -> Fit:
    d, r = np.asarray(d, dtype=float).ravel(), np.asarray(r, dtype=float).ravel()
    keep = ~(np.isnan(d) | np.isnan(r))
    d, y = d[keep], r[keep] - offset
    names, design = _FEATURES[form]
    if d.size < len(names) or np.linalg.matrix_rank(design(d)) < len(names):  # e.g. every d the same
        return Fit(form, dict.fromkeys(names, float("nan")), float("nan"), int(d.size), offset,
                   np.full(len(names), np.nan))
    coef = np.linalg.lstsq(design(d), y, rcond=None)[0]
    ss_res = float(np.sum((y - design(d) @ coef) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return Fit(form, {k: float(v) for k, v in zip(names, coef)}, r2, int(d.size), offset, coef)


def fit_linear(d, r) -> Fit:
    return _fit("linear", d, r)


def fit_bon(d, r, offset: float = 0.0) -> Fit:
    return _fit("bon", d, r, offset)


def fit_rl(d, r, offset: float = 0.0) -> Fit:
    return _fit("rl", d, r, offset)


# Inference-time policies (best-of-n) have no log-probs of their own: their points carry the
# sample estimate of KL(π‖π0) instead of k1/k3, and it stands in for ``kl_key`` there.
KL_FALLBACK = "kl_estimate"


def points_frame(points, kl_key: str = "kl_k3") -> pd.DataFrame:
    """train_log points as a DataFrame with ``d`` = sqrt(max(KL, 0)) from ``kl_key`` (or, where a
    point has none, its best-of-n sample estimate ``kl_estimate``)."""
    df = pd.DataFrame(list(points))
    kl = pd.to_numeric(df[kl_key], errors="coerce").astype(float) if kl_key in df else pd.Series(np.nan, index=df.index)
    if KL_FALLBACK in df:
        kl = kl.fillna(pd.to_numeric(df[KL_FALLBACK], errors="coerce").astype(float))
    df["kl"] = kl
    df["d"] = np.sqrt(df["kl"].clip(lower=0))
    for key in REWARD_KEYS:
        df[key] = pd.to_numeric(df[key], errors="coerce") if key in df else np.nan
    return df


def reward_offset(d: np.ndarray, r: np.ndarray) -> float:
    """Mean reward of pi0 (points with d == 0), or 0 when there are none."""
    at_zero = (d == 0) & ~np.isnan(r)
    return float(np.mean(r[at_zero])) if at_zero.any() else 0.0


def fits_for(d, r) -> dict[str, Fit]:
    """The three fits of one reward series, with the best-of-n/RL offset set from pi0's points."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    offset = reward_offset(d, r)
    return {"linear": fit_linear(d, r), "bon": fit_bon(d, r, offset), "rl": fit_rl(d, r, offset)}


def kl_reward_rows(points, kl_key: str = "kl_k3", **ident) -> list[dict]:
    """Fit rows per configuration (points' ``config``, else their method) and reward key (metric
    "<form>.<param>" or "<form>.r2", slice = reward key), plus measured KL against its upper bound
    for best-of-n points (label "n=<N>"). Points of all seeds of a configuration are pooled, never
    those of different configurations; ``seed`` is filled only when they share one. ``ident``:
    e.g. sweep, run."""
    df = points_frame(points, kl_key)
    if df.empty or "method" not in df:
        return []
    df["config"] = df["config"].fillna(df["method"]) if "config" in df else df["method"]
    rows = []
    for (config, method), g in df.groupby(["config", "method"], sort=True):
        seeds = g["seed"].dropna().unique() if "seed" in g else []
        common = dict(evaluator=EVALUATOR, method=method, config=config,
                      seed=int(seeds[0]) if len(seeds) == 1 else None, **ident)
        for key in REWARD_KEYS:
            d, r = g["d"].to_numpy(), g[key].to_numpy()
            if np.isnan(r).all():
                continue
            fits = fits_for(d, r)
            rows.append(make_row(metric="offset", slice=key, value=fits["bon"].offset, n=int(len(g)), **common))
            for form, fit in fits.items():
                if all(np.isnan(v) for v in fit.params.values()):
                    continue  # too few distinct d to fit this form
                for name, value in [*fit.params.items(), ("r2", fit.r2)]:
                    rows.append(make_row(metric=f"{form}.{name}", slice=key, value=value, n=fit.n, **common))
        labels = g["label"].astype(str) if "label" in g else pd.Series("", index=g.index)
        for label, lg in g.groupby(labels):
            match = re.fullmatch(r"n=(\d+)", label)
            if match:
                kl = lg["kl"].dropna()
                rows.append(make_row(metric="kl_best_of_n", slice=label, value=float(kl.mean()) if len(kl) else
                                     float("nan"), n=int(len(kl)), **common))
                rows.append(make_row(metric="kl_best_of_n_bound", slice=label,
                                     value=best_of_n_kl_bound(int(match.group(1))), **common))
    return rows
