"""Batched, KV-cached sampling shared by every method and evaluator, so all policies are sampled
the same way (same temperature, length cap and stop rule) and generated tokens are counted once.

A response ends at EOS or where the model starts a new "\\n\\nHuman:" turn (cut off, not kept)
under ``data.format=raw``; at the chat template's end-of-turn token under ``chat``
(``alignbench.formats``: the prompt is rendered there too).
Seeding is per call: the same (seed, prompts) give the same samples on CPU. Tokens are drawn on
the model's device with a seeded ``torch.Generator`` of that device; the host reads only which rows
ended (to drop them from the batch) and, once per batch, the sampled ids.

What is scored downstream (log-probs, KL, PM, PPO rollouts) is what was sampled: ``SampleBatch``
carries the exact prompt window the model was conditioned on and the generated ids, so nothing is
re-tokenised and no EOS is added that the model did not sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from alignbench import formats
from alignbench.encoding import prompt_window, system_window

STOP = "\n\nHuman:"
# transformers 5.x passes the KV cache as ``cache`` (``past_key_values`` is deprecated for removal
# in 5.40); older releases (>= 4.56, still admitted by pyproject) know only ``past_key_values``.
CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# train.kv_cache: the KV cache the sampler decodes with (see _decode_loop)
KV_CACHES = ("dynamic", "static")
# On an accelerator the host reads which rows ended every this many tokens (each read waits for the
# device); in between, ended rows compute filler that is never counted. On CPU: every token.
SYNC_EVERY = 8


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
    # per row, the sampled tokens of the stop string that ended it (raw format), cut from response_ids
    # so the ids decode to the response text; [] for a row ended by EOS / end-of-turn or cut at the cap.
    # The policy sampled them: PPO credits its score to the last of them (``encode_samples(with_stop)``)
    stop_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, rows: Sequence[int]) -> "SampleBatch":
        """The given rows (e.g. best-of-n's picks), in that order; n_tokens is kept (all were sampled)."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return SampleBatch(pick(self.prompts), pick(self.responses), pick(self.prompt_index), self.n_tokens,
                           pick(self.prompt_ids), pick(self.response_ids), pick(self.finished), self.temperature,
                           pick(self.stop_ids) if self.stop_ids else [])

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
           after_batch: Optional[Callable[[int, int], None]] = None, fmt: str = "raw",
           kv_cache: str = "dynamic", system: Optional[str] = None, system_key: str = "system") -> SampleBatch:
    """n samples per prompt. Prompts (rendered for ``fmt``, see ``alignbench.formats``) keep
    ``prompt_window(ids, max_len, max_new_tokens)``. Row i of the result is the i-th of the
    prompts each repeated n times, in the caller's order.

    The samples are drawn in batches of ``batch_size`` prompt windows of similar length (sorted by
    length first, so little left padding), each batch shrinking as its rows end (``kv_cache``:
    ``dynamic``, see ``_decode_loop``; ``static`` preallocates transformers' StaticCache, for GPUs).
    ``before_batch()`` runs before each batch (a budget check may raise there) and
    ``after_batch(prompt_tokens, generated_tokens)`` after it (to charge it): a charged caller's
    costs then grow batch by batch, with the same random stream as one uncharged call. ``system``:
    a context every prompt is read with (``formats.prompt_ids``: raw, text in front; chat, a system
    message), e.g. safety context distillation's preprompt; ``prompt_ids`` then include it, whole:
    a too long dialogue loses turns from the left instead (``encoding.system_window``; a context
    that cannot fit even with the last turn alone fails naming ``system_key``)."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache: must be one of {list(KV_CACHES)}, got {kv_cache!r}")
    model.eval()
    device = next(model.parameters()).device
    expanded = [i for i in range(len(prompts)) for _ in range(n)]
    gen = torch.Generator(device=device).manual_seed(seed)
    stop_ids = tokenizer(STOP, add_special_tokens=False)["input_ids"] if fmt == "raw" else []
    end_id = formats.end_of_turn_id(tokenizer, fmt)
    windows = [prompt_window(formats.prompt_ids(tokenizer, p, fmt), max_len, max_new_tokens) if system is None
               else system_window(tokenizer, p, fmt, system, max_len=max_len, response_room=max_new_tokens, key=system_key)
               for p in prompts]
    # grouped by window length (stable: equal lengths keep the caller's order), so a batch pads little
    order = sorted(range(len(expanded)), key=lambda r: len(windows[expanded[r]]))
    rows: list[list[int]] = [[] for _ in expanded]
    with _keep_autocast_casts(device):
        _sample_batches(model, tokenizer, order=order, windows=windows, expanded=expanded, rows=rows,
                        batch_size=batch_size, before_batch=before_batch, after_batch=after_batch, device=device,
                        decode=dict(max_new=max_new_tokens, temperature=temperature, eos_id=end_id, gen=gen,
                                    greedy=greedy, stop_ids=stop_ids, kv_cache=kv_cache))
    out = SampleBatch([], [], [], sum(map(len, rows)), temperature=temperature)
    for i, row in zip(expanded, rows):
        resp, finished = cut_ids(tokenizer, row, fmt)
        out.prompts.append(prompts[i])
        out.responses.append(tokenizer.decode(resp, skip_special_tokens=True))
        out.prompt_index.append(i)
        out.prompt_ids.append(windows[i])
        out.response_ids.append(resp)
        out.stop_ids.append(row[len(resp):])  # rows end where they ended: this is the cut stop string
        out.finished.append(finished)
    return out


def _keep_autocast_casts(device: torch.device) -> torch.autocast:
    """A no-op autocast region (the caller's autocast state, unchanged) around the whole sampling
    call, so torch.autocast's weight-cast cache outlives each forward: under train.precision=bf16
    (``distributed.autocast_forward`` opens an autocast region per forward, and the cache is cleared
    when the outermost region closes) each fp32 weight is cast to bf16 once per ``sample`` call
    instead of once per prefilled prompt and per decode step. The same casts, so the same numbers;
    the bf16 copies (half the fp32 weights' size) live until the call returns. torch caches the
    casts of leaf weights that require grad only (a frozen model is cast per forward, as before)."""
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                          enabled=torch.is_autocast_enabled(device.type),
                          cache_enabled=torch.is_autocast_cache_enabled())


def _sample_batches(model, tokenizer, *, order, windows, expanded, rows, batch_size, before_batch, after_batch,
                    device, decode) -> None:
    """``sample``'s batches: each batch of ``batch_size`` rows of ``order`` decoded (``_decode_loop``
    with ``decode``) into ``rows``, with the caller's before/after hooks."""
    for start in range(0, len(order), batch_size):
        if before_batch is not None:
            before_batch()
        chunk = order[start:start + batch_size]
        ids = [windows[expanded[r]] for r in chunk]
        input_ids, attn = left_pad(ids, tokenizer.pad_token_id)
        new = _decode_loop(model, input_ids.to(device), attn.to(device), **decode)
        for r, row in zip(chunk, new):
            rows[r] = row
        if after_batch is not None:
            after_batch(sum(map(len, ids)), sum(map(len, new)))


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row's last prompt token in the last column."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    for r, seq in enumerate(ids):
        input_ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attn[r, width - len(seq):] = 1
    return input_ids, attn


def next_tokens(logits: torch.Tensor, temperature: float, gen: torch.Generator, greedy: bool = False) -> torch.Tensor:
    """One token per row of ``logits`` [B, V], drawn on their device: x ~ softmax(logits / T)
    (``torch.multinomial`` with the seeded generator ``gen``), or argmax(logits) when greedy."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _decode_loop(model, input_ids, attn, *, max_new, temperature, eos_id, gen, greedy, stop_ids,
                 kv_cache="dynamic") -> list[list[int]]:
    """Token-by-token sampling with the model's KV cache. Returns each row's sampled tokens only
    (up to and including its end; not the filler of rows that had already ended).

    Written out (rather than `generate()`) so the random stream is ours and seeded per call. The
    prefill computes logits at the last prompt position only (on CPU each prompt alone, see
    ``_prefill_rows``, into a ``SlabLayer`` cache preallocated to prompt width + max_new: each step
    writes its keys and values in place instead of concatenating a new copy of the whole cache).
    Tokens, lengths and the end test stay on the model's device; the host reads which rows ended (a
    sync) every step on CPU and every ``SYNC_EVERY`` steps on an accelerator, then drops the ended
    rows from the batch, the KV cache, the attention mask and the position ids (in order: a row's
    logits depend, in the last float bits, on which rows share its batch, so the batch is exactly
    the rows still running); the loop stops when no row is left. The attention mask is allocated
    once at its final width (each step passes a view one column wider). Under
    ``kv_cache="static"`` (a StaticCache of prompt width + max_new, fixed shapes) ended rows stay
    in the batch, their samples replaced by filler and not counted, and the loop stops when all
    have ended: shrinking would mean copying the whole preallocated cache."""
    batch, width = input_ids.shape
    device = input_ids.device
    cache = StaticCache(config=model.config, max_cache_len=width + max_new) if kv_cache == "static" else None
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    prefilled = _prefill_rows(model, input_ids, attn, capacity=width + max_new) \
        if cache is None and device.type == "cpu" else None
    if prefilled is None:
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **({CACHE_KW: cache} if cache is not None else {}))
        prefilled = getattr(out, CACHE_KW), out.logits[:, -1]
    cache, logits = prefilled
    tokens = torch.full((batch, max_new), eos_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens sampled per row (until it ended)
    alive = torch.arange(batch, device=device)  # the original row of each row still in the batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    next_pos = pos[:, -1:] + 1
    # the mask at its final width: prompt mask, then ones (step s passes columns [0, width + s + 1))
    mask = torch.cat([attn, attn.new_ones(batch, max_new)], 1)
    for step in range(max_new):
        nxt = next_tokens(logits, temperature, gen, greedy).masked_fill(done, eos_id)
        lengths[alive] += (~done).long()
        tokens[alive, step] = nxt
        done |= nxt == eos_id
        if stop is not None and step + 1 >= len(stop):
            done |= (tokens[alive, step + 1 - len(stop):step + 1] == stop).all(1)
        if step + 1 == max_new:
            break
        if (step + 1) % sync_every == 0:
            keep = (~done).nonzero().squeeze(1)  # the host sync
            if len(keep) == 0:
                break
            if kv_cache == "dynamic" and len(keep) < len(done):
                cache.batch_select_indices(keep)
                alive, done, mask, next_pos, nxt = alive[keep], done[keep], mask[keep], next_pos[keep], nxt[keep]
        out = model(input_ids=nxt[:, None], attention_mask=mask[:, :width + step + 1], position_ids=next_pos,
                    use_cache=True, **{CACHE_KW: cache})
        cache, logits, next_pos = getattr(out, CACHE_KW), out.logits[:, -1], next_pos + 1
        del out  # the step's other outputs: free before the next step allocates its own
    return [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]


class SlabLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers preallocated to ``[batch, heads,
    capacity, head_dim]``: ``update`` writes the new positions in place and ``keys``/``values``
    are views of the first ``rows`` rows and ``length`` positions, the same values (and shapes) a
    DynamicLayer would hold after its concatenations, without copying the cache each step.
    ``batch_select_indices`` moves the kept rows up in place (order kept), copying only the rows
    that move and only their ``length`` filled positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.key_buf, self.value_buf, self.rows, self.length = keys, values, keys.shape[0], length
        self.device, self.is_initialized = keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buf[:self.rows, :, :self.length]
        self.values = self.value_buf[:self.rows, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.key_buf.shape[2] or key_states.shape[0] != self.rows:
            raise ValueError(f"SlabLayer: {key_states.shape[0]} rows up to position {end} do not fit "
                             f"{self.rows} rows of capacity {self.key_buf.shape[2]}")
        self.key_buf[:self.rows, :, self.length:end] = key_states
        self.value_buf[:self.rows, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_max_length(self) -> int:
        return -1  # as a DynamicLayer: the mask is built for the filled length only

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for dst, src in enumerate(indices.tolist()):  # ascending: a row moves up, never onto one still to move
            if src != dst:
                self.key_buf[dst, :, :self.length] = self.key_buf[src, :, :self.length]
                self.value_buf[dst, :, :self.length] = self.value_buf[src, :, :self.length]
        self.rows = len(indices)
        self._views()


def _prefill_rows(model, input_ids, attn, capacity: Optional[int] = None
                  ) -> Optional[tuple[DynamicCache, torch.Tensor]]:
    """(KV cache, last-position logits) of the left-padded prompts, each prompt run alone so no
    padding is computed, and once: a row whose prompt is the previous row's (the n samples of one
    prompt are adjacent) copies that row's keys, values and logits (best-of-16 reads each prompt once,
    not 16 times; the prompt is most of a sample's arithmetic) (on CPU a padded position costs as much as a real one; real HH prompts in a
    batch of 8 are ~45% padding), its keys and values then left-padded with zeros (masked, never
    read) into one batch cache of ``SlabLayer``s with room for ``capacity`` positions (default: the
    prompt width). The same cache and logits as one padded forward, up to float rounding. None when
    the model's cache is not a plain DynamicCache of DynamicLayers (sliding windows, ...): the
    caller then runs the padded forward."""
    (batch, width), keys, values, logits = input_ids.shape, [], [], []
    capacity = max(capacity or width, width)
    last = None  # (prompt ids, row) of the last prompt run: n samples of one prompt are adjacent rows
    for r, (ids, mask) in enumerate(zip(input_ids, attn)):
        real = ids[mask.bool()]
        if last is not None and torch.equal(real, last[0]):  # the same prompt again: the same cache and logits
            for k, v in zip(keys, values):
                k[r], v[r] = k[last[1]], v[last[1]]
            logits.append(logits[-1])
            continue
        out = model(input_ids=real[None], use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_KW)
        if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        last = (real, r)
        if not keys:  # the batch cache, allocated once: each row's keys/values are copied in, left-padded
            keys = [layer.keys.new_zeros((batch, layer.keys.shape[1], capacity, layer.keys.shape[3]))
                    for layer in cache.layers]
            values = [layer.values.new_zeros((batch, layer.values.shape[1], capacity, layer.values.shape[3]))
                      for layer in cache.layers]
        n = int(mask.sum())
        for k, v, layer in zip(keys, values, cache.layers):
            k[r, :, width - n:width] = layer.keys[0]
            v[r, :, width - n:width] = layer.values[0]
        logits.append(out.logits[:, -1])
        del out, cache  # this row's own cache: copied, free it before the next row
    merged = DynamicCache()
    merged.layers = [SlabLayer(k, v, width) for k, v in zip(keys, values)]
    return merged, torch.cat(logits)
