"""Batched, KV-cached sampling shared by every method and evaluator, so all policies are sampled
the same way (same temperature, length cap and stop rule) and generated tokens are counted once.

A response ends at EOS or where the model starts a new "\\n\\nHuman:" turn (cut off, not kept)
under ``data.format=raw``; at the chat template's end-of-turn token under ``chat``
(``alignbench.formats``: the prompt is rendered there too).
Seeding is per call: the same (seed, prompts) give the same samples on CPU.

What is scored downstream (log-probs, KL, PM, PPO rollouts) is what was sampled: ``SampleBatch``
carries the exact prompt window the model was conditioned on and the generated ids, so nothing is
re-tokenised and no EOS is added that the model did not sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from alignbench import formats
from alignbench.train import prompt_window

STOP = "\n\nHuman:"
# transformers 5.x passes the KV cache as ``cache`` (``past_key_values`` is deprecated for removal
# in 5.40); older releases (>= 4.56, still admitted by pyproject) know only ``past_key_values``.
CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class SampleBatch:
    """n samples per prompt, row by row (a prompt repeated n times appears n times).

    ``responses[i] == tokenizer.decode(response_ids[i], skip_special_tokens=True)``; ``response_ids``
    hold EOS only where it was sampled; ``finished[i]`` is True when the response ended (EOS or the
    stop string), False when it was cut at max_new_tokens. ``n_tokens`` counts every token the
    model sampled (a sampled EOS and the tokens of a cut-off stop string included; the padding of
    rows that had already ended is not)."""
    prompts: list[str]
    responses: list[str]
    prompt_index: list[int]  # index into the caller's prompt list
    n_tokens: int
    prompt_ids: list[list[int]] = field(default_factory=list)  # the (truncated) prompt tokens sampled from
    response_ids: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    temperature: float = 1.0

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, rows: Sequence[int]) -> "SampleBatch":
        """The given rows (e.g. best-of-n's picks), in that order; n_tokens is kept (all were sampled)."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return SampleBatch(pick(self.prompts), pick(self.responses), pick(self.prompt_index), self.n_tokens,
                           pick(self.prompt_ids), pick(self.response_ids), pick(self.finished), self.temperature)

    @property
    def n_prompt_tokens(self) -> int:
        """Prompt tokens fed to the model (after truncation), summed over samples."""
        return sum(map(len, self.prompt_ids))

    @property
    def truncation_rate(self) -> float:
        """Share of responses cut at max_new_tokens (not ended by EOS or the stop string)."""
        return sum(not f for f in self.finished) / max(len(self.finished), 1)


def cut_ids(tokenizer, row: list[int], fmt: str = "raw") -> tuple[list[int], bool]:
    """(response ids, finished) for one row of sampled tokens.

    The row is read up to its first end token (EOS, or the chat template's end-of-turn; kept: it
    was sampled). Raw only: if its text contains the stop string, the ids are cut before the first
    token whose text reaches into it; when the stop starts inside a token, that whole token goes
    (so the ids decode exactly to the response text, which may then lack the few characters that
    shared the token with the stop)."""
    eos = formats.end_of_turn_id(tokenizer, fmt)
    row = row[: row.index(eos) + 1] if eos in row else row
    if fmt != "raw":  # a chat turn ends only at its end-of-turn token
        return row, bool(row) and row[-1] == eos
    text = tokenizer.decode(row, skip_special_tokens=True)
    at = text.find(STOP)
    if at < 0:
        return row, bool(row) and row[-1] == eos
    keep = len(row)
    while keep > 0 and len(tokenizer.decode(row[:keep], skip_special_tokens=True)) > at:
        keep -= 1
    return row[:keep], True


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, seed: int = 0, batch_size: int = 64, max_len: int = 256,
           greedy: bool = False, before_batch: Optional[Callable[[], None]] = None,
           after_batch: Optional[Callable[[int, int], None]] = None, fmt: str = "raw") -> SampleBatch:
    """n samples per prompt. Prompts (rendered for ``fmt``, see ``alignbench.formats``) keep
    ``prompt_window(ids, max_len, max_new_tokens)``.

    ``before_batch()`` runs before each batch of ``batch_size`` samples (a budget check may raise
    there) and ``after_batch(prompt_tokens, generated_tokens)`` after it (to charge it): a charged
    caller's costs then grow batch by batch, with the same random stream as one uncharged call."""
    model.eval()
    device = next(model.parameters()).device
    expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = SampleBatch([], [], [], 0, temperature=temperature)
    stop_ids = tokenizer(STOP, add_special_tokens=False)["input_ids"] if fmt == "raw" else []
    end_id = formats.end_of_turn_id(tokenizer, fmt)
    windows = [prompt_window(formats.prompt_ids(tokenizer, p, fmt), max_len, max_new_tokens) for p in prompts]
    for start in range(0, len(expanded), batch_size):
        if before_batch is not None:
            before_batch()
        chunk = expanded[start:start + batch_size]
        ids = [windows[i] for i, _ in chunk]
        batch_prompt, batch_gen = sum(map(len, ids)), out.n_tokens
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for r, seq in enumerate(ids):  # left padding: every row's last prompt token is aligned
            input_ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attn[r, width - len(seq):] = 1
        new = _decode_loop(model, input_ids.to(device), attn.to(device), max_new_tokens, temperature,
                           end_id, gen, greedy, stop_ids)
        for (i, p), row in zip(chunk, new):
            resp, finished = cut_ids(tokenizer, row, fmt)
            out.n_tokens += len(row)
            out.prompts.append(p)
            out.responses.append(tokenizer.decode(resp, skip_special_tokens=True))
            out.prompt_index.append(i)
            out.prompt_ids.append(windows[i])
            out.response_ids.append(resp)
            out.finished.append(finished)
        if after_batch is not None:
            after_batch(batch_prompt, out.n_tokens - batch_gen)
    return out


def _decode_loop(model, input_ids, attn, max_new, temperature, eos_id, gen, greedy, stop_ids) -> list[list[int]]:
    """Token-by-token sampling with the model's KV cache; rows that hit EOS stop early. Returns
    each row's sampled tokens only (not the filler of rows that had already ended).

    Written out (rather than `generate()`) so the random stream is ours and seeded per call, and
    so the loop stops as soon as every row has ended (EOS, or the tokens of a new Human turn)."""
    batch = input_ids.shape[0]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache, logits = getattr(out, CACHE_KW), out.logits[:, -1]
    done = torch.zeros(batch, dtype=torch.bool)
    lengths = torch.zeros(batch, dtype=torch.long)  # tokens sampled per row (until it ended)
    tokens: list[torch.Tensor] = []
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new):
        if greedy:
            nxt = logits.argmax(-1).cpu()
        else:
            probs = torch.softmax(logits.float().cpu() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        lengths += (~done).long()
        tokens.append(nxt)
        done |= nxt == eos_id
        if stop_ids and len(tokens) >= len(stop_ids):
            tail = torch.stack(tokens[-len(stop_ids):], 1)
            done |= (tail == torch.tensor(stop_ids)).all(1)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=attn.device)], 1)
        out = model(input_ids=nxt[:, None].to(attn.device), attention_mask=attn, position_ids=next_pos,
                    use_cache=True, **{CACHE_KW: cache})
        cache, logits, next_pos = getattr(out, CACHE_KW), out.logits[:, -1], next_pos + 1
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(batch)]
    return [row[:k] for row, k in zip(rows, lengths.tolist())]
