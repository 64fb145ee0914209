"""Rejection sampling: the selection rule, the best-of-n KL (upper bound, exact law, plug-in estimator), config
errors, and smoke runs of both modes through the real pipeline on the tiny fixture."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from alignbench.config import ConfigError
from alignbench.methods import method_config
from alignbench_methods.rejection_sampling import (RejectionSampling, bon_kl_bound, bon_kl_exact, bon_kl_plugin,
                                                   canonical_scores, curve_ns, select_best)


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


def test_select_best_identical_texts_are_one_candidate():
    """Padding-width float noise: the same text scored 1.0 and 1.0 + 1e-7. It is one candidate, so
    the tie goes to its first occurrence, and a different text with a lower score never wins."""
    scores = torch.tensor([[1.0, 1.0 + 1e-7, 0.5], [0.2, 0.9, 0.9 - 1e-7]])
    texts = ["same", "same", "other", "x", "y", "y"]
    assert select_best(scores).tolist() == [1, 1]  # float equality alone splits the identical texts
    assert select_best(scores, texts).tolist() == [0, 1]
    canon = canonical_scores(scores, texts)
    assert canon[0, 1] == canon[0, 0] == scores[0, 0] and canon[1, 2] == canon[1, 1] == scores[1, 1]
    assert canon[0, 2] == scores[0, 2] and canon[1, 0] == scores[1, 0]
    with pytest.raises(ValueError, match="texts"):
        canonical_scores(scores, texts[:-1])


def test_curve_ns():
    assert curve_ns(16) == [1, 2, 4, 8, 16]
    assert curve_ns(6) == [1, 2, 4, 6]
    assert curve_ns(1) == [1]


# --------------------------------------------------------------------------- KL
def test_kl_bound_formula():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.19315
    assert bon_kl_bound(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)  # 0.63629
    assert bon_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)


def _enumerated_bon_kl(probs: list[float], rewards: list[float], n: int) -> float:
    """KL(best-of-n ‖ π0) by enumerating every n-tuple of responses: the first sample with the
    highest reward is kept."""
    bon = [0.0] * len(probs)
    for tup in itertools.product(range(len(probs)), repeat=n):
        best = max(rewards[i] for i in tup)
        bon[next(i for i in tup if rewards[i] == best)] += math.prod(probs[i] for i in tup)
    return sum(q * math.log(q / p) for q, p in zip(bon, probs) if q > 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_kl_exact_matches_enumeration_with_ties(n):
    """Five responses, two pairs of them tied in reward: the level formula equals brute force, and
    is below the continuous bound."""
    probs, rewards = [0.3, 0.25, 0.15, 0.2, 0.1], [0.0, 1.0, 1.0, 2.0, 2.0]
    levels = [0.3, 0.25 + 0.15, 0.2 + 0.1]
    exact = bon_kl_exact(levels, n)
    assert exact == pytest.approx(_enumerated_bon_kl(probs, rewards, n), abs=1e-12)
    assert exact <= bon_kl_bound(n) + 1e-12
    if n > 1:
        assert exact < bon_kl_bound(n) - 0.03  # ties matter
    distinct = [0.3, 0.25, 0.15, 0.2, 0.1]  # no ties: still exact, and below the bound (finitely many levels)
    assert bon_kl_exact(distinct, n) == pytest.approx(_enumerated_bon_kl(distinct, list(range(5)), n), abs=1e-12)


def test_kl_plugin_bias_as_stated():
    """The bias bon_kl_plugin's docstring states (n = 16), measured against the exact KL."""
    n, g = 16, torch.Generator().manual_seed(0)
    # continuous reward: the plug-in depends only on the pool's ranks, so it is one number per m
    for m, bias in ((64, -0.003), (256, -0.0002)):
        est = bon_kl_plugin(torch.randn(3, m, generator=g), n)
        assert est - bon_kl_bound(n) == pytest.approx(bias, abs=0.0005)
    # a 3-level reward: the mean over 2000 prompts' pools (sd of one prompt's estimate ~0.05)
    p = torch.tensor([0.7, 0.2, 0.1])
    exact = bon_kl_exact(p, n)
    assert exact == pytest.approx(1.674, abs=5e-4)
    for m, bias in ((64, -0.035), (256, -0.009)):
        pools = torch.multinomial(p, 2000 * m, replacement=True, generator=g).view(2000, m).float()
        assert bon_kl_plugin(pools, n) - exact == pytest.approx(bias, abs=0.006)
    assert bon_kl_plugin(torch.zeros(4, 8), n) == 0.0  # every sample ties: best-of-n is π0
    assert bon_kl_plugin(torch.randn(4, 8, generator=g), 1) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [("n", 0), ("temperature", 0.0), ("temperature", -1.0), ("rounds", 0),
                                       ("mode", "bogus"), ("kl_pool", 0), ("prompts_per_round", 0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        method_config(RejectionSampling, {"name": "rejection_sampling", key: value})


def test_n_defaults_by_mode():
    cfg = method_config(RejectionSampling, {"name": "rejection_sampling"})
    assert cfg.mode == "best_of_n" and cfg.n is None and cfg.k == 8
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
    # the curve over n, with the bound and the estimate; the estimate is 0 at n = 1 and never above the bound
    curve = {p["label"]: p for p in log if p["label"].startswith("n=")}
    assert sorted(curve) == ["n=1", "n=2", "n=4"]
    assert curve["n=1"]["kl_estimate"] == pytest.approx(0.0, abs=1e-9)
    for n in (2, 4):
        assert curve[f"n={n}"]["kl_bound"] == pytest.approx(bon_kl_bound(n))
        assert 0 < curve[f"n={n}"]["kl_estimate"] <= bon_kl_bound(n) + 1e-9
    assert curve["n=4"]["proxy_reward"] > curve["n=1"]["proxy_reward"]
    info = metrics["info"]
    assert info["kl_bound"] == pytest.approx(math.log(4) - 0.75)
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
