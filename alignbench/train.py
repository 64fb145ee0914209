"""Shared training mechanics, written once so every stage and method is measured by the same code:
per-token log-probs, the optimiser, and one supervised loop (tokenisation: ``alignbench.encoding``).

Batches are ordered as a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from alignbench import packing
from alignbench.lora import set_gradient_checkpointing

log = logging.getLogger(__name__)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p_T(x_t | x_<t) = log softmax(logits / T) for t >= 1, shape [B, T-1] (position t-1
    predicts token t). T is the temperature the tokens were sampled at (1: the model itself)."""
    logits = logits[:, :-1].float()
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


LOGIT_CHUNK = 1024  # positions whose logits exist at once: 1024 × 49k vocab × 4 bytes ≈ 200 MB


def _inner(model):
    """The model behind a DDP wrapper (its head and config)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The trunk's final (normed) hidden states [B, T, H] of a right-padded batch, the LM head's
    input (zeros at pads when packed). The model runs packed (``alignbench.packing``: the real
    tokens only, when ``train.packing`` is on) with ``logits_to_keep=1``: its own head sees one
    position only (no [B, T, V] logits)."""
    def call(**inputs):  # a training/scoring forward: a KV cache would only hold memory
        return model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]

    return packing.forward(getattr(_inner(model), "config", None), call, input_ids, attention_mask)


def softcapped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """c·tanh(z/c) where the model softcaps its logits (``final_logit_softcapping`` = c), else z."""
    return torch.tanh(z / softcap) * softcap if softcap else z


def selected_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """The model's logits [M, V] (fp32, softcapped as its own forward does) at the M positions
    where ``positions`` [B, T] is true, in row-major order: the LM head never runs on pads or on
    positions nobody reads (``final_hidden``, packed)."""
    inner = _inner(model)
    hidden = final_hidden(model, input_ids, attention_mask)[positions.bool()]
    return softcapped(inner.get_output_embeddings()(hidden).float(),
                      getattr(inner.config, "final_logit_softcapping", None))


def chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   softcap: Optional[float] = None, with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """For rows h [M, H] and their next tokens y [M]: z = head(h) in fp32 (softcapped as
    c·tanh(z/c) where the model does so), then log p_T(y) = z_y/T − logsumexp(z/T) and, if asked,
    the entropy H = logsumexp(z/T) − Σ_v p_v z_v/T. One chunk's logits; see ``selected_logprobs``."""
    z = softcapped(head(hidden).float(), softcap)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return (logp,)
    return logp, lse - (torch.softmax(z, -1) * z).sum(-1)


def selected_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                      temperature: float = 1.0, with_entropy: bool = False):
    """log p_T(x_t | x_<t) [B, T-1] at the positions where ``positions`` [B, T-1] is true (0
    elsewhere), the entropy of p_T there (or None) and the final hidden states [B, T, H].

    Memory: the LM head runs only on those positions, ``LOGIT_CHUNK`` at a time, each chunk under
    activation checkpointing, so no [B, T, V] logits or fp32 log-softmax exist, in the forward or
    kept for the backward (the chunk's logits are recomputed there). Works through DDP, peft
    wrappers and ``lora.AdapterDisabled``, and under autocast (the head's matmul in bf16, the
    softmax in fp32)."""
    hidden = final_hidden(model, input_ids, attention_mask)
    sel = positions.bool()
    rows, targets = hidden[:, :-1][sel], input_ids[:, 1:][sel]
    inner = _inner(model)
    head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    parts = []
    for i in range(0, len(rows), LOGIT_CHUNK):
        kw = dict(temperature=temperature, softcap=softcap, with_entropy=with_entropy)
        chunk = (head, rows[i:i + LOGIT_CHUNK], targets[i:i + LOGIT_CHUNK])
        parts.append(checkpoint(chunk_logprobs, *chunk, use_reentrant=False, **kw) if torch.is_grad_enabled()
                     else chunk_logprobs(*chunk, **kw))
    outs = []
    for k in range(2 if with_entropy else 1):
        full = torch.zeros(sel.shape, dtype=torch.float32, device=hidden.device)
        if parts:
            full[sel] = torch.cat([p[k] for p in parts])
        outs.append(full)
    return outs[0], outs[1] if with_entropy else None, hidden


def response_logprobs(model, batch: dict, average: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean) of log-probs (at temperature T) over response tokens, and the per-token values
    [B, T-1] (0 off the response), computed by ``selected_logprobs`` (no [B, T, V] tensor)."""
    mask = batch["response_mask"][:, 1:]
    per_tok, _, _ = selected_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, temperature=temperature)
    mask = mask.float()
    total = (per_tok * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total, per_tok * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 0/1 mask whose ones are contiguous (right padding)."""
    return mask.long().cumsum(-1).argmax(-1)  # argmax returns the first maximum: the last 1


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy on response tokens only (all tokens when response_start == 0)."""
    _, per_tok = response_logprobs(model, batch)
    return -per_tok.sum() / batch["response_mask"][:, 1:].sum().clamp(min=1)


# --------------------------------------------------------------------------- batching
def batch_schedule(n_items: int, batch_size: int, epochs: float, seed: int,
                   max_steps: Optional[int] = None) -> list[list[int]]:
    """Index batches for the whole run, a pure function of its arguments (resume-safe)."""
    rng = random.Random(seed)
    total = max(1, math.ceil(n_items * epochs / batch_size))
    if max_steps:
        total = min(total, max_steps)
    order: list[int] = []
    while len(order) < total * batch_size:
        perm = list(range(n_items))
        rng.shuffle(perm)
        order += perm
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(total)]


# --------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    steps: int
    seconds: float
    tokens: int
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup: int = 0,
                   total_steps: int = 1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay, betas=(0.9, 0.95))

    def schedule(step: int) -> float:  # linear warmup, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def autocast(precision: str, device) -> torch.autocast:
    """bf16 mixed precision (train.precision=bf16): matmuls in bf16 under torch.autocast, weights
    and optimizer state in fp32; a no-op context for fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def learning_rate(optimizer) -> float:
    """The learning rate the next ``optimizer.step()`` applies (what a step logs)."""
    return optimizer.param_groups[0]["lr"]


def optimizer_step(loss: torch.Tensor, params, optimizer, scheduler, grad_clip: float) -> None:
    """One update, the same for every stage and method: backward, clip the global grad norm,
    step the optimizer and the schedule, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def supervised_loop(model: torch.nn.Module, batches: list[list[int]],
                    make_batch: Callable[[list[int]], dict], loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
                    lr: float, desc: str, grad_clip: float = 1.0, weight_decay: float = 0.0,
                    warmup: int = 0, device: torch.device | str = "cpu",
                    on_step: Optional[Callable[[int, float], None]] = None, precision: str = "fp32",
                    gradient_checkpointing: bool = False,
                    log_step: Optional[Callable[..., None]] = None) -> LoopResult:
    """Plain minibatch training: one optimiser step per batch, a progress bar, token accounting.
    ``log_step(step, loss=, lr=)`` (e.g. ``Tracker.log_step``) after each optimiser step, 1-based."""
    set_gradient_checkpointing(model, gradient_checkpointing)
    model.to(device).train()
    opt, sched = make_optimizer(model, lr, weight_decay, warmup, len(batches))
    tokens, losses, start = 0, [], time.time()
    bar = tqdm(batches, desc=desc, leave=False, mininterval=2)
    for step, idx in enumerate(bar):
        batch = {k: v.to(device) for k, v in make_batch(idx).items()}
        with autocast(precision, device):
            loss = loss_fn(model, batch)
        lr = learning_rate(opt)
        optimizer_step(loss, model.parameters(), opt, sched, grad_clip)
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
        if log_step:
            log_step(step + 1, loss=losses[-1], lr=lr)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return LoopResult(len(batches), time.time() - start, tokens, losses)
