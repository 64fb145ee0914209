"""RLHF-PPO: the loss pieces against hand-computed numbers, config errors, and a tiny real run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from alignbench.config import ConfigError
from alignbench.methods import method_config
from alignbench_methods.ppo import (PPO, AdaptiveKLController, gae, kl_penalized_rewards, masked_whiten,
                                    ppo_loss)


# --------------------------------------------------------------------------- pure pieces
def test_kl_penalized_rewards_per_token_with_score_at_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.1, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2: 2-token response, then padding
    rewards, kl = kl_penalized_rewards(logprobs, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    # k1 per token = log π − log π0 = [0.5, −1, 0] and [0.2, −0.2, (pad)]; r = −0.1·k1, + score at the end
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.2, -0.2, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.02, 0.02 - 1.0, 0.0]]))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(0, 3),
                               st.floats(-5, 5, allow_nan=False)), min_size=1, max_size=4),
       coef=st.floats(0, 1, allow_nan=False))
def test_every_score_reaches_the_advantages_wherever_its_response_sits(rows, coef):
    # issue 24 §1.7: a row with no response token put its score on a masked (prompt) position,
    # which GAE zeroes: a −5 became 0. Every row now has ≥ 1 response token (the stop string's
    # tokens are in PPO's sequences), and with γ = λ = 1 and no values, each row's advantages sum
    # to its score minus its KL penalty: nothing lost, nothing leaked from the masked positions
    width = max(p + r + pad for p, r, pad, _ in rows)
    mask = torch.zeros(len(rows), width)
    for i, (p, r, _, _) in enumerate(rows):
        mask[i, p:p + r] = 1.0
    logprobs, ref = torch.randn(len(rows), width), torch.randn(len(rows), width)
    scores = torch.tensor([s for *_, s in rows])
    rewards, kl = kl_penalized_rewards(logprobs, ref, scores, mask, kl_coef=coef)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    first = mask.argmax(-1)
    expected = scores - coef * ((logprobs - ref) * mask).sum(-1)
    assert torch.allclose(adv[torch.arange(len(rows)), first], expected, atol=1e-4)
    with pytest.raises(ValueError, match="no response token"):
        kl_penalized_rewards(logprobs, ref, scores, torch.zeros_like(mask), kl_coef=coef)


def test_a_response_that_is_only_the_stop_string_keeps_its_score_in_the_rollout():
    from alignbench.sampling import SampleBatch
    from alignbench.encoding import encode_samples, pad_batch
    # row 0 said nothing before "\n\nHuman:" (3 stop tokens); row 1 ended with EOS (no stop tokens)
    samples = SampleBatch(["a", "b"], ["", "ok"], [0, 1], 6, [[5, 6], [7]], [[], [8, 2]], [True, True], 1.0,
                          stop_ids=[[9, 10, 11], []])
    batch = pad_batch(encode_samples(samples, with_stop=True), pad_id=0)
    mask = batch["response_mask"][:, 1:].float()
    assert mask.sum(-1).tolist() == [3.0, 2.0]  # the policy's stop action is a response token to credit
    assert [e.input_ids for e in encode_samples(samples)] == [[5, 6], [7, 8, 2]]  # measurement: as before
    rewards, _ = kl_penalized_rewards(torch.zeros_like(mask), torch.zeros_like(mask), torch.tensor([-5.0, 1.0]),
                                      mask, kl_coef=0.1)
    assert rewards.sum(-1).tolist() == [-5.0, 1.0]


def test_gae_three_tokens_gamma_1_lambda_half():
    # layout: [prompt, y0, y1, y2, pad]; masked positions hold junk that must not leak in
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ2 = 1.0 + 0 − 0.3 = 0.7 (terminal), δ1 = −0.2 + 0.3 − 0.4 = −0.3, δ0 = 0.1 + 0.4 − 0.5 = 0
    # A2 = 0.7, A1 = −0.3 + 0.5·0.7 = 0.05, A0 = 0 + 0.5·0.05 = 0.025; returns = A + V
    assert torch.allclose(adv, torch.tensor([[0.0, 0.025, 0.05, 0.7, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.525, 0.45, 1.0, 0.0]]))


def test_gae_lambda_1_gives_discounted_monte_carlo_returns():
    rewards, values = torch.tensor([[0.1, -0.2, 1.0]]), torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[0.9, 0.8, 1.0]]))  # sums of future rewards, values cancel
    _, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[0.25, 0.3, 1.0]]))  # 0.1 + 0.5·(−0.2 + 0.5·1.0)


def test_clipped_policy_loss_and_its_gradient():
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.9, 1.5]])
    old = torch.zeros(1, 4)
    logprobs = ratio.log().requires_grad_(True)
    zeros, mask = torch.zeros(1, 4), torch.ones(1, 4)
    loss, stats = ppo_loss(logprobs, old, adv, zeros, zeros, zeros, mask, clip=0.2)
    # per token max(−Aρ, −A clip(ρ, 0.8, 1.2)): max(−1.5, −1.2) = −1.2; max(0.5, 0.8) = 0.8;
    # max(−1.8, −1.8) = −1.8; max(1.5, 1.2) = 1.5 (pessimistic: the unclipped one) -> mean −0.175
    assert loss.item() == pytest.approx(-0.175)
    assert stats["clip_frac"] == pytest.approx(0.75)
    loss.backward()
    # clipped tokens get no gradient; the others d(−Aρ)/d log ρ / 4 = −Aρ/4
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, 0.0, -0.45, 0.375]]))


def test_clipped_value_loss():
    values, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    returns, mask, zeros = torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), torch.zeros(1, 2)
    loss, stats = ppo_loss(zeros, zeros, zeros, values, old, returns, mask, clip_value=0.2, vf_coef=0.1)
    # token 1: V_clip = 0.7, max((1−2)², (0.7−2)²) = 1.69; token 2: V_clip = 0.3, max(0, 0.09) = 0.09
    assert stats["value_loss"] == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert stats["policy_loss"] == pytest.approx(0.0)
    assert loss.item() == pytest.approx(0.1 * 0.445)


def test_masked_whiten():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = math.sqrt(1.5)  # 1 / sqrt(var = 2/3)
    assert torch.allclose(masked_whiten(x, mask), torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-5)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), torch.tensor([[2 - s, 2.0, 2 + s, 0.0]]), atol=1e-5)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    assert ctl.update(9.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # error clipped at +0.2
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    assert ctl.update(5.4, 64) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))  # KL below target: λ falls


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("raw,key", [
    ({"clip": 0}, "method.clip"), ({"clip": 1.5}, "method.clip"), ({"kl_coef": -0.1}, "method.kl_coef"),
    ({"ppo_epochs": 0}, "method.ppo_epochs"), ({"gamma": 1.5}, "method.gamma"), ({"gamma": -0.1}, "method.gamma"),
    ({"lam": 2}, "method.lam"), ({"steps": 0}, "method.steps"), ({"rollout_batch_size": 0}, "method.rollout_batch_size"),
    ({"batch_size": 128, "rollout_batch_size": 64}, "method.batch_size"), ({"kl_target": 0}, "method.kl_target"),
    ({"clip_value": 0}, "method.clip_value"), ({"max_new_tokens": 0}, "method.max_new_tokens"),
    ({"ptx_coef": -1}, "method.ptx_coef"), ({"kl_target": 1.0, "kl_coef": 0}, "method.kl_coef"), ({"vf_coef": 0}, "method.vf_coef"), ({"cliprange": 0.2}, "cliprange"),
])
def test_bad_settings_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        method_config(PPO, {"name": "ppo", **raw})


def test_defaults_follow_the_hh_paper():
    cfg = method_config(PPO, {"name": "ppo"})
    assert (cfg.kl_coef, cfg.clip, cfg.gamma, cfg.lam, cfg.ent_coef, cfg.kl_target) == (0.001, 0.2, 1.0, 0.95, 0.0, None)


# --------------------------------------------------------------------------- a real run
STEPS, ROLLOUT, NEW_TOKENS = 8, 32, 48  # 4 steps raised the proxy reward by 0.1 in only one of seeds 0-3


def test_ppo_tiny_run_raises_proxy_reward(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    # The fixture's π0 is far weaker than the demo's, and the run is short: a larger step than the
    # demo default (lr = train.lr = 1e-4) makes the gain clear within seconds. Room for 48 tokens:
    # at the fixture's 16 most responses are cut unfinished, and the PM (trained on ended responses)
    # gives little signal on those now that they are no longer scored with a phantom EOS.
    over = ["method=ppo", f"method.steps={STEPS}", f"method.rollout_batch_size={ROLLOUT}", "method.eval_every=2",
            "method.lr=1e-3", f"train.max_new_tokens={NEW_TOKENS}"]
    metrics = run_job(compose(tiny_overrides + over), over)
    run = next((tiny_overrides_sweep(tiny_overrides) / "runs").glob("ppo_s0*"))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in log] == [0, 2, 4, 6, 8, -1] and log[0]["label"] == "pi0"
    pi0, end = log[0], log[-2]
    assert end["proxy_reward"] > pi0["proxy_reward"] + 0.1, (pi0["proxy_reward"], end["proxy_reward"])
    assert end["kl_k3"] > 0 and end["kl_coef"] == pytest.approx(0.001)
    # Whether the truncation rate falls is not a property of this short run: over seeds 0-5 it fell in
    # four and rose in two (24 eval prompts: one response moves it by 0.04). The proxy gain held in all six.
    assert 0 <= end["truncation_rate"] <= 1 and 0 <= end["rollout_truncation_rate"] <= 1
    # costs: one PM call per rollout sample, at most max_new_tokens generated each
    cost = metrics["cost"]
    assert cost["pm_calls"] == STEPS * ROLLOUT
    assert 0 < cost["tokens_generated"] <= STEPS * ROLLOUT * NEW_TOKENS
    assert cost["tokens_trained"] > 4 * cost["tokens_generated"]  # 4 PPO epochs over prompt + response
    assert metrics["info"]["steps_done"] == STEPS and metrics["info"]["stopped"] == "steps done"
    assert (run / "policy" / "model.safetensors").is_file() and (run / "policy" / "tokenizer.json").is_file()
    assert not any("value" in k for k in _safetensor_keys(run / "policy" / "model.safetensors"))
    assert len((run / "samples.jsonl").read_text().splitlines()) == 24


def test_ppo_stops_cleanly_at_the_budget(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    over = ["method=ppo", "method.steps=50", "method.rollout_batch_size=16", "method.eval_every=50",
            "budget.pm_calls=32"]
    metrics = run_job(compose(tiny_overrides + over), over)
    assert metrics["info"]["steps_done"] == 2 and metrics["info"]["stopped"] == "budget.pm_calls=32 reached"
    assert metrics["cost"]["pm_calls"] == 32
    run = next((tiny_overrides_sweep(tiny_overrides) / "runs").glob("ppo_s0*"))
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [0, 2, -1]  # π0, the end point of the stopped run, the final evaluation


def tiny_overrides_sweep(overrides: list[str]):
    from pathlib import Path
    return Path(next(o for o in overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1])


def _safetensor_keys(path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return list(f.keys())
