"""Budgets that bind (checked before every charged operation, no method over the cap by more than
one batch, best-of-n planned to fit), FLOPs by the 2·N / 6·N rule, and wall time that leaves
measurement out."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from alignbench.cli import compose
from alignbench.context import RunContext
from alignbench.cost import SAMPLE_USES, SCORE_USES, STEP_USES, Budget, BudgetExceeded, Cost, forward_flops, train_flops
from alignbench.run_evaluation import build_context
from alignbench.models import count_params
from alignbench.runner import run_job, validate
from alignbench.encoding import encode
from alignbench_methods.rejection_sampling import plan_n, serving_cost

FAST = ["train.num_threads=1"]  # one torch thread: more oversubscribe the shared 2-core machine


def _run(tiny_overrides, extra: list[str]) -> tuple[dict, list[dict]]:
    extra = FAST + extra
    metrics = run_job(compose(tiny_overrides + extra), extra)
    sweep = Path(next(o for o in tiny_overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1])
    log_file = sweep / "runs" / metrics["run_id"] / "train_log.jsonl"
    return metrics, [json.loads(line) for line in log_file.read_text().splitlines()]


# --------------------------------------------------------------------------- arithmetic
def test_flops_rule_and_parameter_count():
    assert forward_flops(1000, 7) == 14_000  # 2·N per token
    assert train_flops(1000, 7) == 42_000  # 6·N per token
    assert count_params(torch.nn.Linear(10, 4)) == 44  # 40 weights + 4 biases
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 15  # a shared tensor counts once


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_wall_time_leaves_out_measurement(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("alignbench.cost.time.time", clock)
    cost = Cost(started=clock())
    clock.now += 2  # 2 s of the method
    with cost.measuring():
        clock.now += 5
        with cost.measuring():  # nested: counted once
            clock.now += 1
        assert cost.as_dict()["wall_s"] == 2 and cost.as_dict()["measure_s"] == 6  # mid-measurement reads true
        with cost.charging():  # a charged spend inside a measurement (best-of-n serving)
            clock.now += 3
        clock.now += 1
    clock.now += 4
    assert cost.wall_s() == 2 + 3 + 4 and cost.measure_s == 5 + 1 + 1
    # a resumed run continues both clocks
    saved, clock.now = cost.as_dict(), clock.now + 100
    resumed = Cost(started=clock())
    resumed.restore(saved)
    clock.now += 1
    assert resumed.wall_s() == 10 and resumed.measure_s == 7


def test_budget_stops_an_operation_that_spends_a_reached_cap_and_everything_past_a_cap():
    budget = Budget(pm_calls=32, flops=1e6)
    assert budget.exhausted(Cost(pm_calls=31)) is None
    at_cap = Cost(pm_calls=32)  # reached exactly: no more PM calls, but the step may use what was bought
    assert budget.exhausted(at_cap, SCORE_USES) == "budget.pm_calls=32 reached"
    assert budget.exhausted(at_cap, STEP_USES) is None and budget.exhausted(at_cap, SAMPLE_USES) is None
    past = Cost(pm_calls=33)  # over the cap: what the last batch bought is never used
    assert all(budget.exhausted(past, uses) == "budget.pm_calls=32 reached" for uses in (STEP_USES, SAMPLE_USES))
    assert budget.exhausted(Cost(flops=1e6), STEP_USES) == "budget.flops=1e+06 reached"
    assert Budget().exhausted(Cost(pm_calls=10 ** 9, flops=1e30)) is None


def test_best_of_n_plan_takes_the_largest_n_that_fits():
    # a pool of 4 samples for each of 10 prompts: 200 generated tokens, 1e6 sampling + 2e6 PM FLOPs
    pool = {"prompts": 10, "tokens_generated": 200, "sample_flops": 1e6, "pm_flops": 2e6, "sample_s": 4.0, "pm_s": 8.0}
    assert serving_cost(2, 4, pool) == {"tokens_generated": 100, "pm_calls": 20, "flops": 1.5e6, "wall_s": 6.0}
    assert serving_cost(1, 4, pool) == {"tokens_generated": 50, "pm_calls": 0, "flops": 0.25e6, "wall_s": 1.0}
    assert plan_n(4, pool, {}, {}) == (4, "no budget")
    assert plan_n(4, pool, {"pm_calls": 40}, {})[0] == 4
    n, why = plan_n(4, pool, {"pm_calls": 39}, {})
    assert n == 3 and why == "best-of-4 would exceed budget pm_calls"
    assert plan_n(4, pool, {"flops": 1.6e6}, {"flops": 0.1e6})[0] == 2  # what is already spent counts
    assert plan_n(4, pool, {"pm_calls": 5}, {})[0] == 1  # best-of-1 needs no PM
    n, why = plan_n(4, pool, {"tokens_generated": 10}, {})
    assert n == 1 and "below the cost of best-of-1" in why


# --------------------------------------------------------------------------- the context
def test_context_charges_exact_flops_and_stops_within_one_batch(tiny_overrides, tmp_path):
    """On the tiny stages: sampling costs 2·N per prompt and generated token, scoring 2·N_pm per token
    the PM reads, a step 6·N per trained token; a spent budget stops sampling and scoring within one
    batch, and measurement neither charges nor checks."""
    cfg, mcfg, _ = validate(compose(tiny_overrides + FAST + ["method=dpo"]))
    ctx = build_context(cfg, mcfg, tmp_path)
    pi0, tok, cost = ctx.reference(), ctx.tokenizer, ctx.cost
    n_pi0, n_pm = count_params(pi0), count_params(ctx.pm.model)
    prompts = ctx.train_prompts[:5]
    out = ctx.sample(pi0, prompts, n=2)
    room = ctx.max_len - cfg.train.max_new_tokens
    prompt_tokens = 2 * sum(len(tok(p, add_special_tokens=False)["input_ids"][-room:]) for p in prompts)
    assert out.n_prompt_tokens == prompt_tokens and cost.tokens_generated == out.n_tokens > 0
    assert cost.flops == 2 * n_pi0 * (prompt_tokens + out.n_tokens)
    before = cost.flops
    ctx.score(out.prompts, out.responses)
    read = sum(len(encode(tok, p, r, ctx.pm.max_len).input_ids) for p, r in zip(out.prompts, out.responses))
    assert cost.pm_calls == 10 and cost.flops - before == 2 * n_pm * read
    before = cost.flops
    policy = ctx.policy()
    ctx.charge_step(100)
    ctx.charge_forward(50, pi0)
    assert cost.tokens_trained == 100 and cost.flops - before == 6 * count_params(policy) * 100 + 2 * n_pi0 * 50

    many = ctx.train_prompts[:100]  # the PM and the sampler work in batches of 64
    ctx.budget = Budget(pm_calls=cost.pm_calls + 1)
    with pytest.raises(BudgetExceeded, match="budget.pm_calls"):
        ctx.score(many, [""] * 100)
    assert cost.pm_calls == 10 + 64  # the first batch ran, the second did not
    ctx.budget = Budget(generated_tokens=cost.tokens_generated + 1)
    generated = cost.tokens_generated
    with pytest.raises(BudgetExceeded, match="budget.generated_tokens"):
        ctx.sample(pi0, many)
    assert 0 < cost.tokens_generated - generated <= 64 * cfg.train.max_new_tokens
    spent = cost.as_dict()
    ctx.log_point(1, model=pi0)  # measurement after a stop: free, and it does not raise
    assert {k: cost.as_dict()[k] for k in ("tokens_generated", "pm_calls", "flops")} == \
        {k: spent[k] for k in ("tokens_generated", "pm_calls", "flops")}
    assert cost.measure_s > 0


def test_wall_seconds_leave_out_measurement(tiny_overrides, monkeypatch):
    """Slow measurement (1 s per measure) goes to measure_s; the run's wall_s stays small."""
    measure = RunContext.measure

    def slow_measure(self, *args, **kwargs):
        time.sleep(1.0)
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "measure", slow_measure)
    metrics, log = _run(tiny_overrides, ["method=context_distilled"])
    assert [p["label"] for p in log] == ["pi0", "final"]
    assert metrics["cost"]["measure_s"] >= 2.0 and metrics["cost"]["wall_s"] < 1.0
    assert metrics["cost"]["flops"] == 0  # π0 as it is: nothing spent


# --------------------------------------------------------------------------- every method obeys it
def test_ppo_does_not_train_on_a_rollout_bought_past_the_cap(tiny_overrides):
    """budget.pm_calls=24 with rollouts of 16: the second rollout's scoring goes over the cap, so PPO
    stops before any update on it (the old check at the top of each step ran all its epochs)."""
    metrics, log = _run(tiny_overrides, ["method=ppo", "method.steps=50", "method.rollout_batch_size=16",
                                         "method.eval_every=50", "budget.pm_calls=24"])
    info, cost = metrics["info"], metrics["cost"]
    assert info["stopped"] == "budget.pm_calls=24 reached"
    assert info["steps_done"] == 1 and info["partial_step_updates"] == 0
    assert cost["pm_calls"] == 32 <= 24 + 16  # over by one PM batch (the rollout's 16), never more
    assert [p["step"] for p in log] == [0, 1, -1]
    assert log[1]["tokens_trained"] == cost["tokens_trained"]  # nothing trained after the end point
    assert cost["flops"] > 6 * cost["tokens_trained"] * 10_000  # the tiny π0 has ~70k parameters


def test_dpo_stops_at_a_flops_budget_within_one_step(tiny_overrides):
    """FLOPs count the reference pass (2·N per token) and every step (6·N per token); the step after
    the one that reached the cap never runs."""
    cap = 6.5e9  # the probe pairs' reference pass and ~4.5 steps on the tiny fixture
    metrics, log = _run(tiny_overrides, ["method=dpo", "method.max_steps=8", "method.eval_every=1",
                                         f"budget.flops={cap}"])
    info, flops = metrics["info"], [p["flops"] for p in log[1:-1]]  # after each step
    assert info["stopped"] == "budget.flops=6.5e+09 reached"
    assert 0 < info["steps"] < info["planned_steps"] and len(flops) == info["steps"]
    assert flops[-2] < cap <= flops[-1] == metrics["cost"]["flops"]  # stopped right after reaching it
    assert flops[-1] - cap < flops[-1] - flops[-2]  # over by less than the last step's cost
    assert metrics["cost"]["measure_s"] > 0 and metrics["cost"]["pm_calls"] == 0


def test_rrhf_does_not_train_on_responses_scored_past_the_cap(tiny_overrides):
    """48 PM calls a step (8 prompts x 6 responses), budget.pm_calls=72: step 2's scoring goes over, so
    its update never runs (the old check at the top of each step trained on it)."""
    metrics, log = _run(tiny_overrides, ["method=rrhf", "method.steps=12", "method.eval_every=12",
                                         "budget.pm_calls=72"])
    assert metrics["info"]["stopped"] == "budget.pm_calls=72 reached" and metrics["info"]["steps"] == 1
    # step 2 scores its 32 samples (80 > 72), then the check before its dataset responses stops it
    assert 72 < metrics["cost"]["pm_calls"] == 80 <= 72 + 48
    assert [p["step"] for p in log] == [0, 1, -1]


def test_rs_finetune_stops_within_one_pm_batch(tiny_overrides):
    """256 PM calls a round (64 prompts x 4), scored in PM batches of 64; budget.pm_calls=300 stops
    round 2's scoring after its first batch, and round 2 trains nothing."""
    metrics, log = _run(tiny_overrides, ["method=rejection_sampling", "method.mode=finetune", "method.n=4",
                                         "method.rounds=3", "method.prompts_per_round=64", "budget.pm_calls=300"])
    info = metrics["info"]
    assert info["stopped"] == "budget.pm_calls=300 reached"
    assert metrics["cost"]["pm_calls"] == 320 <= 300 + 64
    assert [r["round"] for r in info["rounds"]] == [1] and info["steps"] == info["rounds"][0]["steps"] == 4
    assert log[-2]["step"] == 4 and log[-2]["label"] == "end"


def test_best_of_n_serves_the_largest_n_the_budget_pays_for(tiny_overrides, tiny_config):
    """24 held-out prompts, n=4 would take 96 PM calls; budget.pm_calls=60 serves best-of-2 (48)."""
    metrics, log = _run(tiny_overrides, ["method=rejection_sampling", "method.n=4", "method.kl_pool=16",
                                         "budget.pm_calls=60"])
    info, cost = metrics["info"], metrics["cost"]
    assert info["n"] == 4 and info["n_effective"] == 2
    assert info["n_effective_reason"] == "best-of-3 would exceed budget pm_calls"
    assert cost["pm_calls"] == 2 * tiny_config.eval.n_prompts <= 60
    assert info["kl_bound"] == pytest.approx(0.6931472 - 0.5)  # the KL of what is served: n = 2
    assert [p["label"] for p in log if p["label"].startswith("n=")] == ["n=1", "n=2", "n=4"]
    # serving is charged (its tokens and FLOPs are in the cost); the curve is measurement
    assert cost["tokens_generated"] > 0 and cost["flops"] > 0 and cost["measure_s"] > 0
    assert info["planned_cost"]["pm_calls"] == cost["pm_calls"]
