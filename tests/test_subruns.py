"""The sub-run core: a method running methods inside one run (chains, iterated RLHF rounds)."""
from __future__ import annotations

import json

import pytest
import torch

from alignbench.cli import compose
from alignbench.cost import Budget, BudgetExceeded, Cost
from alignbench.run_evaluation import build_context
from alignbench.runner import _clear_incomplete, validate
from alignbench.subruns import SubRun, resume_subruns


def test_annotations_are_a_cost_with_a_cap():
    budget, cost = Budget(annotations=100), Cost()
    cost.annotations = 99
    assert budget.exhausted(cost, ("annotations",)) is None
    cost.annotations = 100
    assert budget.exhausted(cost, ("annotations",)) == "budget.annotations=100 reached"
    assert budget.exhausted(cost, ("pm_calls",)) is None  # reached, not exceeded: other spends go on
    cost.annotations = 101
    assert budget.exhausted(cost, ("pm_calls",)) == "budget.annotations=100 reached"
    restored = Cost()
    restored.restore(cost.as_dict())
    assert restored.annotations == 101


def test_derived_context_shares_costs_and_log_and_measures_kl_against_pi0_and_its_start(tiny_overrides, tmp_path):
    cfg, mcfg, _ = validate(compose(tiny_overrides + ["budget.annotations=10", "eval.n_prompts=8"]))
    ctx = build_context(cfg, mcfg, tmp_path)
    ctx.charge_annotations(6)
    ctx.charge_annotations(4)  # checked before it is bought: 6 < 10
    with pytest.raises(BudgetExceeded, match="budget.annotations=10"):
        ctx.charge_annotations(1)
    assert ctx.cost.annotations == 10
    ctx.cost.annotations = 7
    with pytest.raises(BudgetExceeded, match="7 bought; 4 more would exceed it"):
        ctx.charge_annotations(4)  # a batch is bought whole or not at all
    assert ctx.cost.annotations == 7
    # a "start" policy: π0 saved under another path, then nudged so that it differs from π0
    start = ctx.policy()
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.02 * torch.randn_like(p))
    start_dir = ctx.derive(policy_dir=tmp_path / "start").save_policy(start)
    sub = SubRun(ctx, 1, "ppo").ctx(start_path=start_dir, step_offset=10, point_extra={"round": 2},
                                    point_hooks=[lambda c, m, s: {"hooked": len(s.responses)}])
    assert sub.cost is ctx.cost and sub.budget is ctx.budget
    point = sub.log_point(3, model=sub.policy())
    assert point["step"] == 13 and point["round"] == 2 and point["hooked"] == 8
    assert point["annotations"] == 7
    # the policy starts at the start policy: zero KL to it, positive KL to π0
    assert abs(point["kl_k3_start"]) < 1e-5 and point["kl_k3"] > 1e-3
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 13  # the sub-run writes the parent's log
    assert sub.checkpoint_dir == tmp_path / "subruns" / "01-ppo" / "checkpoint"


def test_finished_subruns_survive_a_restart_and_restore_cost_and_log(tiny_overrides, tmp_path):
    cfg, mcfg, _ = validate(compose(tiny_overrides + ["eval.n_prompts=8"]))
    ctx = build_context(cfg, mcfg, tmp_path)
    subs = [SubRun(ctx, i, name) for i, name in enumerate(["rs", "ppo", "dpo"])]
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n')
    ctx.cost.tokens_trained = 123
    subs[0].mark_done(note="first")
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    ctx.cost.tokens_trained = 456
    subs[1].mark_done()
    (tmp_path / "metrics.json").write_text("{}")
    _clear_incomplete(tmp_path)  # what the runner does before a restart
    assert not (tmp_path / "train_log.jsonl").exists() and not (tmp_path / "metrics.json").exists()
    fresh = build_context(cfg, mcfg, tmp_path)
    subs = [SubRun(fresh, i, name) for i, name in enumerate(["rs", "ppo", "dpo"])]
    assert resume_subruns(subs) == 2
    assert fresh.cost.tokens_trained == 456
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 2
    assert subs[0].done()["note"] == "first"
