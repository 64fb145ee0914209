"""Rejection sampling: the selection rule, the best-of-n KL (formula and sample estimator), config
errors, and smoke runs of both modes through the real pipeline on the tiny fixture."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignbench.config import ConfigError
from alignbench.methods import method_config
from alignbench_methods.rejection_sampling import (RejectionSampling, bon_kl_analytic, bon_kl_estimate,
                                                   bon_log_ratio, curve_ns, select_best)


# --------------------------------------------------------------------------- selection rule
def test_select_best_picks_argmax_and_first_on_ties():
    scores = torch.tensor([[0.1, 0.5, 0.5],    # tie between 1 and 2 -> 1
                           [2.0, -1.0, 2.0],   # tie between 0 and 2 -> 0
                           [-3.0, -2.0, -1.0],  # plain argmax -> 2
                           [0.0, 0.0, 0.0]])   # all tied -> 0
    assert select_best(scores).tolist() == [1, 0, 2, 0]
    assert select_best(torch.tensor([[4.2], [-1.0]])).tolist() == [0, 0]  # n = 1: the only sample
    with pytest.raises(ValueError, match="prompts, K"):
        select_best(torch.tensor([1.0, 2.0]))


def test_curve_ns():
    assert curve_ns(16) == [1, 2, 4, 8, 16]
    assert curve_ns(6) == [1, 2, 4, 6]
    assert curve_ns(1) == [1]


# --------------------------------------------------------------------------- KL
def test_kl_analytic_formula():
    assert bon_kl_analytic(1) == 0.0
    assert bon_kl_analytic(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert bon_kl_analytic(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)  # 0.63629
    assert bon_kl_analytic(16) == pytest.approx(math.log(16) - 15 / 16)


def test_log_ratio_hand_example():
    """Pool {0, 1, 2} plus the sample itself (m + 1 = 4 points)."""
    pool = torch.tensor([[0.0, 1.0, 2.0]] * 3)
    got = bon_log_ratio(torch.tensor([1.0, 3.0, -1.0]), pool, n=2).tolist()
    # r = 1 ties with a pool value: F₋ = 1/4, F = 3/4 -> (9/16 − 1/16)/(1/2) = 1 -> log 1 = 0
    # r = 3 above the pool:        F₋ = 3/4, F = 1   -> (1 − 9/16)/(1/4) = 7/4
    # r = −1 below the pool:       F₋ = 0,   F = 1/4 -> (1/16)/(1/4) = 1/4
    assert got == pytest.approx([0.0, math.log(1.75), math.log(0.25)])
    assert bon_log_ratio(torch.tensor([5.0]), torch.tensor([[1.0, 2.0]]), n=1).item() == 0.0  # n = 1 is π0


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_kl_estimate_matches_formula_on_continuous_rewards(n):
    """Standard-normal rewards: the estimate from best-of-n draws and an independent π0 pool per
    prompt agrees with log n − (n − 1)/n within 0.05 (4000 prompts, pool of 256)."""
    g = torch.Generator().manual_seed(n)
    prompts, m = 4000, 256
    pool = torch.randn(prompts, m, generator=g)
    best = torch.randn(prompts, n, generator=g).max(dim=1).values
    assert bon_kl_estimate(best, pool, n) == pytest.approx(bon_kl_analytic(n), abs=0.05)


def test_kl_estimate_is_exact_law_under_ties():
    """A discrete reward (3 values, one of them 70% likely: a tiny policy repeats itself): the estimate follows the exact
    discrete KL, Σ_v q_v log(q_v / p_v) with q_v = F(v)^n − F₋(v)^n, not the continuous formula."""
    n, p = 4, torch.tensor([0.7, 0.2, 0.1])
    cdf = p.cumsum(0)
    q = cdf ** n - torch.cat([torch.zeros(1), cdf[:-1]]) ** n
    exact = (q * (q / p).log()).sum().item()
    assert abs(exact - bon_kl_analytic(n)) > 0.1  # the two differ here: ties matter
    g = torch.Generator().manual_seed(0)
    prompts, m = 4000, 256
    pool = torch.multinomial(p, prompts * m, replacement=True, generator=g).view(prompts, m).float()
    draws = torch.multinomial(p, prompts * n, replacement=True, generator=g).view(prompts, n).float()
    assert bon_kl_estimate(draws.max(dim=1).values, pool, n) == pytest.approx(exact, abs=0.05)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [("n", 0), ("temperature", 0.0), ("temperature", -1.0), ("rounds", 0),
                                       ("mode", "bogus"), ("kl_pool", 0), ("prompts_per_round", 0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config(RejectionSampling, {"name": "rejection_sampling", key: value})


def test_n_defaults_by_mode():
    cfg = method_config(RejectionSampling, {"name": "rejection_sampling"})
    assert cfg.mode == "best_of_n" and cfg.n is None and cfg.k == 16
    assert method_config(RejectionSampling, {"name": "rejection_sampling", "mode": "finetune"}).k == 4
    assert method_config(RejectionSampling, {"name": "rejection_sampling", "mode": "finetune", "n": 7}).k == 7


# --------------------------------------------------------------------------- smoke runs
# one torch thread: on a shared 2-core machine, more threads oversubscribe it and run ~5x slower
FAST = ["train.num_threads=1"]


def _run(tiny_overrides, extra):
    extra = FAST + extra
    from alignbench.cli import compose
    from alignbench.runner import run_job
    metrics = run_job(compose(tiny_overrides + ["method=rejection_sampling"] + extra),
                      ["method=rejection_sampling"] + extra)
    run_dir = Path(next(o for o in tiny_overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1]) / "runs" / metrics["run_id"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    return metrics, log, samples


def test_smoke_best_of_n(tiny_overrides, tiny_config):
    metrics, log, samples = _run(tiny_overrides, ["method.n=4", "method.kl_pool=32"])
    n_prompts = tiny_config.eval.n_prompts
    pi0 = log[0]
    assert pi0["label"] == "pi0"
    assert metrics["final"]["proxy_reward"] > pi0["proxy_reward"]
    # the curve over n, with both KLs; the estimate is 0 at n = 1 and never above log n
    curve = {p["label"]: p for p in log if p["label"].startswith("n=")}
    assert sorted(curve) == ["n=1", "n=2", "n=4"]
    assert curve["n=1"]["kl_estimate"] == pytest.approx(0.0, abs=1e-9)
    for n in (2, 4):
        assert curve[f"n={n}"]["kl_analytic"] == pytest.approx(bon_kl_analytic(n))
        assert 0 < curve[f"n={n}"]["kl_estimate"] <= math.log(n) + 1e-9
    assert curve["n=4"]["proxy_reward"] > curve["n=1"]["proxy_reward"]
    info = metrics["info"]
    assert info["kl_analytic"] == pytest.approx(math.log(4) - 0.75)
    assert info["kl_estimate"] == curve["n=4"]["kl_estimate"]
    # only the served policy is charged: n samples and n PM calls per held-out prompt, no training
    assert metrics["cost"]["pm_calls"] == 4 * n_prompts
    assert metrics["cost"]["tokens_trained"] == 0
    assert len(samples) == n_prompts


def test_smoke_finetune(tiny_overrides):
    metrics, log, _ = _run(tiny_overrides, ["method.mode=finetune", "method.n=4", "method.rounds=2",
                                            "method.prompts_per_round=64"])
    pi0 = log[0]
    assert metrics["final"]["proxy_reward"] > pi0["proxy_reward"]
    info = metrics["info"]
    assert [r["round"] for r in info["rounds"]] == [1, 2]
    for r in info["rounds"]:  # the PM's best of 4 beats the average sample, every round
        assert r["best_reward_mean"] > r["sample_reward_mean"]
    assert metrics["cost"]["pm_calls"] == 2 * 64 * 4
    assert metrics["cost"]["tokens_trained"] > 0 and metrics["final"]["kl_k3"] > 0
