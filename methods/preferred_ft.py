"""Preferred-FT (Rafailov et al. 2023, §6): supervised fine-tuning on the preferred (chosen)
responses of the method's comparisons (``ctx.pairs``), the cross-entropy on the response tokens.

The DPO paper's HH recipe runs it first and then DPO with the Preferred-FT policy as reference
(``experiment=chain_pft_dpo``). It is the same loss and data as π0's ``stages.pi0.mode=preferred_ft``
(``encoding.encode_chosen``, ``train.lm_loss``), but as a method: it starts from the run's start policy,
is charged for its steps, logs (KL, reward) points and resumes from its checkpoint after a kill.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

from alignbench.config import opt
from alignbench.methods import Method, MethodConfig, PolicyArtifact
from alignbench.encoding import encode_chosen, pad_batch
from alignbench.train import batch_schedule, learning_rate, lm_loss, make_optimizer, optimizer_step


@dataclass
class PreferredFTConfig(MethodConfig):
    name: str = "preferred_ft"
    epochs: float = opt(1.0, gt=0)  # passes over the comparisons' chosen responses
    max_steps: Optional[int] = opt(None, gt=0)  # cap on optimiser steps (None: epochs decide)


class PreferredFT(Method):
    """Preferred-FT: SFT on the chosen responses of the method's comparisons (the DPO paper's baseline)."""

    name = "preferred_ft"
    config_class = PreferredFTConfig

    def train(self, ctx) -> PolicyArtifact:
        cfg: PreferredFTConfig = ctx.method_cfg
        if not ctx.pairs:
            raise ValueError("method preferred_ft: no training pairs (ctx.pairs is empty)")
        data = encode_chosen(ctx.tokenizer, ctx.pairs, ctx.max_len, ctx.fmt)
        schedule = batch_schedule(len(data), ctx.batch_size, cfg.epochs, ctx.seed, cfg.max_steps)
        policy = ctx.policy()
        opt_, sched = make_optimizer(policy, ctx.lr, ctx.cfg.train.weight_decay, ctx.cfg.train.warmup_steps,
                                     len(schedule))
        # the schedule is a pure function of the seed: a resumed run skips the finished steps
        start, saved = ctx.resume({"policy": policy}, opt_, sched)
        losses, stopped, log_at = saved.get("losses", []), None, ctx.log_steps(len(schedule))
        step = start
        for step, idx in enumerate(tqdm(schedule[start:], desc="preferred-FT", leave=False, mininterval=2,
                                        initial=start, total=len(schedule)), start=start + 1):
            if (stopped := ctx.budget_hit()):  # before each optimiser step
                step -= 1
                break
            batch = pad_batch([data[i] for i in idx], ctx.tokenizer.pad_token_id, ctx.device)
            loss = lm_loss(policy, batch)
            lr = learning_rate(opt_)
            optimizer_step(loss, policy.parameters(), opt_, sched, ctx.cfg.train.grad_clip)
            ctx.charge_step(int(batch["attention_mask"].sum()))
            losses.append(loss.item())
            ctx.log_step(step, loss=losses[-1], lr=lr)
            if step in log_at:
                ctx.log_point(step, model=policy, train_loss=losses[-1])
            ctx.save_checkpoint(step - 1, {"policy": policy}, opt_, sched, losses=losses)
        if step not in log_at:  # stopped early (budget) or never stepped: the end point
            ctx.log_point(step, model=policy, label="end")
        return PolicyArtifact(path=ctx.save_policy(policy), info={
            "steps": step, "planned_steps": len(schedule), "stopped": stopped or "schedule complete",
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})
