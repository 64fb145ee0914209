"""The sampler as it was before issue 11 (alignbench.sampling at commit d1e29ee), kept verbatim as
the reference the new one is compared with (tests/test_sampler.py): softmax and multinomial on the
CPU with a CPU generator, finished rows kept in the batch until the last one ends, prompts
left-padded in the caller's order, logits at every prompt position. Only ``sample`` was renamed
(``reference_sample``) and its imports made explicit; the body is unchanged."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from alignbench import formats
from alignbench.sampling import CACHE_KW, STOP, SampleBatch, cut_ids
from alignbench.encoding import prompt_window


@torch.no_grad()
def reference_sample(model, tokenizer, prompts: list[str], *, n: int = 1, max_new_tokens: int = 32,
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
            out.stop_ids.append(row[len(resp):])
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
