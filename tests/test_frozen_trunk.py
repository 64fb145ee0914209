"""The frozen trunk read once per sequence (``frozen_trunk``, ``stages.pm.trunk_cache``): a PM's
scores are those of its batch-1 trunk, gradients reach the trained top, the bottom runs once per
distinct sequence, and a trunk that is not frozen is refused."""
import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

from alignbench import freeze, frozen_trunk, packing
from alignbench.config import ConfigError, ModelConfig
from alignbench.data import load_data
from alignbench.models import tiny_lm, train_tokenizer
from alignbench.stages.preference import pm_scores, train_pm

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Human: hi there\n\nAssistant: hello, how can I help you today?"] * 8, 300)


def _pm(arch: str, tokenizer, trainable: int = 1, layers: int = 3):
    cfg = ModelConfig(arch=arch, vocab_size=300, hidden_size=32, num_layers=layers, num_heads=4,
                      intermediate_size=64, max_seq_len=64)
    config = copy.deepcopy(tiny_lm(cfg, tokenizer, seed=0).config)
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(1)
    return freeze.freeze_below(AutoModelForSequenceClassification.from_config(config), trainable).eval()


def _batch(lengths, seed: int = 0, vocab: int = 40, repeat_first: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, :n] = 1
    if repeat_first and len(lengths) > 1:
        ids[1], mask[1] = ids[0], mask[0]
    return ids, mask


def _alone(pm, ids, mask):
    """Each row scored alone, batch 1, no padding: what the kept states are computed from."""
    return torch.cat([pm_scores(pm, ids[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(mask.sum(-1).tolist())])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("packed", [True, False])
def test_scores_are_those_of_the_batch_one_trunk_and_gradients_reach_the_top(arch, packed, tokenizer):
    pm = _pm(arch, tokenizer)
    ids, mask = _batch([9, 14, 5, 12])
    with packing.use(packed):
        with torch.no_grad():
            alone, batched = _alone(pm, ids, mask), pm_scores(pm, ids, mask)
        features = frozen_trunk.TrunkFeatures(pm)
        with frozen_trunk.reading(pm, features):
            cached = pm_scores(pm, ids, mask)
            cached.sum().backward()
            again = pm_scores(pm, ids, mask)
    assert features.depth == 2 and (features.misses, features.hits) == (4, 4)
    torch.testing.assert_close(cached, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, batched, rtol=0, atol=1e-5)
    assert torch.equal(cached, again)
    top, bottom = freeze.decoder_layers(pm)[2][-1], freeze.decoder_layers(pm)[2][0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in bottom.parameters())
    assert all("forward" not in b.__dict__ for b in freeze.decoder_layers(pm)[2])  # nothing left behind


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=6), seed=st.integers(0, 1000),
       repeat=st.booleans(), packed=st.booleans())
def test_any_right_padded_batch_reads_its_kept_states(tokenizer, lengths, seed, repeat, packed):
    """Any lengths, repeated rows, packed or padded: the scores match each row alone, and the
    bottom ran once per distinct sequence."""
    pm = _PM.get(tokenizer)
    ids, mask = _batch(lengths, seed=seed, repeat_first=repeat)
    features = frozen_trunk.TrunkFeatures(pm)
    with packing.use(packed), torch.no_grad():
        alone = _alone(pm, ids, mask)
        with frozen_trunk.reading(pm, features):
            cached = pm_scores(pm, ids, mask)
    distinct = {tuple(ids[i, :n].tolist()) for i, n in enumerate(mask.sum(-1).tolist())}
    assert features.misses == len(distinct) and features.hits == len(lengths) - len(distinct)
    torch.testing.assert_close(cached, alone, rtol=0, atol=1e-5)


class _PM:
    model = None

    @classmethod
    def get(cls, tokenizer):
        if cls.model is None:
            cls.model = _pm("llama", tokenizer)
        return cls.model


def test_what_is_not_frozen_the_same_at_every_step_is_refused(tokenizer):
    pm = _pm("llama", tokenizer)
    with pytest.raises(ConfigError, match="stages.pm.trunk_cache: needs a frozen trunk"):
        frozen_trunk.TrunkFeatures(pm, depth=3)
    with pytest.raises(ConfigError, match="needs a frozen trunk"):
        frozen_trunk.TrunkFeatures(_pm("llama", tokenizer, trainable=3))  # nothing frozen
    unfrozen_embeddings = _pm("llama", tokenizer)
    freeze.decoder_layers(unfrozen_embeddings)[0].embed_tokens.requires_grad_(True)
    assert frozen_trunk.frozen_depth(unfrozen_embeddings) == 0
    dropout = _pm("gpt2", tokenizer).train()
    with pytest.raises(ConfigError, match="active dropout"):
        frozen_trunk.TrunkFeatures(dropout)
    features = frozen_trunk.TrunkFeatures(pm)
    other = copy.deepcopy(pm)
    with torch.no_grad():
        next(freeze.decoder_layers(other)[2][0].parameters()).view(-1)[0] += 1e-6
    with pytest.raises(ConfigError, match="differ from the cached ones"):
        features.bound(other)
    twin = copy.deepcopy(pm)
    assert features.bound(twin).kept is features.kept


def test_train_pm_with_the_cache_learns_as_without_it_and_shares_it_across_pms(tiny_config):
    """The same comparisons and seed: the per-step losses match the uncached run's to float
    rounding; a second PM from the same init reads every sequence from the first one's cache."""
    cfg = tiny_config
    data = load_data(cfg.data)
    tok = train_tokenizer([p.prompt + p.chosen for p in data.train[:200]], cfg.model.vocab_size)
    lm = tiny_lm(cfg.model, tok, seed=0)
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id

    def fresh():
        torch.manual_seed(3)
        pm = AutoModelForSequenceClassification.from_config(config)
        pm.base_model.load_state_dict(lm.base_model.state_dict())
        return freeze.freeze_below(pm, 1)

    comparisons = data.train[:48]
    common = dict(epochs=2, cfg=cfg, device=torch.device("cpu"), max_len=64, desc="t", log_step=None)
    sc = dataclasses.replace(cfg.stages.pm, batch_size=8, lr=1e-3)
    plain = train_pm(fresh(), tok, comparisons, settings=sc, **common)
    first = fresh()
    cached = train_pm(first, tok, comparisons, settings=dataclasses.replace(sc, trunk_cache=True), **common)
    features = frozen_trunk.TrunkFeatures(first)
    shared = train_pm(fresh(), tok, comparisons, settings=sc, features=features, **common)
    rerun = train_pm(fresh(), tok, comparisons, settings=sc, features=features, **common)
    assert cached["steps"] == plain["steps"] == 12
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=2e-4)
    assert plain["losses"][-1] < plain["losses"][0] - 0.01  # it learns, with or without the cache
    assert cached["trunk_cache"]["sequences_kept"] <= 96 and cached["trunk_cache"]["trunk_passes_saved"] >= 96
    assert shared["losses"] == rerun["losses"] == cached["losses"]  # deterministic for a seed
    assert rerun["trunk_cache"]["sequences_kept"] == shared["trunk_cache"]["sequences_kept"]
    assert "trunk_cache" not in plain


def test_a_trunk_cache_without_a_frozen_trunk_fails_before_any_stage(tiny_overrides, tmp_path):
    from alignbench.cli import compose
    from alignbench.config import to_config
    from alignbench.stages.graph import build_shared_stages
    cfg = to_config(compose([*tiny_overrides, "stages.pm.trunk_cache=true", f"paths.cache_dir={tmp_path / 'c'}"]))
    with pytest.raises(ConfigError, match="^stages.pm.trunk_cache: needs a frozen trunk to cache"):
        build_shared_stages(cfg)
    assert not (tmp_path / "c" / "stages").exists() or not any((tmp_path / "c" / "stages").glob("base-*"))
