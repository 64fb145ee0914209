"""Who sees what: no comparison of the judge's half reaches a method (real HH), evaluation prompts
are a seeded sample stratified by subset, and ``eval.split`` picks the split they come from."""
import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.data import PreferencePair, load_data
from alignbench.data.splits import conversation_key
from alignbench.run_evaluation import build_context
from alignbench.stages import distill, preference
from alignbench.stages.graph import build_shared_stages
from tests.conftest import TINY, shared_data

HH_SUBSETS = {"harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"}


def digest(*texts: str) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def consumed_hashes(pairs) -> set[str]:
    """Every pair and every labelled transcript (prompt + response) a consumer could read."""
    return ({digest(p.prompt, p.chosen, p.rejected) for p in pairs} | {digest(p.prompt + p.chosen) for p in pairs}
            | {digest(p.prompt + p.rejected) for p in pairs})


def assert_proportional(meta_subsets: list[str], pool: dict[str, int], n: int) -> None:
    """Each subset's count is its share of the pool's distinct prompts, rounded up or down."""
    got, total = Counter(meta_subsets), sum(pool.values())
    assert sum(got.values()) == n and set(got) <= set(pool)
    for s, c in pool.items():
        assert abs(got[s] - n * c / total) < 1, (s, got, pool)


def distinct_by_subset(pairs) -> dict[str, int]:
    first = {}
    for p in pairs:
        first.setdefault(p.prompt, p.subset)
    return dict(Counter(first.values()))


# ---------------------------------------------------------------- a tiny real-HH context, built once
@pytest.fixture(scope="module")
def real_hh(tmp_path_factory):
    """build_context on a 600-pair real-HH sample (π0 = base LM for speed), recording the
    comparisons each PM trains on. A fresh stage cache so that the PMs are really built here."""
    path = shared_data("hh-rlhf")
    root = tmp_path_factory.mktemp("real-hh")
    overrides = TINY + ["data=hh_rlhf", f"data.path={path}", "data.max_pairs=600", "stages.pi0.mode=none",
                        # quality is not the point here: a few small steps
                        "model.max_seq_len=128", "stages.base.max_steps=2", "stages.base.batch_size=16",
                        "stages.pm.max_steps=2", "stages.pm.batch_size=8",
                        f"paths.cache_dir={root / 'cache'}", f"paths.sweep_dir={root / 'sweep'}"]
    trained: dict[str, list] = {}
    real_train = preference.train_pm

    def spy(model, tok, pairs, **kw):
        trained[kw["desc"]] = list(pairs)
        return real_train(model, tok, pairs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(preference, "train_pm", spy)
        cfg = to_config(compose(overrides))
        ctx = build_context(cfg, None, root / "run")
    return {"cfg": cfg, "overrides": overrides, "ctx": ctx, "judge": trained["PM (b)"], "proxy": trained["PM (a)"],
            "data": load_data(cfg.data), "root": root}


def test_no_comparison_of_the_judge_half_reaches_a_method(real_hh):
    """DPO, RRHF (include_dataset), PPO-ptx, RS, PPO and plugins read only ctx.pairs and
    ctx.train_prompts (no method calls load_data: see test_methods_read_data_only_through_the_context)."""
    ctx, judge = real_hh["ctx"], real_hh["judge"]
    assert judge and ctx.pairs and ctx.train_prompts
    assert not consumed_hashes(ctx.pairs) & consumed_hashes(judge)
    judge_keys = {conversation_key(p.prompt) for p in judge}
    assert not {conversation_key(p.prompt) for p in ctx.pairs} & judge_keys  # not even another turn of one
    assert not set(ctx.train_prompts) & {p.prompt for p in judge}
    assert not {conversation_key(q) for q in ctx.train_prompts} & judge_keys
    # exactly the proxy PM's comparisons, and together the two halves are the whole training split
    assert consumed_hashes(ctx.pairs) == consumed_hashes(real_hh["proxy"])
    assert len(ctx.pairs) + len(judge) == len(real_hh["data"].train)
    assert 0.35 < len(judge) / len(real_hh["data"].train) < 0.65


def test_methods_read_data_only_through_the_context():
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "methods").glob("*.py"), *(root / "tests" / "plugin_example").rglob("*.py")]:
        text = path.read_text()
        assert "load_data" not in text and "data.train" not in text, path


def test_preferred_ft_pi0_fits_only_the_proxy_half(real_hh, monkeypatch):
    seen = []
    real_encode = distill.encode_chosen

    def spy(tok, pairs, max_len, **kw):
        seen.extend(p.prompt + p.chosen for p in pairs)
        return real_encode(tok, pairs, max_len, **kw)

    monkeypatch.setattr(distill, "encode_chosen", spy)
    cfg = to_config(compose(real_hh["overrides"] + ["stages.pi0.mode=preferred_ft", "stages.pi0.max_steps=1",
                                                       "stages.pi0.batch_size=8"]))
    art = distill.build_pi0(cfg, build_shared_stages(real_hh["cfg"]).base)
    assert not art.reused and seen
    judge = real_hh["judge"]
    assert not {digest(t) for t in seen} & {digest(p.prompt + r) for p in judge for r in (p.chosen, p.rejected)}
    assert {digest(t) for t in seen} == {digest(p.prompt + p.chosen) for p in real_hh["ctx"].pairs}


def test_pm_pretraining_drops_comparisons_from_the_rest_of_the_data(real_hh, monkeypatch, tmp_path):
    """PMP on a folder holding the very files the data came from: every PMP pair whose conversation
    is in the judge's half or the eval/test splits is dropped, and the drop is counted."""
    hh = shared_data("hh-rlhf")
    for subset in HH_SUBSETS:  # a PMP folder in the Hub layout made of the same test files
        (tmp_path / subset).mkdir()
        for split in ("train", "test"):
            os.symlink(hh / subset / "test.jsonl.gz", tmp_path / subset / f"{split}.jsonl.gz")
    trained: dict[str, list] = {}

    def spy(model, tok, pairs, **kw):  # record; training is not the point
        trained[kw["desc"]] = list(pairs)
        return {"pairs": len(pairs)}

    monkeypatch.setattr(preference, "train_pm", spy)
    cfg = to_config(compose(real_hh["overrides"] + [f"stages.pm.pmp_path={tmp_path}"]))
    art = preference.build_pm(cfg, build_shared_stages(real_hh["cfg"]).base, "a")
    pmp, data = trained["PM pretraining"], real_hh["data"]
    forbidden = {conversation_key(p.prompt) for p in [*real_hh["judge"], *data.eval, *data.test]}
    assert pmp and not {conversation_key(p.prompt) for p in pmp} & forbidden
    dropped = art.record["data_counts"]["pmp_dropped_shared_conversation"]
    assert dropped >= 2 * len(real_hh["judge"]) and art.record["data_counts"]["pmp_pairs"] == len(pmp)
    assert trained["PM (a)"] == real_hh["proxy"]


def test_real_hh_eval_prompts_cover_every_subset_in_proportion(real_hh):
    ctx, data = real_hh["ctx"], real_hh["data"]
    subset_of = {p.prompt: p.subset for p in reversed(data.test)}  # first occurrence wins
    n = real_hh["cfg"].eval.n_prompts
    assert len(ctx.eval_prompts) == len(set(ctx.eval_prompts)) == n
    subsets = [subset_of[q] for q in ctx.eval_prompts]
    assert set(subsets) == HH_SUBSETS
    assert_proportional(subsets, distinct_by_subset(data.test), n)
    assert [m["subset"] for m in ctx.eval_meta] == subsets
    turns = {p.prompt: p.n_turns for p in data.test}
    assert [m["n_turns"] for m in ctx.eval_meta] == [turns[q] for q in ctx.eval_prompts]


# ---------------------------------------------------------------- pure functions
def test_pm_halves_keep_conversations_together_and_are_seeded():
    from alignbench.data.splits import pm_half
    first = [PreferencePair(f"\n\nHuman: q{i}\n\nAssistant:", " a", " b", "s", 1) for i in range(2000)]
    deeper = [PreferencePair(p.prompt + " a\n\nHuman: more?\n\nAssistant:", " c", " d", "s", 2) for p in first]
    pairs = first + deeper
    a, b = pm_half(pairs, "a", 0), pm_half(pairs, "b", 0)
    assert len(a) + len(b) == len(pairs) and abs(len(a) / len(pairs) - 0.5) < 0.05
    assert not {conversation_key(p.prompt) for p in a} & {conversation_key(p.prompt) for p in b}
    assert pm_half(pairs, "a", 0) == a and pm_half(pairs, "a", 1) != a and pm_half(pairs, "all", 0) == pairs
    with pytest.raises(ValueError, match="part"):
        pm_half(pairs, "c", 0)
    # iterated RLHF on real HH: half "a" split again into its PM's start (a1) and its annotator (a2)
    a1, a2 = pm_half(pairs, "a1", 0), pm_half(pairs, "a2", 0)
    assert sorted(map(id, a1 + a2)) == sorted(map(id, a)) and abs(len(a1) / len(a) - 0.5) < 0.07
    assert not {conversation_key(p.prompt) for p in a1} & {conversation_key(p.prompt) for p in a2}


def test_stratified_sample_is_proportional_seeded_and_order_free():
    from alignbench.config import DataConfig
    from alignbench.data.splits import prompt_mix, stratified_sample
    test = load_data(DataConfig()).test  # hh_synth
    prompts, meta = stratified_sample(test, 40, seed=0)
    assert len(set(prompts)) == 40
    assert_proportional([m["subset"] for m in meta], distinct_by_subset(test), 40)
    shuffled = list(test)
    random.Random(1).shuffle(shuffled)
    assert stratified_sample(shuffled, 40, seed=0) == (prompts, meta)
    assert set(stratified_sample(test, 40, seed=1)[0]) != set(prompts)
    everything, _ = stratified_sample(test, 10**6, seed=0)
    assert sorted(everything) == sorted({p.prompt for p in test})
    mix = prompt_mix(meta, "test")
    assert mix["n"] == 40 and sum(mix["by_subset"].values()) == sum(mix["by_turns"].values()) == 40
    # largest remainder: 3 groups of 1/3 each and n = 2 -> no group gets 2
    groups = [PreferencePair(f"\n\nHuman: {s}{i}\n\nAssistant:", " a", " b", s, 1) for s in "xyz" for i in range(5)]
    assert sorted(Counter(m["subset"] for m in stratified_sample(groups, 2, 0)[1]).values()) == [1, 1]


def test_stratified_sample_on_real_hh_covers_every_subset():
    from alignbench.config import DataConfig
    from alignbench.data.splits import stratified_sample
    data = load_data(DataConfig(name="hh_rlhf", path=str(shared_data("hh-rlhf")), bad_rows="skip"))
    _, meta = stratified_sample(data.test, 128, seed=0)
    assert_proportional([m["subset"] for m in meta], distinct_by_subset(data.test), 128)
    assert {m["n_turns"] for m in meta} >= {1, 2, 3, 4}


# ---------------------------------------------------------------- eval.split
@pytest.mark.parametrize("split,other", [("eval", "test"), ("test", "eval")])
def test_eval_split_draws_prompts_from_that_split_only(split, other):
    from alignbench.stages.access import eval_prompts
    cfg = to_config(compose(TINY + [f"eval.split={split}", "eval.n_prompts=64"]))
    data = load_data(cfg.data)
    prompts, meta = eval_prompts(cfg, data)
    assert len(prompts) == 64 == len(meta)
    assert set(prompts) <= {p.prompt for p in data.splits[split]}
    assert not set(prompts) & {p.prompt for p in data.splits[other]}


def test_eval_split_default_and_bad_value():
    assert to_config(compose(TINY)).eval.split == "test"
    with pytest.raises(ConfigError, match=r"^eval\.split: must be one of \['eval', 'test'\], got 'train'"):
        to_config(compose(TINY + ["eval.split=train"]))


def test_samples_and_metrics_record_each_prompts_subset_and_the_mix(real_hh):
    from alignbench.run_evaluation import final_evaluation
    from alignbench.methods import PolicyArtifact
    ctx = real_hh["ctx"]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    metrics = final_evaluation(ctx, PolicyArtifact(sampler=lambda prompts, seed: [" Sure."] * len(prompts)))
    rows = [json.loads(line) for line in (ctx.out_dir / "samples.jsonl").read_text().splitlines()]
    data = real_hh["data"]
    subset_of = {p.prompt: p.subset for p in reversed(data.test)}
    turns_of = {p.prompt: p.n_turns for p in data.test}
    assert [(r["subset"], r["n_turns"]) for r in rows] == [(subset_of[r["prompt"]], turns_of[r["prompt"]]) for r in rows]
    mix = metrics["eval_prompts"]
    assert mix["split"] == "test" and mix["n"] == len(rows) == 24
    assert mix["by_subset"] == dict(sorted(Counter(r["subset"] for r in rows).items()))
    assert sum(mix["by_turns"].values()) == 24 and mix["by_turns"]["1"] == sum(r["n_turns"] == 1 for r in rows)
    assert json.loads((ctx.out_dir / "metrics.json").read_text())["eval_prompts"] == mix
