"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), π0 as the reference.

DPO trains the policy directly on the preference pairs, with no PM and no sampling: the policy's
implicit reward r(x, y) = β (log πθ(y|x) − log πref(y|x)) is fitted to the labels with the
Bradley-Terry loss the PM stage uses for its scalar head. Its only cost is training tokens.

    h    = (log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))
    loss = −log σ(β h)                                   ("sigmoid", the paper's Eq. 7)
         = −(1 − ε) log σ(β h) − ε log σ(−β h)           (with label_smoothing ε: conservative DPO,
                                                           Mitchell 2023; labels flipped with prob ε)
    loss = (h̄ − 1/(2β))²,  h̄ = per-token averaged h     ("ipo", Azar et al. 2023, Eq. 17)

Log-probs are per-sequence SUMS over response tokens (as in the paper and TRL). For IPO each
log-ratio is divided by its response length first, as TRL 1.x does ("confirmed with the IPO
authors"): a summed h grows with length, and the squared loss would then pull every pair to a
fixed margin regardless of length.

The reference log-probs are computed once per pair: πref is frozen and the pairs are fixed, so
log πref(y|x) of every pair is a constant. One no-grad pass per pair replaces a reference forward
in every step of every epoch (a third of a step's compute), and makes a step exactly one policy
forward + backward on a batch of 2B sequences [chosen..., rejected...]. TRL does the same with
``precompute_ref_log_probs=True``, in one pass before training. Here the pass is lazy: the probe
pairs before training, every other pair just before the step that first uses it (``ReferenceCache``),
so a run stopped by its budget has paid only for the pairs it trained on. A pair's value always
comes from the same batch (its first step's new pairs), so a resumed run computes bitwise the
values of an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignbench.config import ConfigError, opt
from alignbench.methods import BudgetExceeded, Method, MethodConfig, PolicyArtifact
from alignbench.encoding import Encoded, encode_pair, pad_batch
from alignbench.train import batch_schedule, learning_rate, make_optimizer, optimizer_step, response_logprobs

log = logging.getLogger(__name__)
LOSSES = ("sigmoid", "ipo")


# --------------------------------------------------------------------------- the loss
class DPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean over pairs
    chosen_reward: torch.Tensor  # β (log πθ − log πref)(y_w), per pair, detached
    rejected_reward: torch.Tensor  # β (log πθ − log πref)(y_l), per pair, detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Optional[torch.Tensor] = None,
             rejected_tokens: Optional[torch.Tensor] = None) -> DPOLossOutput:
    """The DPO loss of a batch of pairs from per-sequence summed log-probs (all shape [B]).

    ``chosen_tokens``/``rejected_tokens`` (response lengths) are needed by ``ipo`` only, which
    averages each log-ratio over its tokens. Returns the mean loss and the implicit rewards."""
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if loss_type not in LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; valid: {list(LOSSES)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        h = chosen_logratio - rejected_logratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:  # ipo
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_loss: loss_type='ipo' needs chosen_tokens and rejected_tokens (response lengths)")
        h = chosen_logratio / chosen_tokens.clamp(min=1) - rejected_logratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    return DPOLossOutput(losses.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def reward_stats(out: DPOLossOutput) -> dict:
    """Implicit-reward accuracy (ties count 1/2, so π = πref scores exactly 0.5) and margins."""
    margin = out.chosen_reward - out.rejected_reward
    acc = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"reward_accuracy": acc.mean().item(), "reward_margin": margin.mean().item(),
            "chosen_reward": out.chosen_reward.mean().item(), "rejected_reward": out.rejected_reward.mean().item()}


# --------------------------------------------------------------------------- config
@dataclass
class DPOConfig(MethodConfig):
    # Implicit KL anchor to π0 (larger: stay closer). Chosen on the eval split (experiment=tune_eval):
    # the paper's typical 0.1 over-optimises the demo's data, 0.5 scored best (conf/method/dpo.yaml).
    beta: float = opt(0.5, gt=0)
    loss: str = opt("sigmoid", choices=list(LOSSES))
    label_smoothing: float = opt(0.0, ge=0, lt=0.5)  # conservative DPO: assumed label-flip rate (sigmoid only)
    epochs: float = opt(0.5, gt=0)  # passes over the training pairs (demo: 75 steps of 32 pairs)
    max_steps: Optional[int] = opt(None, gt=0)  # cap on optimiser steps (None: epochs decide)
    probe_pairs: int = opt(128, gt=0)  # fixed training pairs on which reward accuracy/margin are logged
    ref_batch_size: int = opt(64, gt=0)  # batch size of the one-off reference pass

    def validate(self, prefix: str) -> None:
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError(f"{prefix}.label_smoothing: applies to loss=sigmoid only, got loss=ipo "
                              f"with label_smoothing={self.label_smoothing}")


# --------------------------------------------------------------------------- data
@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


def encode_pairs(tokenizer, pairs, max_len: int, fmt: str = "raw") -> list[EncodedPair]:
    """Both sides of each pair on one prompt window (``encode_pair``), rendered for ``fmt``."""
    return [EncodedPair(*encode_pair(tokenizer, p.prompt, p.chosen, p.rejected, max_len, fmt=fmt)) for p in pairs]


def pair_batch(encoded: list[EncodedPair], idx: list[int], pad_id: int, device=None) -> dict:
    """One padded batch of 2B rows, chosen first then rejected (one forward pass for both)."""
    seqs = [encoded[i].chosen for i in idx] + [encoded[i].rejected for i in idx]
    return pad_batch(seqs, pad_id, device)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [2B] and response lengths [2B] (the scored tokens)."""
    logps, _ = response_logprobs(model, batch)
    return logps, batch["response_mask"][:, 1:].sum(-1).float()


class ReferenceCache:
    """log πref of the pairs, [N, 2] (chosen, rejected), each computed once when first needed and
    charged as a no-grad forward (2·N FLOPs per token; the step's budget check comes first). The
    pairs a step uses for the first time form one batch, whenever they are computed."""

    def __init__(self, ctx, encoded: list, schedule: list[list[int]], probe_idx: list[int], batch_size: int):
        self.ctx, self.encoded, self.batch_size = ctx, encoded, batch_size
        self.values = torch.full((len(encoded), 2), float("nan"))
        self.seconds, self.first = 0.0, {}  # pair -> the step that first uses it (this process's share)
        for step, idx in enumerate(schedule):
            for i in ctx.dist.shard(idx):
                self.first.setdefault(i, step)
        self.groups: dict = {}
        probes = set(probe_idx)
        for i, step in self.first.items():
            if i not in probes:
                self.groups.setdefault(step, []).append(i)
        self._compute(probe_idx)

    def need(self, idx: list[int]) -> torch.Tensor:
        """The cache, with the pairs ``idx`` filled in (each missing pair's whole first-step group)."""
        for step in sorted({self.first[i] for i in idx if torch.isnan(self.values[i, 0])}):
            self._compute(self.groups.pop(step))
        return self.values

    @property
    def computed(self) -> int:
        return int((~torch.isnan(self.values[:, 0])).sum())

    def _compute(self, idx: list[int]) -> None:
        ctx, t0 = self.ctx, time.time()
        reference = ctx.reference()
        self.values[idx] = reference_logps(
            reference, [self.encoded[i] for i in idx], ctx.tokenizer.pad_token_id, ctx.device, self.batch_size,
            charge=lambda tokens: ctx.charge_forward(tokens, reference, check=False))
        self.seconds += time.time() - t0


@torch.no_grad()
def reference_logps(reference, encoded: list[EncodedPair], pad_id: int, device, batch_size: int = 64,
                    desc: str = "dpo reference", charge: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """log πref of every pair, shape [N, 2] (chosen, rejected); computed once, kept on the CPU.
    ``charge(tokens)`` is called before each batch's forward."""
    reference.eval()
    out = []
    for i in tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False, mininterval=2):
        idx = list(range(i, min(i + batch_size, len(encoded))))
        if charge is not None:
            charge(sum(len(encoded[j].chosen.input_ids) + len(encoded[j].rejected.input_ids) for j in idx))
        logps, _ = sequence_logps(reference, pair_batch(encoded, idx, pad_id, device))
        out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))
    return torch.cat(out)


def dpo_batch_loss(policy, encoded: list[EncodedPair], ref: torch.Tensor, idx: list[int], pad_id: int, device,
                   beta: float, loss_type: str, label_smoothing: float = 0.0) -> tuple[DPOLossOutput, int]:
    """Forward one batch of pairs through the policy and return the loss and its token count."""
    batch = pair_batch(encoded, idx, pad_id, device)
    logps, lengths = sequence_logps(policy, batch)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    r = ref[idx].to(device)
    out = dpo_loss(pc, pr, r[:, 0], r[:, 1], beta, loss_type, label_smoothing, lc, lr)
    return out, int(batch["attention_mask"].sum())


def dpo_step(policy, optimizer, scheduler, encoded, ref, idx, pad_id, device, beta, loss_type,
             label_smoothing=0.0, grad_clip: float = 1.0) -> tuple[DPOLossOutput, int]:
    """One optimiser step on one batch of pairs (what the benchmark times against TRL)."""
    out, n_tokens = dpo_batch_loss(policy, encoded, ref, idx, pad_id, device, beta, loss_type, label_smoothing)
    optimizer_step(out.loss, policy.parameters(), optimizer, scheduler, grad_clip)
    return out, n_tokens


@torch.no_grad()
def probe(policy, encoded, ref, idx, pad_id, device, cfg: DPOConfig, batch_size: int) -> dict:
    """Implicit-reward accuracy and margins of the current policy on a fixed set of training pairs."""
    was_training = policy.training
    policy.eval()
    outs = [dpo_batch_loss(policy, encoded, ref, idx[i:i + batch_size], pad_id, device, cfg.beta, cfg.loss,
                           cfg.label_smoothing)[0] for i in range(0, len(idx), batch_size)]
    policy.train(was_training)
    merged = DPOLossOutput(torch.stack([o.loss for o in outs]).mean(), torch.cat([o.chosen_reward for o in outs]),
                           torch.cat([o.rejected_reward for o in outs]))
    return {**reward_stats(merged), "probe_loss": merged.loss.item()}


# --------------------------------------------------------------------------- the method
class DPO(Method):
    """DPO (Rafailov et al. 2023): fit the implicit reward β·log π/π0 to the preference pairs; no PM, no sampling."""

    name = "dpo"
    config_class = DPOConfig
    supports_distributed = True  # the global batch is sharded over processes (alignbench.distributed)

    def train(self, ctx) -> PolicyArtifact:
        cfg: DPOConfig = ctx.method_cfg
        tok, device, pad_id = ctx.tokenizer, ctx.device, ctx.tokenizer.pad_token_id
        if not ctx.pairs:
            raise ValueError("method dpo: no training pairs (ctx.pairs is empty)")
        schedule = batch_schedule(len(ctx.pairs), ctx.batch_size, cfg.epochs, ctx.seed, cfg.max_steps)
        probe_idx = list(range(min(cfg.probe_pairs, len(ctx.pairs))))  # pairs also trained on: "training accuracy"
        used = sorted(set(probe_idx).union(*map(set, schedule)))
        encoded = [None] * len(ctx.pairs)
        for i, e in zip(used, encode_pairs(tok, [ctx.pairs[i] for i in used], ctx.max_len, ctx.fmt)):
            encoded[i] = e

        cache = ReferenceCache(ctx, encoded, schedule, probe_idx, cfg.ref_batch_size)
        ref = cache.values

        policy = ctx.policy()
        opt, sched = make_optimizer(policy, ctx.lr, ctx.cfg.train.weight_decay, ctx.cfg.train.warmup_steps, len(schedule))
        initial = self._probe(ctx, policy, encoded, ref, probe_idx, cfg)
        # Resume after a kill: the schedule is a pure function of the seed, so skipping the
        # finished steps and restoring weights, optimizer, RNG and costs continues the same run.
        start, saved = ctx.resume({"policy": policy}, opt, sched)
        train_model = ctx.for_training(policy)  # DDP under a multi-process launch
        window: list[dict] = saved.get("window", [])  # training-batch stats since the last logged point
        initial = saved.get("initial", initial)
        stopped, step, log_at = None, start, ctx.log_steps(len(schedule))
        bar = tqdm(schedule[start:], desc="dpo", leave=False, mininterval=2, initial=start, total=len(schedule))
        for step, idx in enumerate(bar, start=start + 1):
            try:  # before the step's forwards: a stop leaves at most the previous step's cost over the cap
                ctx.check_budget()
            except BudgetExceeded as e:
                stopped = str(e)
                step -= 1
                break
            # each process takes its share of the global batch; DDP averages the gradients
            mine = ctx.dist.shard(idx)
            lr = learning_rate(opt)
            out, n_tok = dpo_step(train_model, opt, sched, encoded, cache.need(mine), mine, pad_id, device, cfg.beta,
                                  cfg.loss, cfg.label_smoothing, ctx.cfg.train.grad_clip)
            ctx.charge_step(n_tok)
            window.append({"loss": out.loss.item(), **reward_stats(out)})
            ctx.log_step(step, lr=lr, **window[-1])
            if step % 10 == 0:
                bar.set_postfix(loss=f"{window[-1]['loss']:.3f}", acc=f"{window[-1]['reward_accuracy']:.2f}")
            if step in log_at:
                self._log(ctx, step, policy, encoded, ref, probe_idx, cfg, window)
                window = []
            ctx.save_checkpoint(step - 1, {"policy": policy}, opt, sched, window=window, initial=initial)
        if window or step == 0:
            self._log(ctx, step, policy, encoded, ref, probe_idx, cfg, window)
        final = self._probe(ctx, policy, encoded, ref, probe_idx, cfg)

        info = {"steps": step, "planned_steps": len(schedule), "stopped": stopped or "schedule complete",
                "beta": cfg.beta, "loss": cfg.loss, "label_smoothing": cfg.label_smoothing,
                "ref_logps_seconds": round(cache.seconds, 3), "ref_logps_pairs": cache.computed,
                "probe_pairs": len(probe_idx),
                **{f"initial_{k}": v for k, v in initial.items()}, **{f"final_{k}": v for k, v in final.items()}}
        return PolicyArtifact(path=ctx.save_policy(policy), info=info)

    @staticmethod
    def _probe(ctx, policy, encoded, ref, probe_idx, cfg) -> dict:
        """``probe`` as measurement: free, its seconds in measure_s."""
        with ctx.cost.measuring():
            return probe(policy, encoded, ref, probe_idx, ctx.tokenizer.pad_token_id, ctx.device, cfg, ctx.batch_size)

    @classmethod
    def _log(cls, ctx, step, policy, encoded, ref, probe_idx, cfg, window) -> None:
        if not ctx.dist.is_main:  # measurement is the main process's (its batches' stats in window)
            return
        extra = cls._probe(ctx, policy, encoded, ref, probe_idx, cfg)
        if window:  # TRL-style running means over the training batches since the last point
            extra.update({f"train_{k}": sum(w[k] for w in window) / len(window) for k in window[0]})
        ctx.log_point(step, model=policy, **extra)
