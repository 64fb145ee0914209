"""The sampler of issue 11 §2 against the one it replaced (tests/reference_sampler.py): same
distribution, greedy identical, deterministic per seed, rows in the caller's order, the same
token accounting; and the work it no longer does (ended rows, prompt logits)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from alignbench import sampling
from alignbench.models import train_tokenizer
from alignbench.sampling import CACHE_KW, STOP, sample
from alignbench.encoding import prompt_window
from tests.reference_sampler import reference_sample

CORPUS = ["\n\nHuman: how do I bake bread? \n\nAssistant: Mix flour, water and yeast, then wait.",
          "\n\nHuman: thanks!\n\nAssistant: You are welcome. Anything else?"] * 20
# windows of 4 lengths, so batches are padded and sorting reorders them
PROMPTS = ["\n\nHuman: " + "how do I bake bread? " * k + "\n\nAssistant:" for k in (6, 1, 3)] + \
          ["\n\nHuman: thanks!\n\nAssistant:"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def lm(tok):
    return peaked_lm(tok)


def peaked_lm(tok):
    """A random tiny Llama whose next-token laws are peaked (logit std ~2: a few tokens carry most
    mass, so frequencies are informative) and that ends a response now and then (EOS bias)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[tok.eos_token_id] = 0.0
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
        model.lm_head.bias[tok.eos_token_id] = 5.0
    return model


def _chi2_pvalue(a: Counter, b: Counter, min_count: int = 10) -> float:
    """Two-sample chi-square test of homogeneity: P(stat >= observed) when both samples come from one
    law. Categories with fewer than ``min_count`` pooled observations are merged (the chi-square
    approximation needs expected counts of ~5 or more); stat = Σ_c Σ_s (n_sc − E_sc)² / E_sc with
    E_sc = N_s · (n_ac + n_bc) / (N_a + N_b), on (categories − 1) degrees of freedom."""
    pooled = a + b
    keys = [k for k in pooled if pooled[k] >= min_count]
    rest = [k for k in pooled if pooled[k] < min_count]
    obs = torch.tensor([[float(s[k]) for k in keys] + [float(sum(s[k] for k in rest))] for s in (a, b)],
                       dtype=torch.float64)
    obs = obs[:, obs.sum(0) > 0]
    expected = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    stat = ((obs - expected) ** 2 / expected).sum()
    dof = obs.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _features(batch) -> dict[str, Counter]:
    """The law's marginals compared: first and second token (-1: the response had ended), length."""
    rows = batch.response_ids
    return {"token 0": Counter(r[0] if r else -1 for r in rows),
            "token 1": Counter(r[1] if len(r) > 1 else -1 for r in rows),
            "length": Counter(map(len, rows))}


# 3 features, family-wise level 1e-3 (Bonferroni). Deterministic seeds: the test gives the same verdict
# on every run; the level says how unlikely a wrongful failure was when the seeds were chosen.
ALPHA = 1e-3 / 3
KW = dict(n=200, max_new_tokens=6, batch_size=64)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_token_frequencies_match_the_reference_sampler(tok, lm, kv_cache):
    old = reference_sample(lm, tok, PROMPTS, seed=1, **KW)
    new = sample(lm, tok, PROMPTS, seed=2, kv_cache=kv_cache, **KW)
    assert 0.1 < sum(new.finished) / len(new) < 0.9  # both ended and cut rows: row dropping is exercised
    for name, (a, b) in {k: (_features(old)[k], _features(new)[k]) for k in ("token 0", "token 1", "length")}.items():
        assert _chi2_pvalue(a, b) > ALPHA, (name, a.most_common(8), b.most_common(8))


def test_the_frequency_test_detects_another_temperature(tok, lm):
    """The test above can fail: sampling at T = 0.8 instead of 1 is rejected, with room to spare."""
    old = reference_sample(lm, tok, PROMPTS, seed=1, **KW)
    hotter = sample(lm, tok, PROMPTS, seed=2, temperature=0.8, **KW)
    assert _chi2_pvalue(_features(old)["token 0"], _features(hotter)["token 0"]) < ALPHA * 1e-3


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_greedy_is_identical_to_the_reference(tok, lm, kv_cache):
    kw = dict(n=2, max_new_tokens=10, greedy=True, batch_size=3)
    old, new = reference_sample(lm, tok, PROMPTS, **kw), sample(lm, tok, PROMPTS, kv_cache=kv_cache, **kw)
    assert new == old
    assert 0 < sum(new.finished) < len(new)  # some rows ended early, others ran to the cap


def test_same_seed_same_samples(tok, lm):
    a, b = (sample(lm, tok, PROMPTS, n=8, max_new_tokens=8, seed=5, batch_size=5) for _ in range(2))
    assert a == b
    assert sample(lm, tok, PROMPTS, n=8, max_new_tokens=8, seed=6, batch_size=5).response_ids != a.response_ids


def test_rows_come_back_in_the_callers_order(tok, lm):
    """Row i is the i-th prompt of the expanded list, whatever order the batches were drawn in: each
    row's greedy response is the one its prompt gets alone; the budget hooks run per batch."""
    seen: list[tuple] = []
    out = sample(lm, tok, PROMPTS, n=2, max_new_tokens=10, greedy=True, batch_size=3,
                 before_batch=lambda: seen.append(("before",)),
                 after_batch=lambda p, g: seen.append(("after", p, g)))
    assert out.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3] and out.prompts == [p for p in PROMPTS for _ in range(2)]
    for i, p in enumerate(out.prompts):
        assert out.prompt_ids[i] == prompt_window(tok(p, add_special_tokens=False)["input_ids"], 256, 10)
        alone = sample(lm, tok, [p], max_new_tokens=10, greedy=True)
        assert out.response_ids[i] == alone.response_ids[0] and out.finished[i] == alone.finished[0]
    assert [s[0] for s in seen] == ["before", "after"] * 3  # 8 rows in batches of 3
    assert sum(s[1] for s in seen[1::2]) == out.n_prompt_tokens and sum(s[2] for s in seen[1::2]) == out.n_tokens


class LastToken(DynamicCache):
    """ScriptedLM's cache: each row's previous token (rows dropped like a KV cache's)."""

    def __init__(self):
        super().__init__()
        self.prev = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.prev = self.prev[indices]


class ScriptedLM(torch.nn.Module):
    """A model whose next token is a fixed function of the last two (``after_two``), else of the last
    one (``after_one``), else the last one repeated: greedy decoding then goes through the stop
    string, EOS or the length cap at will. Logits at the last position only (all the sampler reads)."""

    def __init__(self, vocab: int, after_one: dict[int, int], after_two: dict[tuple[int, int], int]):
        super().__init__()
        self.vocab, self.after_one, self.after_two = vocab, after_one, after_two
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device to sample on

    def forward(self, input_ids, **kw):
        cache = LastToken() if kw.get(CACHE_KW) is None else kw[CACHE_KW]  # (an empty cache is falsy)
        prev = input_ids[:, -2] if input_ids.shape[1] > 1 else cache.prev
        logits = torch.zeros(len(input_ids), 1, self.vocab)
        for r, (p, t) in enumerate(zip(prev.tolist(), input_ids[:, -1].tolist())):
            logits[r, 0, self.after_two.get((p, t), self.after_one.get(t, t))] = 1.0
        cache.prev = input_ids[:, -1]
        return CausalLMOutputWithPast(logits=logits, **{CACHE_KW: cache})


def test_stop_string_eos_and_cap_are_counted_as_before(tok):
    """Greedy through a scripted model: one prompt runs into "\\n\\nHuman:" (cut off, finished, its
    tokens counted in n_tokens), one into EOS (kept), one to the cap (unfinished)."""
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    stop, eos = ids(STOP), tok.eos_token_id
    a, b, c, d = (ids(" " + w)[-1] for w in ("bake", "bread", "flour", "yeast"))
    assert len({a, b, c, d, eos}) == 5 and not {a, b, c, d, eos} & set(stop)
    before = [b] + stop
    model = ScriptedLM(len(tok), {a: b, b: stop[0], c: eos},
                       {(before[i - 1], before[i]): stop[i] for i in range(1, len(stop))})
    prompts = ["Please bake", "You need flour", "Mix yeast"]
    kw = dict(max_new_tokens=12, greedy=True)
    old, new = reference_sample(model, tok, prompts, **kw), sample(model, tok, prompts, **kw)
    assert new == old
    assert new.response_ids == [[b], [eos], [d] * 12] and new.finished == [True, True, False]
    assert new.n_tokens == (1 + len(stop)) + 1 + 12  # the stop string's tokens were sampled: counted


def test_ended_rows_leave_the_batch_and_the_prefill_keeps_one_position(tok, lm):
    widths: list[tuple[int, int]] = []
    hook = lm.lm_head.register_forward_hook(lambda mod, inp, out: widths.append(tuple(out.shape[:2])))
    try:
        out = sample(lm, tok, PROMPTS, n=6, max_new_tokens=12, seed=0)
    finally:
        hook.remove()
    k = len(PROMPTS)  # the 6 samples of a prompt share its one prefill
    prefill, decode = widths[:k], widths[k:]
    assert prefill == [(1, 1)] * k  # on CPU each prompt alone (no padding), logits at its last position only
    sizes = [b for b, t in decode]
    assert all(t == 1 for _, t in decode) and sizes == sorted(sizes, reverse=True) and sizes[-1] < 24
    # each forward gives the logits of exactly the rows that sample a token next (none after the last):
    # every row's first token from its prompt's prefill, the rest from the decode steps
    assert 6 * k + sum(sizes) == out.n_tokens and len(decode) <= 11


def test_prompts_prefilled_alone_give_the_padded_batch_cache(tok, lm):
    from alignbench.sampling import left_pad, _prefill_rows
    windows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    input_ids, attn = left_pad(windows, tok.pad_token_id)
    with torch.no_grad():
        padded = lm(input_ids=input_ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
        cache, logits = _prefill_rows(lm, input_ids, attn)
    assert torch.allclose(logits, padded.logits[:, -1], atol=1e-4)
    for mine, theirs in zip(cache.layers, getattr(padded, CACHE_KW).layers):
        real = attn.bool()[:, None, :, None].expand_as(theirs.keys)
        assert torch.allclose(mine.keys[real], theirs.keys[real], atol=1e-5)
        assert torch.allclose(mine.values[real], theirs.values[real], atol=1e-5)
        assert not mine.keys[~real].any()  # padding: zeros, masked


@pytest.mark.parametrize("n", [2, 5])
def test_n_samples_of_a_prompt_prefill_it_once_with_the_very_cache_of_prefilling_each(tok, lm, n, monkeypatch):
    """Best-of-n's rows of one prompt are adjacent: the prompt runs once and its rows copy its keys,
    values and logits, bitwise those of running it again; the samples are those of a prefill that
    runs every row (the repeat check switched off)."""
    from alignbench.sampling import left_pad, _prefill_rows
    prompts = PROMPTS[:3]
    calls = []
    hook = lm.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            windows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(n)]
            input_ids, attn = left_pad(windows, tok.pad_token_id)
            cache, logits = _prefill_rows(lm, input_ids, attn)
            assert len(calls) == len(prompts)  # once per distinct prompt, not once per row
            for i in range(len(prompts)):  # every row of prompt i: bitwise the one row prefilled alone
                one_ids, one_attn = input_ids[i * n:i * n + 1], attn[i * n:i * n + 1]
                alone, alone_logits = _prefill_rows(lm, one_ids, one_attn)
                for row in range(i * n, (i + 1) * n):
                    assert torch.equal(logits[row], alone_logits[0])
                    for mine, theirs in zip(cache.layers, alone.layers):
                        assert torch.equal(mine.keys[row], theirs.keys[0]) and torch.equal(mine.values[row],
                                                                                         theirs.values[0])
    finally:
        hook.remove()
    once = sample(lm, tok, prompts, n=n, max_new_tokens=6, seed=3)
    monkeypatch.setattr(torch, "equal", lambda a, b: False)  # every row prefilled on its own, as before
    assert sample(lm, tok, prompts, n=n, max_new_tokens=6, seed=3) == once


def test_bad_kv_cache_is_rejected(tok, lm):
    with pytest.raises(ValueError, match="kv_cache"):
        sample(lm, tok, PROMPTS[:1], kv_cache="paged")


def test_train_kv_cache_reaches_the_sampler(monkeypatch):
    """train.kv_cache is validated with the config and every RunContext sample (training, eval,
    measurement: all go through ``_sample``) passes it on."""
    from types import SimpleNamespace

    import alignbench.context as context
    from alignbench.cli import compose
    from alignbench.config import ConfigError, to_config
    from alignbench.sampling import KV_CACHES

    with pytest.raises(ConfigError, match=r"train.kv_cache: must be one of \['dynamic', 'static'\]"):
        to_config(compose(["train.kv_cache=paged"]))
    assert to_config(compose([])).train.kv_cache == "dynamic"
    for kv_cache in KV_CACHES:
        cfg = to_config(compose([f"train.kv_cache={kv_cache}"]))
        seen = {}
        monkeypatch.setattr(context, "sample", lambda *a, **kw: seen.update(kw))
        ctx = SimpleNamespace(cfg=cfg, tokenizer=None, seed=0, max_len=64, fmt="raw")
        context.RunContext._sample(ctx, None, ["hi"])
        assert seen["kv_cache"] == kv_cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"])
def test_every_architecture_samples_greedily_as_before(tok, arch):
    """The per-prompt prefill's merged cache, row dropping and the static cache on each tiny family."""
    from alignbench.cli import compose
    from alignbench.config import to_config
    from alignbench.models import tiny_lm
    from tests.conftest import TINY

    model = tiny_lm(to_config(compose(TINY + [f"model.arch={arch}", "model.vocab_size=300"])).model, tok, 0).eval()
    kw = dict(n=2, max_new_tokens=8, greedy=True, batch_size=3, max_len=128)
    old = reference_sample(model, tok, PROMPTS, **kw)
    for kv_cache in ("dynamic", "static"):
        assert sample(model, tok, PROMPTS, kv_cache=kv_cache, **kw) == old, kv_cache


_slab_prefill = sampling._prefill_rows


def _concatenating_prefill(model, input_ids, attn, capacity=None):
    """The sampler's cache before issue 23: a plain DynamicCache, grown by torch.cat every step and
    copied by index on every row drop (the same prefill values, moved out of the slab)."""
    slab, logits = _slab_prefill(model, input_ids, attn)
    plain = DynamicCache()
    for i, layer in enumerate(slab.layers):
        plain.update(layer.keys.clone(), layer.values.clone(), i)
    return plain, logits


@pytest.mark.parametrize("kw", [dict(n=6, max_new_tokens=12, seed=5, batch_size=64),
                                dict(n=3, max_new_tokens=9, seed=2, batch_size=5, temperature=0.7)])
def test_the_slab_cache_samples_the_very_tokens_of_a_concatenating_cache(tok, lm, monkeypatch, kw):
    """Bitwise, not in law: same seed, same ids, rows ending at many different steps (each end
    compacts the batch), as the DynamicCache the sampler used before the in-place cache."""
    seen = []
    hook = lm.register_forward_hook(lambda mod, inp, out: seen.append(type(getattr(out, CACHE_KW).layers[0])))
    try:
        new = sample(lm, tok, PROMPTS, **kw)
    finally:
        hook.remove()
    # each prompt prefilled alone (its own DynamicCache), once per batch it has rows in; every decode
    # step on the slab
    assert Counter(seen).keys() == {DynamicLayer, sampling.SlabLayer}
    assert len(PROMPTS) <= Counter(seen)[DynamicLayer] < len(PROMPTS) * kw["n"]
    monkeypatch.setattr(sampling, "_prefill_rows", _concatenating_prefill)
    old = sample(lm, tok, PROMPTS, **kw)
    assert new == old
    lengths = {len(r) for r in new.response_ids}
    assert len(lengths) >= 4 and any(new.finished) and not all(new.finished)  # rows ended at various steps


def test_slab_layer_writes_in_place_and_compacts_in_order():
    """update() writes into the preallocated buffer (no new cache tensor); batch_select_indices keeps
    the chosen rows, in order, with their filled positions; a write past the capacity fails."""
    keys = torch.arange(4 * 1 * 5 * 2, dtype=torch.float32).reshape(4, 1, 5, 2)
    layer = sampling.SlabLayer(keys.clone(), -keys.clone(), length=2)
    buf = layer.key_buf.data_ptr()
    k, v = layer.update(torch.full((4, 1, 1, 2), 100.0), torch.full((4, 1, 1, 2), -100.0))
    assert k.shape == (4, 1, 3, 2) and k.data_ptr() == buf and layer.get_seq_length() == 3
    assert torch.equal(k[:, :, :2], keys[:, :, :2]) and (k[:, :, 2] == 100).all() and (v[:, :, 2] == -100).all()
    expected = k[[1, 3]].clone()
    layer.batch_select_indices(torch.tensor([1, 3]))
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    assert layer.key_buf.data_ptr() == buf
    layer.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))  # fills the capacity of 5
    with pytest.raises(ValueError, match="capacity 5"):
        layer.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))


def test_under_bf16_autocast_each_weight_is_cast_once_per_call_with_the_same_samples(tok, lm, monkeypatch):
    """train.precision=bf16 wraps every forward in its own autocast region; the sampler keeps the
    weight-cast cache alive for the whole call: the head's weight is cast once, not once per
    forward (prefills and decode steps), and the samples are those of the per-forward casts."""
    import contextlib
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from alignbench.distributed import autocast_forward

    class HeadCasts(TorchDispatchMode):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.casts, self.forwards = weight, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            src = args[0] if args else None
            if func is torch.ops.aten._to_copy.default and isinstance(src, torch.Tensor) \
                    and src.shape == self.weight.shape and (kwargs or {}).get("dtype") == torch.bfloat16:
                self.casts += 1
            return func(*args, **(kwargs or {}))

    model = autocast_forward(copy.deepcopy(lm), "bf16", torch.device("cpu"))
    kw = dict(n=3, max_new_tokens=6, seed=4)
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    with HeadCasts(model.lm_head.weight) as counter:
        cached = sample(model, tok, PROMPTS, **kw)
    assert counter.casts == 1 and len(forwards) > len(PROMPTS)  # a prefill per prompt, then decode steps
    monkeypatch.setattr(sampling, "_keep_autocast_casts", lambda device: contextlib.nullcontext())
    with HeadCasts(model.lm_head.weight) as counter:
        per_forward = sample(model, tok, PROMPTS, **kw)
    hook.remove()
    assert counter.casts == len(forwards) // 2 and per_forward == cached
