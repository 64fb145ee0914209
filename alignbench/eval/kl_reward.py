"""Reward against d = sqrt(KL(pi || pi0)), from train_log points.

Three least-squares fits (Bai et al. 2022 §4.3; Gao et al. 2022):

* linear:     R(d) = slope * d + intercept
* best-of-n:  R(d) = offset + d (alpha - beta d)
* RL:         R(d) = offset + d (alpha - beta log d)     (d log d -> 0 at d = 0)

The last two model the reward gained over pi0: ``offset`` is subtracted before fitting and added
back when the curve is drawn; ``kl_reward_rows`` takes it from the points with d = 0 (pi0 itself)
when there are any, and then counts it as a third parameter. R^2 = 1 - SS_res / SS_tot of the
fitted rewards (NaN when they are all equal).

A fit is produced only from at least p + 2 distinct d values (p its number of parameters): a
curve with as many parameters as points passes through them whatever they are, and R^2 = 1 then
says nothing. Below that every value is NaN and ``Fit.ok`` is False.

Peaks (interior maxima, only when beta > 0): best-of-n d* = alpha / (2 beta),
R* = offset + alpha^2 / (4 beta); RL d* = exp(alpha / beta - 1), R* = offset + beta d*.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from alignbench.eval.stats import make_row

ALPHA = 0.05

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


def n_params(form: str, offset_estimated: bool = False) -> int:
    """Parameters of a form: its coefficients, plus the offset of the best-of-n and RL forms when it
    is estimated from pi0's points rather than given."""
    return len(_FEATURES[form][0]) + (1 if offset_estimated and form != "linear" else 0)


def min_points(form: str, offset_estimated: bool = False) -> int:
    """The fewest distinct d a fit needs: p + 2."""
    return n_params(form, offset_estimated) + 2


@dataclass
class Fit:
    """A fitted curve; call it on d to draw it. ``n``: points used; ``n_distinct``: distinct d;
    ``p``: parameters counted for the p + 2 rule."""

    form: str
    params: dict[str, float]
    r2: float
    n: int
    offset: float = 0.0
    _coef: np.ndarray = field(default=None, repr=False)
    n_distinct: int = 0
    p: int = 0

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self._coef).all()) if self._coef is not None else False

    def __call__(self, d) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        return self.offset + _FEATURES[self.form][1](d.ravel()) @ self._coef


def _lstsq(form: str, d: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients, or None when the design is rank-deficient (e.g. every d the same)."""
    names, design = _FEATURES[form]
    if d.size < len(names):
        return None
    coef, _, rank, _ = np.linalg.lstsq(design(d), y, rcond=None)
    return coef if rank == len(names) else None


def _fit(form: str, d, r, offset: float = 0.0, offset_estimated: bool = False) -> Fit:
    d, r = np.asarray(d, dtype=float).ravel(), np.asarray(r, dtype=float).ravel()
    keep = ~(np.isnan(d) | np.isnan(r))
    d, y = d[keep], r[keep] - offset
    names, design = _FEATURES[form]
    p, distinct = n_params(form, offset_estimated), int(np.unique(d).size)
    coef = _lstsq(form, d, y) if distinct >= min_points(form, offset_estimated) else None
    if coef is None:
        return Fit(form=form, params=dict.fromkeys(names, float("nan")), r2=float("nan"), n=int(d.size),
                   offset=offset, _coef=np.full(len(names), np.nan), n_distinct=distinct, p=p)
    ss_res = float(np.sum((y - design(d) @ coef) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return Fit(form=form, params={k: float(v) for k, v in zip(names, coef)}, r2=r2, n=int(d.size), offset=offset,
               _coef=coef, n_distinct=distinct, p=p)


def fit_linear(d, r) -> Fit:
    return _fit("linear", d, r)


def fit_bon(d, r, offset: float = 0.0, offset_estimated: bool = False) -> Fit:
    return _fit("bon", d, r, offset, offset_estimated)


def fit_rl(d, r, offset: float = 0.0, offset_estimated: bool = False) -> Fit:
    return _fit("rl", d, r, offset, offset_estimated)


def peak(form: str, alpha: float, beta: float, offset: float = 0.0) -> tuple[float, float]:
    """(d*, R*) of the interior maximum, NaNs when the form has none (beta <= 0, or linear).
    Best-of-n: dR/dd = alpha - 2 beta d = 0 -> d* = alpha / (2 beta), R* = offset + alpha^2 / (4 beta).
    RL: dR/dd = alpha - beta (log d + 1) = 0 -> d* = exp(alpha / beta - 1), R* = offset + beta d*."""
    if not (np.isfinite(alpha) and np.isfinite(beta)) or beta <= 0 or form == "linear":
        return float("nan"), float("nan")
    if form == "bon":
        return alpha / (2 * beta), offset + alpha * alpha / (4 * beta)
    with np.errstate(over="ignore"):
        d_star = float(np.exp(alpha / beta - 1))
    return d_star, offset + beta * d_star


def fit_peak(fit: Fit, d) -> tuple[float, float]:
    """``peak`` of a fitted best-of-n/RL curve, kept only when d* lies inside the measured range
    [min d, max d] of ``d``; NaNs otherwise (the family does not peak where it was measured)."""
    if not fit.ok or fit.form == "linear":
        return float("nan"), float("nan")
    d_star, r_star = peak(fit.form, fit.params["alpha"], fit.params["beta"], fit.offset)
    d = np.asarray(d, float)
    d = d[np.isfinite(d)]
    inside = d.size and np.isfinite(d_star) and d.min() <= d_star <= d.max()
    return (d_star, r_star) if inside else (float("nan"), float("nan"))


def bootstrap_fit(form: str, d, r, units=None, n_boot: int = 1000, seed: int = 0,
                  alpha: float = ALPHA) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of a fit's coefficients and of its peak (``peak_d``,
    ``peak_reward``). Resampling: with ``units`` (e.g. (config, seed) per point) holding more than
    one distinct value, whole units' point sets are drawn with replacement; otherwise points are,
    pi0's points (d = 0) and the others separately so each resample keeps an offset and a curve.
    The offset of the best-of-n/RL forms is re-estimated from each resample's pi0 points when there
    are any. Resamples that leave too few distinct d (rank-deficient design) or no pi0 point are
    dropped. A resample whose curve has no interior maximum counts as d* = R* = +inf, so an
    unstable peak shows as an open interval instead of being hidden."""
    d, r = np.asarray(d, float).ravel(), np.asarray(r, float).ravel()
    keep = np.isfinite(d) & np.isfinite(r)
    d, r = d[keep], r[keep]
    names = _FEATURES[form][0]
    estimated = form != "linear" and bool((d == 0).any())
    rng = np.random.default_rng(seed)
    unit_ids = None
    if units is not None:
        codes = pd.factorize(pd.Series(list(units)).astype(str)[keep])[0]
        unit_ids = codes if codes.max(initial=-1) >= 1 else None
    groups = [np.flatnonzero(unit_ids == u) for u in range(unit_ids.max() + 1)] if unit_ids is not None else None
    zero, rest = np.flatnonzero(d == 0), np.flatnonzero(d != 0)
    draws = {k: [] for k in (*names, "peak_d", "peak_reward")}
    for _ in range(n_boot):
        if groups is not None:
            idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        else:
            idx = np.concatenate([zero[rng.integers(0, zero.size, zero.size)] if estimated else zero,
                                  rest[rng.integers(0, rest.size, rest.size)]])
        bd, br = d[idx], r[idx]
        if estimated and not (bd == 0).any():
            continue
        offset = float(br[bd == 0].mean()) if estimated else 0.0
        coef = _lstsq(form, bd, br - offset)
        if coef is None:
            continue
        for k, v in zip(names, coef):
            draws[k].append(v)
        if form != "linear":
            d_star, r_star = peak(form, coef[0], coef[1], offset)
            draws["peak_d"].append(d_star if np.isfinite(d_star) else np.inf)
            draws["peak_reward"].append(r_star if np.isfinite(r_star) else np.inf)
    out = {}
    for k, v in draws.items():
        if v:  # inverted_cdf: no interpolation, so +inf draws stay +inf instead of becoming NaN
            lo, hi = np.quantile(np.asarray(v, float), [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
            out[k] = (float(lo), float(hi))
    return out


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
    """The three fits of one reward series, with the best-of-n/RL offset set from pi0's points (then
    a parameter of those fits)."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    offset = reward_offset(d, r)
    estimated = bool(((d == 0) & ~np.isnan(r)).any())
    return {"linear": fit_linear(d, r), "bon": fit_bon(d, r, offset, estimated),
            "rl": fit_rl(d, r, offset, estimated)}


def fit_rows(fit: Fit, d, r, units=None, n_boot: int = 1000, boot_seed: int = 0, **common) -> list[dict]:
    """Rows of one fit: "<form>.n_params" (value p, n = distinct d; always, so a report can say a
    fit is missing for too few points), and when it is produced "<form>.<param>" with bootstrap
    CIs (``bootstrap_fit``), "<form>.r2" (n = points) and, when d* lies inside the measured range,
    "<form>.peak_d" / "<form>.peak_reward" with bootstrap CIs."""
    form = fit.form
    rows = [make_row(metric=f"{form}.n_params", value=float(fit.p), n=fit.n_distinct, **common)]
    if not fit.ok:
        return rows
    cis = bootstrap_fit(form, d, r, units=units, n_boot=n_boot, seed=boot_seed)
    d_star, r_star = fit_peak(fit, d)
    values = [*fit.params.items(), *([("peak_d", d_star), ("peak_reward", r_star)] if np.isfinite(d_star) else [])]
    for name, value in values:
        lo, hi = cis.get(name, (float("nan"), float("nan")))
        rows.append(make_row(metric=f"{form}.{name}", value=value, ci_low=lo, ci_high=hi, n=fit.n, **common))
    rows.append(make_row(metric=f"{form}.r2", value=fit.r2, n=fit.n, **common))
    return rows


def kl_reward_rows(points, kl_key: str = "kl_k3", by: str = "config", n_boot: int = 1000, boot_seed: int = 0,
                   **ident) -> list[dict]:
    """Fit rows per group (``by``: "config", the points' configuration, else their method; or
    "family", the points' ``family``: then ``method`` is the family and ``config`` "family:<family>",
    so they never collide with a configuration named like its method) and reward key (metric
    "<form>.<param>", see ``fit_rows``; slice = reward key), plus, per configuration, measured KL
    against its upper bound for best-of-n points (label "n=<N>"). Points of all seeds of a group are
    pooled, never those of different groups; the bootstrap resamples (configuration, seed) point
    sets when there are several; ``seed`` is filled only when the points share one. ``ident``:
    e.g. sweep, run."""
    df = points_frame(points, kl_key)
    if df.empty or "method" not in df:
        return []
    df["config"] = df["config"].fillna(df["method"]) if "config" in df else df["method"]
    if "seed" not in df:
        df["seed"] = None
    if by == "family":
        df["method"] = df["family"]
    group_key = "family" if by == "family" else "config"
    rows = []
    for (name, method), g in df.groupby([group_key, "method"], sort=True):
        seeds = g["seed"].dropna().unique()
        common = dict(evaluator=EVALUATOR, method=method, config=f"family:{name}" if by == "family" else name,
                      seed=int(seeds[0]) if len(seeds) == 1 else None, **ident)
        units = (g["config"].astype(str) + "|" + g["seed"].astype(str)).to_numpy()
        for key in REWARD_KEYS:
            d, r = g["d"].to_numpy(), g[key].to_numpy()
            if np.isnan(r).all():
                continue
            fits = fits_for(d, r)
            rows.append(make_row(metric="offset", slice=key, value=fits["bon"].offset, n=int(len(g)), **common))
            for fit in fits.values():
                rows += fit_rows(fit, d, r, units=units, n_boot=n_boot, boot_seed=boot_seed, slice=key, **common)
        if by == "family":
            continue
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
