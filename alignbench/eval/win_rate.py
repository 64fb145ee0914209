"""Win rates and Elo from a judge's scores of each method's response to the same prompts.

On a prompt, method A beats B when judge(A) - judge(B) > tie_eps, loses when < -tie_eps, and
ties otherwise. Given the responses' texts, identical texts tie whatever their scores: a judge's
score of one text can differ in the last bits with the batch it was padded in, and that noise
must not decide a comparison. Rows (evaluator ``"win_rate"``, ``method`` = A, ``slice`` = ``"vs:<B>"``):

* ``win_rate`` (PRIMARY): (wins + ties/2) / prompts, a tie counting half a win; interval by a
  seeded percentile bootstrap over prompts (the same resampled prompts for every pair).
* ``win_rate_decisive``: wins / (wins + losses), ties left out; exact Clopper-Pearson interval.
* ``tie_rate``: ties / prompts.
* ``elo`` (``slice`` = "all"): Bradley-Terry maximum-likelihood strength on the Elo scale
  (400 / ln 10 per logit), ties half a win each way, with a bootstrap-over-prompts interval.

Every ordered pair is reported (all against all), so the rows against the baseline are those with
``slice == f"vs:{baseline}"``. NaN scores drop the prompt from the pairs that involve it.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy.special import expit

from alignbench.eval.stats import binomial_ci, make_row

EVALUATOR = "win_rate"
ELO_SCALE = 400.0 / np.log(10.0)


def outcomes(a: np.ndarray, b: np.ndarray, tie_eps: float, same_text: np.ndarray | None = None) -> np.ndarray:
    """Per prompt: 1 (a wins), 0.5 (tie), 0 (b wins), NaN (a score is missing). ``same_text``
    (bool per prompt): the two responses are the same text, a tie whatever the scores."""
    diff = a - b
    out = np.where(diff > tie_eps, 1.0, np.where(diff < -tie_eps, 0.0, 0.5))
    if same_text is not None:
        out = np.where(same_text, 0.5, out)
    return np.where(np.isnan(diff), np.nan, out)


def _as_arrays(judge_scores: dict) -> dict[str, np.ndarray]:
    arrays = {m: np.asarray(s, dtype=float).ravel() for m, s in judge_scores.items()}
    if len({a.size for a in arrays.values()}) > 1:
        raise ValueError("judge scores must cover the same prompts for every method: "
                         + ", ".join(f"{m}={a.size}" for m, a in arrays.items()))
    return arrays


def _as_texts(texts: dict | None, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Per method, its response text on each prompt (None where unknown), aligned with the scores."""
    if texts is None:
        return None
    out = {}
    for m, s in scores.items():
        t = texts.get(m)
        out[m] = np.full(s.size, None, dtype=object) if t is None else np.asarray(list(t), dtype=object)
        if out[m].size != s.size:
            raise ValueError(f"texts of {m!r} cover {out[m].size} prompts, its scores {s.size}")
    return out


def _same_text(texts: dict[str, np.ndarray] | None, a: str, b: str) -> np.ndarray | None:
    if texts is None:
        return None
    return np.array([x is not None and x == y for x, y in zip(texts[a], texts[b])], dtype=bool)


def _boot_indices(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def win_rates(judge_scores: dict, baseline: str, tie_eps: float = 0.0, n_boot: int = 2000, seed: int = 0,
              alpha: float = 0.05, texts: dict | None = None, **ident) -> list[dict]:
    """Rows for every ordered pair of methods (see the module docstring); ``baseline`` must be a key.
    ``texts``: optional {method: response text per prompt (None: unknown)}; identical texts tie."""
    scores = _as_arrays(judge_scores)
    texts = _as_texts(texts, scores)
    if baseline not in scores:
        raise KeyError(f"baseline {baseline!r} not among methods {sorted(scores)}")
    n_prompts = next(iter(scores.values())).size
    idx = _boot_indices(n_prompts, n_boot, seed)
    rows = []
    for a, b in itertools.permutations(scores, 2):
        out = outcomes(scores[a], scores[b], tie_eps, _same_text(texts, a, b))
        valid = ~np.isnan(out)
        n = int(valid.sum())
        wins, ties = int((out == 1).sum()), int((out == 0.5).sum())
        losses = n - wins - ties
        common = dict(evaluator=EVALUATOR, method=a, slice=f"vs:{b}", **ident)
        if n:
            drawn = out[idx]
            with np.errstate(invalid="ignore", divide="ignore"):  # a resample of only NaNs gives NaN
                boot = np.nansum(drawn, axis=1) / (~np.isnan(drawn)).sum(axis=1)
            lo, hi = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
            rate = (wins + ties / 2) / n
        else:
            rate = lo = hi = float("nan")
        rows.append(make_row(metric="win_rate", value=rate, ci_low=float(lo), ci_high=float(hi), n=n, **common))
        d_lo, d_hi = binomial_ci(wins, wins + losses, alpha)
        rows.append(make_row(metric="win_rate_decisive", value=wins / (wins + losses) if wins + losses else
                             float("nan"), ci_low=d_lo, ci_high=d_hi, n=wins + losses, **common))
        rows.append(make_row(metric="tie_rate", value=ties / n if n else float("nan"), n=n, **common))
    return rows


def pairwise_counts(judge_scores: dict, tie_eps: float = 0.0,
                    texts: dict | None = None) -> list[tuple[str, str, int, int, int]]:
    """(a, b, wins_a, wins_b, ties) for every unordered pair of methods; ``texts`` as in win_rates."""
    scores = _as_arrays(judge_scores)
    texts = _as_texts(texts, scores)
    counts = []
    for a, b in itertools.combinations(scores, 2):
        out = outcomes(scores[a], scores[b], tie_eps, _same_text(texts, a, b))
        counts.append((a, b, int((out == 1).sum()), int((out == 0).sum()), int((out == 0.5).sum())))
    return counts


def _as_counts(results) -> list[tuple]:
    """Accept a square DataFrame (entry [a, b] = wins of a over b, fractional allowed) or tuples."""
    if isinstance(results, pd.DataFrame):
        names = list(results.index)
        return [(a, b, float(results.loc[a, b]), float(results.loc[b, a]), 0.0)
                for a, b in itertools.combinations(names, 2)]
    return [tuple(r) for r in results]


def _bradley_terry(ia, ib, wa, wb, k: int, reg: float, tol: float = 1e-10, max_iter: int = 500) -> np.ndarray:
    """Logit strengths minimizing the ridge-penalized negative log-likelihood, by damped Newton
    steps (the objective is strictly convex)."""
    def nll(theta):
        d = theta[ia] - theta[ib]
        return np.sum(wa * np.logaddexp(0, -d) + wb * np.logaddexp(0, d)) + reg / 2 * theta @ theta

    theta, value = np.zeros(k), nll(np.zeros(k))
    for _ in range(max_iter):
        p = expit(theta[ia] - theta[ib])
        g_pair, h_pair = wb * p - wa * (1 - p), (wa + wb) * p * (1 - p)
        grad = reg * theta + np.bincount(ia, g_pair, k) - np.bincount(ib, g_pair, k)
        hess = reg * np.eye(k)
        np.add.at(hess, (ia, ia), h_pair)
        np.add.at(hess, (ib, ib), h_pair)
        np.add.at(hess, (ia, ib), -h_pair)
        np.add.at(hess, (ib, ia), -h_pair)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while nll(theta - t * step) > value and t > 1e-12:  # halve until the objective does not rise
            t /= 2
        theta = theta - t * step
        value = nll(theta)
        if np.max(np.abs(t * step)) < tol:
            break
    return theta


def fit_elo(results, anchor: str | None = None, reg: float = 1e-4) -> dict[str, float]:
    """Bradley-Terry maximum likelihood, returned on the Elo scale.

    ``results``: list of (a, b, wins_a, wins_b, ties) or a square wins DataFrame. A tie is half a
    win for each side. P(a beats b) = 1 / (1 + 10^(-(elo_a - elo_b) / 400)). ``anchor`` gets Elo 0;
    without one the mean Elo is 1000. ``reg`` is a tiny ridge on the logit strengths that keeps the
    estimate finite when a method wins every comparison (the unpenalized MLE is then infinite).
    """
    counts = _as_counts(results)
    names = sorted({c[0] for c in counts} | {c[1] for c in counts})
    pos = {m: i for i, m in enumerate(names)}
    ia = np.array([pos[c[0]] for c in counts], dtype=int)
    ib = np.array([pos[c[1]] for c in counts], dtype=int)
    wa = np.array([c[2] + c[4] / 2 for c in counts], dtype=float)
    wb = np.array([c[3] + c[4] / 2 for c in counts], dtype=float)

    theta = _bradley_terry(ia, ib, wa, wb, len(names), reg)
    elo = theta * ELO_SCALE
    elo = elo - elo[pos[anchor]] if anchor is not None else elo - elo.mean() + 1000.0
    return {m: float(elo[pos[m]]) for m in names}


def elo_rows(judge_scores: dict, baseline: str | None = None, tie_eps: float = 0.0, n_boot: int = 200,
             seed: int = 0, alpha: float = 0.05, texts: dict | None = None, **ident) -> list[dict]:
    """Elo per method (baseline at 0 when given) with a bootstrap-over-prompts interval; ``texts``
    as in win_rates."""
    scores = _as_arrays(judge_scores)
    texts = _as_texts(texts, scores)
    point = fit_elo(pairwise_counts(scores, tie_eps, texts), anchor=baseline)
    n_prompts = next(iter(scores.values())).size
    boots = [fit_elo(pairwise_counts({m: s[i] for m, s in scores.items()}, tie_eps,
                                     texts and {m: t[i] for m, t in texts.items()}), anchor=baseline)
             for i in _boot_indices(n_prompts, n_boot, seed)]
    rows = []
    for m, value in point.items():
        lo, hi = np.quantile([b[m] for b in boots], [alpha / 2, 1 - alpha / 2])
        rows.append(make_row(evaluator=EVALUATOR, method=m, metric="elo", slice="all", value=value,
                             ci_low=float(lo), ci_high=float(hi), n=n_prompts, **ident))
    return rows


def win_probability(elo_a: float, elo_b: float) -> float:
    """Elo's expected win fraction of a over b."""
    return 1.0 / (1.0 + 10 ** (-(elo_a - elo_b) / 400.0))


def gain_rows(scores: dict, baseline: str, metric: str, n_boot: int = 2000, seed: int = 0,
              alpha: float = 0.05, **ident) -> list[dict]:
    """Mean per-prompt reward gain of each method over the baseline on the same prompts, with a
    paired percentile bootstrap over prompts (the pairing removes the prompts' own variance)."""
    scores = _as_arrays(scores)
    idx = _boot_indices(next(iter(scores.values())).size, n_boot, seed)
    rows = []
    for m in scores:
        if m == baseline:
            continue
        diff = scores[m] - scores[baseline]
        lo, hi = np.quantile(diff[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
        rows.append(make_row(evaluator="gain", metric=metric, method=m, slice=f"vs:{baseline}",
                             value=float(diff.mean()), ci_low=float(lo), ci_high=float(hi), n=int(diff.size), **ident))
    return rows
