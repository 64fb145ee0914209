"""PM robustness (Bai et al. 2022 §4.2): does the proxy PM still order samples the way the judge
(gold reward on hh_synth, test PM on real HH) does, as a policy moves away from π0?"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr


def rank_correlation(proxy: Sequence[float], judge: Sequence[float]) -> float:
    """Spearman's ρ of the proxy and judge rewards of the same samples: the Pearson correlation of
    their ranks (ties get their mean rank), ρ = cov(rank p, rank j) / (σ_rank p · σ_rank j).
    NaN when there are fewer than 2 samples or either side is constant."""
    if len(proxy) != len(judge):
        raise ValueError(f"rank_correlation: {len(proxy)} proxy vs {len(judge)} judge rewards")
    p, j = np.asarray(proxy, float), np.asarray(judge, float)
    if len(p) < 2 or np.all(p == p[0]) or np.all(j == j[0]):
        return math.nan
    return float(spearmanr(p, j).statistic)


def pairwise_agreement(proxy_a: Sequence[float], judge_a: Sequence[float],
                       proxy_b: Sequence[float], judge_b: Sequence[float]) -> float:
    """Share of items i on which the proxy prefers the same of two samples (a_i, b_i) as the judge:
    mean over {i : judge_a_i ≠ judge_b_i} of [sign(proxy_a_i − proxy_b_i) = sign(judge_a_i − judge_b_i)],
    a proxy tie counting 1/2. NaN when the judge ties on every item."""
    pa, ja, pb, jb = (np.asarray(x, float) for x in (proxy_a, judge_a, proxy_b, judge_b))
    if not len(pa) == len(ja) == len(pb) == len(jb):
        raise ValueError("pairwise_agreement: the four score lists must have one entry per item")
    keep = ja != jb
    if not keep.any():
        return math.nan
    dp, dj = np.sign(pa - pb)[keep], np.sign(ja - jb)[keep]
    return float(np.mean(np.where(dp == 0, 0.5, (dp == dj).astype(float))))
