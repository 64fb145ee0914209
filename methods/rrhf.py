"""RRHF (Yuan et al. 2023, arXiv 2304.05302): rank responses by the PM, align the policy's
length-normalised log-probs to that ranking, plus cross-entropy on the best response.

For each prompt we gather k responses: ``k_samples`` samples of the current policy and, with
``include_dataset``, the dataset's chosen and rejected responses for that prompt. The PM scores all
of them. The policy scores each as p_i = (1/|y_i|) Σ_t log π(y_i,t | x, y_<t), and ``rrhf_loss`` asks
that a response the PM ranks lower never gets a higher p:

    L = Σ_{r_i < r_j} max(0, p_i − p_j)  +  ce_weight · CE(best-scored response)

Why it is cheap: one policy and the PM (no value model, no reference model in the loss). Why the
CE term: without it the ranking can be satisfied by pushing every p down; it keeps the policy
imitating its best response, so RRHF behaves like a best-of-n learner.

What is scored is what was sampled: the policy's samples enter the PM and the loss as their sampled
ids (EOS only where sampled), the dataset responses as an ``encode_pair`` (one prompt window for
both, EOS appended: they are complete). p_i is the policy's own log-prob (T = 1): the sampling
temperature is a choice of how to explore, not part of the policy being trained.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from alignbench.config import ConfigError, opt
from alignbench.methods import BudgetExceeded, Method, MethodConfig, PolicyArtifact
from alignbench.encoding import encode_pair, encode_samples, pad_batch
from alignbench.train import batch_schedule, learning_rate, make_optimizer, optimizer_step, response_logprobs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the loss
def rrhf_loss(logp: torch.Tensor, rewards: torch.Tensor, ce_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """RRHF loss for a batch of prompts, averaged over prompts.

    logp:    [P, k] length-normalised log-probs p_i of each prompt's k responses (with gradients)
    rewards: [P, k] PM scores r_i (no gradients)
    Rank term per prompt: Σ over pairs with r_i < r_j of max(0, p_i − p_j) (tied rewards: no term).
    CE term per prompt: −p_best, the mean token cross-entropy of the highest-r response (ties: first).
    """
    if logp.shape != rewards.shape or logp.dim() != 2 or logp.shape[1] < 2:
        raise ValueError(f"rrhf_loss: logp and rewards must both be [P, k>=2], got {tuple(logp.shape)}, {tuple(rewards.shape)}")
    rewards = rewards.detach().to(logp.device)
    worse = rewards[:, :, None] < rewards[:, None, :]  # [P, i, j]: response i ranked below j
    gap = (logp[:, :, None] - logp[:, None, :]).clamp(min=0)  # max(0, p_i − p_j)
    rank = (gap * worse).sum(dim=(1, 2))
    best = rewards.argmax(dim=1)  # torch returns the first maximal index on ties
    ce = -logp.gather(1, best[:, None]).squeeze(1)
    loss = (rank + ce_weight * ce).mean()
    return loss, {"rank": rank.mean().item(), "ce": ce.mean().item()}


# --------------------------------------------------------------------------- config
@dataclass
class RRHFConfig(MethodConfig):
    name: str = "rrhf"
    k_samples: int = opt(4, ge=0)  # policy samples per prompt
    include_dataset: bool = True  # also rank the dataset's chosen and rejected responses
    ce_weight: float = opt(1.0, ge=0)  # weight of the cross-entropy on the best-scored response
    steps: int = opt(10, gt=0)  # optimiser steps (chosen on the eval split: conf/method/rrhf.yaml)
    prompts_per_step: int = opt(8, gt=0)  # prompts (preference pairs) per step; k responses each
    temperature: Optional[float] = opt(None, gt=0)  # sampling temperature; None: train.temperature
    lr: Optional[float] = opt(None, gt=0)  # None: train.lr

    @property
    def k(self) -> int:
        """Responses ranked per prompt."""
        return self.k_samples + (2 if self.include_dataset else 0)

    def global_batches(self, train) -> dict[str, int]:
        return {"method.prompts_per_step": self.prompts_per_step}

    def validate(self, prefix: str) -> None:
        if self.k < 2:
            raise ConfigError(f"{prefix}.k_samples: RRHF ranks at least 2 responses per prompt; k_samples="
                              f"{self.k_samples} with include_dataset={self.include_dataset} gives {self.k}")


# --------------------------------------------------------------------------- the method
class RRHF(Method):
    """RRHF: rank k PM-scored responses per prompt by length-normalised log-prob, plus SFT on the best."""

    name = "rrhf"
    config_class = RRHFConfig
    supports_distributed = True  # each process samples and ranks its share of the step's prompts

    def train(self, ctx) -> PolicyArtifact:
        cfg: RRHFConfig = ctx.method_cfg
        policy, tok = ctx.policy(), ctx.tokenizer
        temp = cfg.temperature or ctx.cfg.train.temperature
        pairs = ctx.pairs
        epochs = cfg.steps * cfg.prompts_per_step / len(pairs)
        schedule = batch_schedule(len(pairs), cfg.prompts_per_step, epochs, seed=ctx.seed, max_steps=cfg.steps)
        opt, sched = make_optimizer(policy, ctx.lr, ctx.cfg.train.weight_decay, ctx.cfg.train.warmup_steps, len(schedule))
        # Resume after a kill: batches and sampling seeds are functions of (seed, step), so
        # restoring weights, optimizer and costs and skipping finished steps continues the same run.
        start, saved = ctx.resume({"policy": policy}, opt, sched)
        train_model = ctx.for_training(policy)  # DDP under a multi-process launch
        history, last_logged = saved.get("history", []), saved.get("last_logged", -1)
        stopped, step, log_at = None, start, ctx.log_steps(len(schedule))
        bar = tqdm(total=len(schedule), initial=start, desc="RRHF", leave=False, mininterval=2)
        for step_idx, idx in enumerate(schedule[start:], start=start):
            seed = ctx.dist.seed(ctx.seed * 100_003 + step_idx)
            try:  # sampling and PM batches check the budget first, and so does the optimiser step
                prompts, seqs, rewards = self._ranked(ctx, policy, [pairs[i] for i in ctx.dist.shard(idx)], cfg, temp,
                                                      seed)
                ctx.check_budget()
            except BudgetExceeded as e:
                stopped = str(e)
                break
            policy.train()
            batch = pad_batch(seqs, tok.pad_token_id, ctx.device)
            logp, _ = response_logprobs(train_model, batch, average=True)
            loss, parts = rrhf_loss(logp.view(len(prompts), cfg.k), rewards, cfg.ce_weight)
            lr = learning_rate(opt)
            optimizer_step(loss, policy.parameters(), opt, sched, ctx.cfg.train.grad_clip)
            ctx.charge_step(int(batch["attention_mask"].sum()))
            step = step_idx + 1
            ctx.log_step(step, loss=loss.item(), lr=lr, **parts)
            history.append({"step": step, "loss": loss.item(), **parts,
                            "sample_reward": rewards[:, :cfg.k_samples].mean().item() if cfg.k_samples else None})
            if step in log_at:
                ctx.log_point(step, model=policy, **{k: v for k, v in history[-1].items() if k != "step"})
                last_logged = step
            bar.update()
            ctx.save_checkpoint(step_idx, {"policy": policy}, opt, sched, history=history, last_logged=last_logged)
        bar.close()
        if stopped:
            log.info("RRHF stopped after %d steps: %s", step, stopped)
        if step != last_logged:
            ctx.log_point(step, model=policy, label="end")
        return PolicyArtifact(path=ctx.save_policy(policy), info={
            "steps": step, "k": cfg.k, "stopped": stopped,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None})

    @staticmethod
    def _ranked(ctx, policy, pairs, cfg: RRHFConfig, temp: float, seed: int) -> tuple[list[str], list, torch.Tensor]:
        """k responses per pair (the policy's samples, then optionally chosen and rejected) as
        encoded sequences, prompt-major [P·k], and their PM rewards [P, k] (k PM calls per prompt)."""
        prompts = [p.prompt for p in pairs]
        seqs: list[list] = [[] for _ in prompts]
        scores: list[list[float]] = [[] for _ in prompts]
        if cfg.k_samples:
            samples = ctx.sample(policy, prompts, n=cfg.k_samples, temperature=temp, seed=seed)
            for i, e, r in zip(samples.prompt_index, encode_samples(samples), ctx.score(samples).tolist()):
                seqs[i].append(e)
                scores[i].append(r)
        if cfg.include_dataset:
            chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
            both = ctx.score(prompts + prompts, chosen + rejected).tolist()
            for i, p in enumerate(pairs):
                seqs[i] += encode_pair(ctx.tokenizer, p.prompt, p.chosen, p.rejected, ctx.max_len, fmt=ctx.fmt)
                scores[i] += [both[i], both[len(pairs) + i]]
        return prompts, [e for row in seqs for e in row], torch.tensor(scores)
