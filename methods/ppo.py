"""RLHF-PPO (Bai et al. 2022 §4; Ziegler et al. 2019; Ouyang et al. 2022), one file, top to bottom.

The policy π starts at π0 and maximises, per sampled response y to a prompt x,

    R(x, y) = r_PM(x, y) − λ_KL · KL(π ‖ π0)

with the KL paid token by token: every response token t earns −λ_KL · (log π(y_t) − log π0(y_t))
(the k1 estimator on the sampled token), and the last response token also earns the PM score
(minus ``truncation_penalty`` when the response was cut at max_new_tokens). All log-probs are
those of the tempered policies π_T, π0_T at the temperature T the rollout was sampled at, so the
ratios refer to the behaviour policy that drew the tokens. One PPO step:

1. rollout: draw ``rollout_batch_size`` training prompts (seeded), sample one response each from
   the current policy, score them with the PM (charged), record the log-probs of π and π0 and the
   value estimates on the sampled ids (no re-tokenisation, EOS only where it was sampled);
2. rewards: per-token KL penalty + PM score at the end (``kl_penalized_rewards``), optionally
   whitened; advantages by GAE (``gae``), whitened;
3. optimisation: ``ppo_epochs`` passes over the rollout in minibatches of ``batch_size``,
   minimising the clipped policy loss + ``vf_coef`` × the clipped value loss (``ppo_loss``),
   optionally + ``ptx_coef`` × the LM loss on training dialogues (PPO-ptx, InstructGPT);
4. the adaptive KL controller (if ``kl_target`` is set) moves λ_KL towards the target KL.

The pure pieces (rewards, GAE, whitening, the loss, the KL controller) come first and are tested
against hand-computed numbers; the loop that uses them is ``PPO.train`` at the bottom.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from alignbench.checkpoint import py_state_from_list, py_state_to_list
from alignbench.config import ConfigError, opt
from alignbench.log_points import log_steps
from alignbench.methods import BudgetExceeded, Method, MethodConfig, PolicyArtifact
from alignbench.encoding import encode_dialogue, encode_samples, pad_batch
from alignbench.train import (last_token_index, learning_rate, lm_loss, make_optimizer, optimizer_step,
                              selected_logprobs)


# --------------------------------------------------------------------------- config
@dataclass
class PPOConfig(MethodConfig):
    name: str = "ppo"
    # steps chosen on the eval split (experiment=tune_eval; conf/method/ppo.yaml has the numbers):
    # past 4 rollouts of 128 the demo's policy over-optimises the PM (gold falls, proxy climbs).
    lr: Optional[float] = opt(None, gt=0)  # None: the shared train.lr
    batch_size: Optional[int] = opt(None, gt=0)  # PPO minibatch; None: train.batch_size (capped at the rollout)
    # PPO steps (rollouts) between train_log points; None: train.log_points points over the planned
    # optimiser steps, logged inside rollouts when there are fewer rollouts than points
    eval_every: Optional[int] = opt(None, gt=0)
    steps: int = opt(4, gt=0)  # rollout batches (PPO iterations)
    rollout_batch_size: int = opt(128, gt=0)  # prompts per rollout, one response each
    ppo_epochs: int = opt(4, ge=1)  # passes over each rollout batch
    max_new_tokens: Optional[int] = opt(None, gt=0)  # response cap; None: train.max_new_tokens
    kl_coef: float = opt(0.001, ge=0)  # λ_KL (HH paper: 0.001); the initial value if adaptive
    kl_target: Optional[float] = opt(None, gt=0)  # adaptive KL controller target (nats/response); None: fixed λ_KL
    kl_horizon: int = opt(10000, gt=0)  # adaptive controller horizon, in samples (Ziegler et al.)
    gamma: float = opt(1.0, ge=0, le=1)  # discount
    lam: float = opt(0.95, ge=0, le=1)  # GAE λ
    clip: float = opt(0.2, gt=0)  # policy ratio clip ε
    clip_value: float = opt(0.2, gt=0)  # value clip: new values stay within ±clip_value of the rollout's
    vf_coef: float = opt(0.1, gt=0)  # weight of the value loss
    ent_coef: float = opt(0.0, ge=0)  # entropy bonus (none in the HH paper)
    whiten_rewards: bool = False  # rescale per-token rewards of each rollout to unit variance
    whiten_advantages: bool = True  # advantages to mean 0, variance 1 per rollout
    ptx_coef: float = opt(0.0, ge=0)  # PPO-ptx: weight of the LM loss on chosen training transcripts
    truncation_penalty: float = opt(0.0, ge=0)  # subtracted from the PM score of responses cut at max_new_tokens

    def global_batches(self, train) -> dict[str, int]:
        if self.ptx_coef > 0:  # asked only under a multi-process launch
            raise ConfigError("method.ptx_coef: PPO-ptx runs as one process only (its LM loss is a second "
                              "forward per step, which DDP does not allow); set it to 0 or use one process")
        return {"method.rollout_batch_size": self.rollout_batch_size, **super().global_batches(train)}

    def validate(self, prefix: str) -> None:
        if self.batch_size is not None and self.batch_size > self.rollout_batch_size:
            raise ConfigError(f"{prefix}.batch_size: the minibatch ({self.batch_size}) cannot exceed "
                              f"{prefix}.rollout_batch_size ({self.rollout_batch_size})")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError(f"{prefix}.kl_coef: the adaptive controller (kl_target) scales kl_coef, "
                              f"so it must start > 0")
        if self.clip >= 1:
            raise ConfigError(f"{prefix}.clip: must be < 1 (the ratio is clipped to [1-clip, 1+clip]), got {self.clip}")


# --------------------------------------------------------------------------- pure pieces
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (response tokens)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, dist=None) -> torch.Tensor:
    """(x − mean) / std over the masked positions; with shift_mean=False only the scale changes.
    With ``dist`` (a multi-process run) the statistics are those of the whole rollout, summed over
    the processes, as one process holding all of it would compute them."""
    if dist is None or not dist.enabled:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        total, count = dist.all_sum(torch.stack([(x * mask).sum(), mask.sum()]))
        mean = total / count.clamp(min=1)
        var = dist.all_sum(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −λ_KL (log π(y_t) − log π0(y_t)), plus the PM score at the last token.

    Shapes: logprobs, ref_logprobs, mask [B, T] (log-probs of the sampled tokens, 1 on response
    tokens), scores [B]. Returns (rewards [B, T], per-token k1 KL [B, T])."""
    if not bool(mask.any(-1).all()):  # the score would land on a masked position and be lost
        raise ValueError("kl_penalized_rewards: a row has no response token to credit its score to")
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens:
    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V.
    The state after the last response token is terminal (V = 0): values are masked to 0 there."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
             clip: float = 0.2, clip_value: float = 0.2, vf_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The PPO objective, averaged over response tokens (all tensors [B, T]):

    policy: max(−A ρ, −A clip(ρ, 1−ε, 1+ε)) with ρ = π(y_t)/π_old(y_t)  (pessimistic bound);
    value:  ½ max((V − R)², (V_clipped − R)²) with V_clipped = V_old + clip(V − V_old, ±clip_value).
    Returns (policy loss + vf_coef · value loss, detached statistics)."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)), mask)
    v_clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"policy_loss": pg.item(), "value_loss": vf.item(),
                 "clip_frac": masked_mean(((ratio - 1).abs() > clip).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item()}
    return pg + vf_coef * vf, stats


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019 §2.2: λ ← λ (1 + clip(KL/target − 1, ±0.2) · n / horizon), where KL is
    the rollout's mean per-response KL and n the number of samples it holds."""
    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_samples: int) -> float:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon
        return self.value


# --------------------------------------------------------------------------- model pieces
def policy_forward(policy, value_head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, positions: Optional[torch.Tensor] = None,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of the tokens under π_T [B, T-1], the value of the state before each of them
    [B, T-1], and (``with_entropy``) the entropy of π_T there. Position t-1 predicts token t, so
    all are read there. Log-probs and entropy exist at ``positions`` [B, T-1] only (the response
    tokens; by default every attended one), 0 elsewhere: the LM head runs on those rows alone, in
    chunks, with no [B, T, V] logits (``alignbench.train.selected_logprobs``)."""
    if positions is None:
        positions = attention_mask[:, 1:]
    logprobs, ent, hidden = selected_logprobs(policy, input_ids, attention_mask, positions, temperature=temperature,
                                              with_entropy=with_entropy)
    values = value_head(hidden[:, :-1].float()).squeeze(-1)
    return logprobs, values, ent


class ActorCritic(torch.nn.Module):
    """The policy LM and its value head as one module (``policy_forward`` as its forward), so a
    multi-process run wraps both in DDP and averages the value head's gradients too."""

    def __init__(self, policy, value_head: torch.nn.Linear):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                positions: Optional[torch.Tensor] = None, with_entropy: bool = False):
        return policy_forward(self.policy, self.value_head, input_ids, attention_mask, temperature=temperature,
                              positions=positions, with_entropy=with_entropy)


@dataclass
class Rollout:
    """One batch of experience: token ids and attention [N, T]; per-token tensors [N, T-1] at the
    positions of token_logprobs (index t-1 for token t), ``mask`` = 1 on response tokens."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # PM scores (before any truncation penalty)
    kl: torch.Tensor  # per-sequence k1 KL(π_T‖π0_T) on the sampled tokens [N]
    unfinished: torch.Tensor  # 1 where the response was cut at max_new_tokens [N]
    temperature: float = 1.0  # the rollout's sampling temperature: every log-prob is taken at it

    def minibatch(self, idx: torch.Tensor) -> dict:
        return trimmed({k: getattr(self, k) for k in ("input_ids", "attention_mask", "mask", "logprobs", "values",
                                                      "advantages", "returns")}, idx)


def trimmed(tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> dict:
    """Rows ``idx`` of a rollout's tensors (``input_ids``/``attention_mask`` [N, T], the rest
    per-token [N, T-1]), trimmed to their own longest sequence (right padding): the one layout a
    minibatch runs in, for the rollout's log-probs and for the update alike."""
    width = int(tensors["attention_mask"][idx].sum(-1).max())
    return {k: v[idx, :width] if k in ("input_ids", "attention_mask") else v[idx, :width - 1]
            for k, v in tensors.items()}


@torch.no_grad()
def collect_rollout(ctx, policy, value_head, reference, prompts: list[str], seed: int, cfg: PPOConfig,
                    kl_coef: float, layout: list[torch.Tensor]) -> Rollout:
    """Sample, score, and turn the samples into per-token rewards, advantages and returns.

    The sequences are the sampled ids in the sampled prompt window (EOS only where it was sampled),
    the ids the PM and the KL measurement (ctx.log_point) read too, plus (raw format) the tokens of
    the stop string that ended a response: the PM score is credited to that last action, so ending
    is learned and an empty response keeps its score. The KL penalised here is the KL reported
    there plus those few stop tokens' terms. Log-probs and values are computed minibatch by minibatch in ``layout``
    (the first epoch's minibatches, trimmed as ``Rollout.minibatch`` trims them): the first update
    then sees the very numbers it is compared with, a ratio of exactly 1. Sampling, scoring and the
    no-grad forwards of the policy (with its value head) and π0 are charged chunk by chunk, each
    checked against the budget first (BudgetExceeded stops the step)."""
    sampled = ctx.sample(policy, prompts, seed=seed, max_new_tokens=cfg.max_new_tokens)
    temp = sampled.temperature
    scores = ctx.score(sampled).float()
    unfinished = torch.tensor([not f for f in sampled.finished], dtype=torch.float)
    # every sampled token, the stop string's included: its score lands on the action that ended the
    # response (an empty response keeps its score), and the KL penalty covers that action too
    batch = pad_batch(encode_samples(sampled, with_stop=True), ctx.tokenizer.pad_token_id, ctx.device)
    mask = batch["response_mask"][:, 1:].float()
    tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "mask": mask}
    logprobs, values, ref_logprobs = (torch.zeros_like(mask) for _ in range(3))
    for idx in layout:
        idx = idx.to(mask.device)
        mb = trimmed(tokens, idx)
        n_tokens = int(mb["attention_mask"].sum())
        ctx.charge_forward(n_tokens, policy)
        ctx.charge_forward(n_tokens, reference)
        lp, v, _ = policy_forward(policy, value_head, mb["input_ids"], mb["attention_mask"], temperature=temp,
                                  positions=mb["mask"])
        ref, _, _ = selected_logprobs(reference, mb["input_ids"], mb["attention_mask"], mb["mask"], temperature=temp)
        width = lp.shape[1]
        for full, part in ((logprobs, lp), (values, v), (ref_logprobs, ref)):
            full[idx, :width] = part.float()
    logprobs, values, ref_logprobs = (x * mask for x in (logprobs, values, ref_logprobs))
    reward_scores = scores - cfg.truncation_penalty * unfinished
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, reward_scores.to(mask.device), mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, dist=ctx.dist)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, dist=ctx.dist)
    return Rollout(batch["input_ids"], batch["attention_mask"], mask, logprobs, values, advantages, returns,
                   scores, kl.sum(-1).cpu(), unfinished, temp)


class PTXBatches:
    """PPO-ptx: endless seeded minibatches of chosen training transcripts (prompt + chosen),
    LM loss on every token, mixed into each PPO minibatch to limit the alignment tax."""

    def __init__(self, ctx, batch_size: int, seed: int):
        self.ctx, self.batch_size, self.rng = ctx, batch_size, random.Random(seed)

    def next(self) -> dict:
        ctx = self.ctx
        pairs = [ctx.pairs[self.rng.randrange(len(ctx.pairs))] for _ in range(self.batch_size)]
        seqs = [encode_dialogue(ctx.tokenizer, p.prompt + p.chosen, ctx.max_len, ctx.fmt) for p in pairs]
        return pad_batch(seqs, ctx.tokenizer.pad_token_id, ctx.device)


# --------------------------------------------------------------------------- the method
class PPO(Method):
    """RLHF-PPO against the proxy PM with a per-token KL(π‖π0) penalty (Bai et al. 2022)."""

    name = "ppo"
    config_class = PPOConfig
    # each process rolls out its share of the prompts; whitening and the KL controller use the
    # statistics of the whole rollout; each minibatch is split over the processes
    supports_distributed = True

    def train(self, ctx) -> PolicyArtifact:
        cfg: PPOConfig = ctx.method_cfg
        # In train mode like every method; ctx.load turns dropout off (else the first PPO epoch
        # would see ratios ≠ 1 on the very samples it just drew).
        policy, reference = ctx.policy(), ctx.reference()
        # The value head is a scalar Linear on the policy's final hidden states (a shared trunk,
        # like TRL's classic PPOTrainer and CleanRL's Atari agent) rather than a separate critic
        # initialised from π0: one forward pass gives log-probs and values, half the compute and
        # memory of a second model, which matters on CPU. Zero-initialised, so it starts at V = 0
        # and its first gradients into the shared trunk are small; vf_coef weighs them further.
        value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(ctx.device)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        params = ActorCritic(policy, value_head)
        train_model = ctx.for_training(params)  # DDP under a multi-process launch

        minibatch = min(ctx.batch_size, cfg.rollout_batch_size)
        n_minibatches = math.ceil(cfg.rollout_batch_size / minibatch)
        optimizer, scheduler = make_optimizer(params, ctx.lr, ctx.cfg.train.weight_decay, ctx.cfg.train.warmup_steps,
                                              cfg.steps * cfg.ppo_epochs * n_minibatches)
        local_mb = minibatch // ctx.dist.world  # each process's share of a minibatch
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else None
        kl_coef = cfg.kl_coef
        rng = random.Random(ctx.seed)  # prompts and sampling seeds of every step
        shuffle = torch.Generator().manual_seed(ctx.seed)  # minibatch order
        ptx = PTXBatches(ctx, minibatch, ctx.seed + 1) if cfg.ptx_coef > 0 else None
        n_prompts = len(ctx.train_prompts)

        # Resume after a kill: weights, optimizer, the prompt/minibatch/ptx RNG streams and the KL
        # coefficient come back from the checkpoint, so the resumed run draws what this one would.
        modules = {"policy": policy, "value_head": value_head}
        start, saved = ctx.resume(modules, optimizer, scheduler)
        if saved:
            rng.setstate(py_state_from_list(saved["rng"]))
            shuffle.set_state(saved["tensors"]["shuffle"])
            if ptx is not None:
                ptx.rng.setstate(py_state_from_list(saved["ptx_rng"]))
            kl_coef = saved["kl_coef"]
            if kl_ctl is not None:
                kl_ctl.value = kl_coef
        stopped, done, last_logged, extra = None, start, saved.get("last_logged", 0), saved.get("extra", {})
        partial = 0  # optimiser steps taken on the rollout that a budget stop interrupted
        # log points: every eval_every rollouts, or train.log_points over the planned optimiser steps;
        # a point inside a rollout has the fractional step (rollout − 1 + share of its updates done)
        per_rollout = cfg.ppo_epochs * n_minibatches
        log_at = set() if cfg.eval_every else log_steps(cfg.steps * per_rollout, ctx.cfg.train.log_points)
        bar = tqdm(range(start + 1, cfg.steps + 1), desc="ppo", leave=False, mininterval=2, initial=start, total=cfg.steps)
        for step in bar:
            # 1. rollout
            idx = (rng.sample(range(n_prompts), cfg.rollout_batch_size) if cfg.rollout_batch_size <= n_prompts
                   else [rng.randrange(n_prompts) for _ in range(cfg.rollout_batch_size)])
            mine = [ctx.train_prompts[i] for i in ctx.dist.shard(idx)]
            # every epoch's minibatch order first: the rollout computes its log-probs in the first one's layout
            orders = [torch.randperm(len(mine), generator=shuffle) for _ in range(cfg.ppo_epochs)]
            stats: dict[str, list[float]] = {}
            # Every charged operation (sampling batch, PM batch, forward, optimiser step) checks the
            # budget first: a rollout that spends the budget gets no updates, and a stop between
            # minibatches leaves the step unfinished (its updates are kept and counted in `partial`).
            try:
                roll = collect_rollout(ctx, policy, value_head, reference, mine, ctx.dist.seed(rng.randrange(2 ** 31)),
                                       cfg, kl_coef, layout=list(orders[0].split(local_mb)))
                # 2. K epochs of minibatch updates on it (sampling left the policy in eval mode)
                policy.train()
                for order in orders:
                    for first in range(0, len(order), local_mb):
                        mb = roll.minibatch(order[first:first + local_mb].to(roll.mask.device))
                        ctx.check_budget()
                        logprobs, values, ent = train_model(mb["input_ids"], mb["attention_mask"], roll.temperature,
                                                            mb["mask"], cfg.ent_coef > 0)
                        loss, s = ppo_loss(logprobs, mb["logprobs"], mb["advantages"], values, mb["values"],
                                           mb["returns"], mb["mask"], cfg.clip, cfg.clip_value, cfg.vf_coef)
                        if cfg.ent_coef > 0:
                            loss = loss - cfg.ent_coef * masked_mean(ent, mb["mask"])
                        tokens = int(mb["attention_mask"].sum())
                        if ptx is not None:
                            pt = ptx.next()
                            loss = loss + cfg.ptx_coef * lm_loss(policy, pt)
                            tokens += int(pt["attention_mask"].sum())
                        lr = learning_rate(optimizer)
                        optimizer_step(loss, params.parameters(), optimizer, scheduler, ctx.cfg.train.grad_clip)
                        ctx.charge_step(tokens)
                        ctx.log_step(scheduler.last_epoch, loss=loss.item(), lr=lr, **s)  # optimiser steps so far
                        for k, v in s.items():
                            stats.setdefault(k, []).append(v)
                        inside = scheduler.last_epoch - (step - 1) * per_rollout  # this rollout's updates so far
                        if scheduler.last_epoch in log_at and inside < per_rollout:  # the rollout's end: below
                            ctx.log_point(round(step - 1 + inside / per_rollout, 4), model=policy,
                                          optimizer_step=scheduler.last_epoch)
            except BudgetExceeded as e:
                stopped, partial = str(e), len(stats.get("policy_loss", []))
                break
            # 3. the KL coefficient for the next rollout
            kl_sum, score_sum, n_tokens, n_cut, n = ctx.dist.all_sum(torch.stack(
                [roll.kl.sum(), roll.scores.sum().cpu(), roll.mask.sum().cpu(), roll.unfinished.sum(),
                 torch.tensor(float(len(roll.scores)))])).tolist()
            rollout_kl = kl_sum / n  # of the whole rollout, over all processes
            if kl_ctl is not None:
                kl_coef = kl_ctl.update(rollout_kl, int(n))
            extra = {"rollout_score": score_sum / n, "rollout_kl": rollout_kl, "kl_coef": kl_coef,
                     "rollout_tokens": n_tokens / n, "rollout_truncation_rate": n_cut / n,
                     **{k: sum(v) / len(v) for k, v in stats.items()}}
            bar.set_postfix(score=f"{extra['rollout_score']:.2f}", kl=f"{rollout_kl:.2f}")
            done = step
            if (step % cfg.eval_every == 0) if cfg.eval_every else (step * per_rollout in log_at):
                ctx.log_point(step, model=policy, optimizer_step=scheduler.last_epoch, **extra)
                last_logged = step
            ctx.save_checkpoint(step - 1, modules, optimizer, scheduler, tensors={"shuffle": shuffle.get_state()},
                                rng=py_state_to_list(rng.getstate()), kl_coef=kl_coef, last_logged=last_logged,
                                extra=extra, ptx_rng=py_state_to_list(ptx.rng.getstate()) if ptx else None)
        if done > last_logged or partial:  # the end point (also after a budget stop)
            ctx.log_point(done, model=policy, label="end" if partial else "train", **extra,
                          **({"partial_step_updates": partial} if partial else {}))

        # the LM only: the value head is a training device
        return PolicyArtifact(path=ctx.save_policy(policy), info={
            "steps_done": done, "stopped": stopped or "steps done", "final_kl_coef": kl_coef, "minibatch": minibatch,
            "partial_step_updates": partial})
