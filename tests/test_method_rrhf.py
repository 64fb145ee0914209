"""RRHF: the loss on a hand-computed example, config errors, and a smoke run through the pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignbench.config import ConfigError
from alignbench.methods import method_config
from alignbench_methods.rrhf import RRHF, rrhf_loss


def test_loss_hand_example():
    """p = (−1, −2, −0.5), r = (0.3, 0.9, −0.2): PM order 2 < 0 < 1.
    Pairs (worse i, better j): (2,0): max(0, −0.5 + 1) = 0.5; (2,1): max(0, −0.5 + 2) = 1.5;
    (0,1): max(0, −1 + 2) = 1.0 -> rank 3.0. Best is response 1, CE = −p_1 = 2.0.
    ce_weight 0.5 -> 3.0 + 1.0 = 4.0."""
    p = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    r = torch.tensor([[0.3, 0.9, -0.2]])
    loss, parts = rrhf_loss(p, r, ce_weight=0.5)
    assert loss.item() == pytest.approx(4.0)
    assert parts == pytest.approx({"rank": 3.0, "ce": 2.0})
    loss.backward()
    # d/dp0: −1 (as i in (0,1)) +1 (as j in (2,0)) = 0; d/dp1: −1 −1 − 0.5 (CE) = −2.5; d/dp2: +2
    assert p.grad[0].tolist() == pytest.approx([0.0, -2.5, 2.0])


def test_loss_correct_order_and_ties():
    # already ranked like the PM: no rank term; averaged over prompts
    p = torch.tensor([[-3.0, -1.0], [-1.0, -1.5]])
    r = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # prompt 2: tied rewards -> no pair, CE on the first
    loss, parts = rrhf_loss(p, r, ce_weight=1.0)
    assert parts["rank"] == 0.0
    assert loss.item() == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="k>=2"):
        rrhf_loss(torch.zeros(2, 1), torch.zeros(2, 1))


@pytest.mark.parametrize("raw,key", [({"k_samples": 0, "include_dataset": False}, "method.k_samples"),
                                     ({"k_samples": 1, "include_dataset": False}, "method.k_samples"),
                                     ({"k_samples": -1}, "method.k_samples"),
                                     ({"ce_weight": -1.0}, "method.ce_weight"),
                                     ({"steps": 0}, "method.steps"),
                                     ({"prompts_per_step": 0}, "method.prompts_per_step"),
                                     ({"temperature": 0.0}, "method.temperature")])
def test_bad_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        method_config(RRHF, {"name": "rrhf", **raw})


def test_k_counts_dataset_responses():
    assert method_config(RRHF, {"name": "rrhf", "k_samples": 0}).k == 2  # chosen + rejected suffice
    assert method_config(RRHF, {"name": "rrhf", "k_samples": 2, "include_dataset": False}).k == 2


def test_smoke_rrhf_raises_proxy_reward(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    # one torch thread: on a shared 2-core machine, more threads oversubscribe it and run ~5x slower
    extra = ["train.num_threads=1", "method.steps=12", "method.eval_every=6"]
    metrics = run_job(compose(tiny_overrides + ["method=rrhf"] + extra), ["method=rrhf"] + extra)
    run_dir = Path(next(o for o in tiny_overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1]) / "runs" / metrics["run_id"]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["label"] == "pi0"
    assert [p["step"] for p in log] == [0, 6, 12, -1]
    assert metrics["final"]["proxy_reward"] > log[0]["proxy_reward"]
    assert metrics["info"]["steps"] == 12 and metrics["info"]["k"] == 6
    k_samples, per_step = 4, 8  # the defaults: PM calls = steps x prompts x k
    assert metrics["cost"]["pm_calls"] == 12 * per_step * (k_samples + 2)
    assert metrics["cost"]["tokens_generated"] > 0 and metrics["final"]["kl_k3"] > 0


def test_budget_stops_cleanly(tiny_overrides):
    """A PM-call budget of two steps' worth (2 x 8 prompts x 6 responses) stops training there."""
    from alignbench.cli import compose
    from alignbench.runner import run_job
    extra = ["train.num_threads=1", "method.steps=12", "budget.pm_calls=96"]
    metrics = run_job(compose(tiny_overrides + ["method=rrhf"] + extra), ["method=rrhf"] + extra)
    assert metrics["info"]["steps"] == 2
    assert "budget.pm_calls=96" in metrics["info"]["stopped"]
    assert metrics["cost"]["pm_calls"] == 96
