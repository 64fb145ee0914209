"""Batched, KV-cached sampling shared by every method and evaluator, so all policies are sampled
the same way (same temperature, length cap and stop rule) and generated tokens are counted once.

A response ends at EOS or where the model starts a new "\\n\\nHuman:" turn (cut off, not kept).
Seeding is per call: the same (seed, prompts) give the same samples on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

STOP = "\n\nHuman:"


@dataclass
class SampleBatch:
    prompts: list[str]  # one per sample (a prompt repeated n times appears n times)
    responses: list[str]
    prompt_index: list[int]  # index into the caller's prompt list
    n_tokens: int  # generated tokens, before cutting at the stop string
    n_prompt_tokens: int = 0  # prompt tokens fed to the model (after truncation), summed over samples


def cut_response(text: str) -> str:
    i = text.find(STOP)
    return text if i < 0 else text[:i]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, seed: int = 0, batch_size: int = 64, max_len: int = 256,
           greedy: bool = False, before_batch: Optional[Callable[[], None]] = None,
           after_batch: Optional[Callable[[int, int], None]] = None) -> SampleBatch:
    """n samples per prompt. Prompts longer than max_len - max_new_tokens keep their end.

    ``before_batch()`` runs before each batch of ``batch_size`` samples (a budget check may raise
    there) and ``after_batch(prompt_tokens, generated_tokens)`` after it (to charge it): a charged
    caller's costs then grow batch by batch, with the same random stream as one uncharged call."""
    model.eval()
    device = next(model.parameters()).device
    expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out_prompts, out_resp, out_idx, n_tok, n_prompt = [], [], [], 0, 0
    room = max(8, max_len - max_new_tokens)
    stop_ids = tokenizer(STOP, add_special_tokens=False)["input_ids"]
    for start in range(0, len(expanded), batch_size):
        if before_batch is not None:
            before_batch()
        chunk = expanded[start:start + batch_size]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-room:] for _, p in chunk]
        batch_prompt, batch_gen = sum(map(len, ids)), n_tok
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for r, seq in enumerate(ids):  # left padding: every row's last prompt token is aligned
            input_ids[r, width - len(seq):] = torch.tensor(seq)
            attn[r, width - len(seq):] = 1
        new = _decode_loop(model, input_ids.to(device), attn.to(device), max_new_tokens, temperature,
                           tokenizer.eos_token_id, gen, greedy, stop_ids)
        for (i, p), row in zip(chunk, new):
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            n_tok += len(row)
            out_prompts.append(p)
            out_resp.append(cut_response(tokenizer.decode(row, skip_special_tokens=True)))
            out_idx.append(i)
        n_prompt += batch_prompt
        if after_batch is not None:
            after_batch(batch_prompt, n_tok - batch_gen)
    return SampleBatch(out_prompts, out_resp, out_idx, n_tok, n_prompt)


def _decode_loop(model, input_ids, attn, max_new, temperature, eos_id, gen, greedy, stop_ids) -> list[list[int]]:
    """Token-by-token sampling with the model's KV cache; rows that hit EOS stop early.

    Written out (rather than `generate()`) so the random stream is ours and seeded per call, and
    so the loop stops as soon as every row has ended (EOS, or the tokens of a new Human turn)."""
    batch = input_ids.shape[0]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    done = torch.zeros(batch, dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new):
        if greedy:
            nxt = logits.argmax(-1).cpu()
        else:
            probs = torch.softmax(logits.float().cpu() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_id
        if len(tokens) >= len(stop_ids):
            tail = torch.stack(tokens[-len(stop_ids):], 1)
            done |= (tail == torch.tensor(stop_ids)).all(1)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=attn.device)], 1)
        out = model(input_ids=nxt[:, None].to(attn.device), attention_mask=attn, position_ids=next_pos,
                    past_key_values=past, use_cache=True)
        past, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(batch)]
