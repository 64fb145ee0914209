"""NLP-task regressions through lm-evaluation-harness: parsers of the real sets, the synthetic HH-style
tasks, end-to-end runs of a tiny Llama through lm-eval, result rows and paired deltas."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from alignbench.eval import nlp_tasks as nt
from alignbench.eval.lm_eval_tasks import utils as tu
from alignbench.eval.stats import COLUMNS

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nlp"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"offline NLP data not found at {REAL}")

# record counts per ../shared/data/README.md, and the number of choices each doc may have
EXPECTED = {
    "arc_easy": (2376, {3, 4, 5}),
    "arc_challenge": (1172, {3, 4, 5}),
    "boolq": (3270, {2}),
    "copa": (100, {2}),
    "piqa": (1838, {2}),
    "openbookqa": (500, {4}),
    "sst2": (872, {2}),
}



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run far faster on one thread, and do not stall when other processes load the
    CPU (with 2 threads on a busy 2-core box a (16, 100) forward of a 1M-param model took 1.5 s
    instead of 0.1 s). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- parsers on the real files


@needs_real
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_parsers_counts_and_schema(name):
    n, n_choices = EXPECTED[name]
    docs = nt.local_docs(name, REAL)
    assert len(docs) == n
    assert {len(d["choices"]) for d in docs} <= n_choices
    for d in docs:
        assert set(d) == {"id", "source", "context", "choices", "label"}
        assert 0 <= d["label"] < len(d["choices"])
        assert d["context"] and all(c.strip() for c in d["choices"])
        # choices are kept verbatim (lm-eval adds the " " delimiter); only PIQA's raw text has
        # a leading space (one item, valid.jsonl:1518), exactly as in lm-eval's own piqa
        if name != "piqa":
            assert not any(c[0].isspace() for c in d["choices"])
    # the gold answers are not degenerate (all one position)
    assert len(Counter(d["label"] for d in docs)) > 1
    assert docs[0]["source"].endswith(":1") or docs[0]["source"].endswith(":2")  # header line for TSV


@needs_real
def test_real_parsers_content():
    arc = nt.local_docs("arc_easy", REAL)
    assert arc[0]["context"].startswith("Question: Which statement best explains why photosynthesis")
    assert arc[0]["context"].endswith("\nAnswer:") and arc[0]["label"] == 0
    # ARC items keyed "1".."4" are mapped like the lettered ones
    raw = [json.loads(x) for x in (REAL / "arc" / "ARC-Easy-Test.jsonl").open()]
    for r, d in zip(raw, arc):
        labels = [c["label"] for c in r["question"]["choices"]]
        assert d["choices"][d["label"]] == r["question"]["choices"][labels.index(r["answerKey"])]["text"]
    boolq = nt.local_docs("boolq", REAL)
    assert Counter(d["label"] for d in boolq) == {1: 2033, 0: 1237}  # "true"/"false" strings in the file
    assert boolq[0]["choices"] == ["no", "yes"] and boolq[0]["context"].endswith("?\nAnswer:")
    copa = nt.local_docs("copa", REAL)
    assert copa[0]["context"] == "The man turned on the faucet therefore"
    assert copa[0]["choices"] == ["the toilet filled with water.", "water flowed from the spout."]
    assert copa[0]["label"] == 1
    piqa = nt.local_docs("piqa", REAL)
    assert Counter(d["label"] for d in piqa) == {1: 928, 0: 910}
    obqa = nt.local_docs("openbookqa", REAL)
    assert obqa[0]["choices"] == ["make more phone calls", "quit eating lunch out",
                                  "buy less with monopoly money", "have lunch with friends"]
    assert obqa[0]["label"] == 1 and obqa[1]["label"] == 0
    sst2 = nt.local_docs("sst2", REAL)
    assert sst2[0]["context"].startswith("it 's a charming and often affecting journey . \nQuestion:")
    assert sst2[0]["label"] == 1 and sst2[1]["label"] == 0
    gsm = nt.local_docs("gsm8k", REAL)
    assert len(gsm) == 1319 and gsm[0]["final"] == "18"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "copa" / "val.jsonl")):
        nt.local_docs("copa", tmp_path)
    # run_nlp_tasks fails before loading any model
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "piqa")):
        nt.run_nlp_tasks(str(tmp_path / "no-model"), ["local_piqa"], limit=2, data_dir=tmp_path,
                         batch_size=1)
    with pytest.raises(KeyError, match="local_nope"):
        nt.run_nlp_tasks(str(tmp_path), ["local_nope"], 2, tmp_path, 1)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(tu.ENV_DATA_DIR, raising=False)
    assert nt.resolve_data_dir(None) == tu.REPO_ROOT.parent / "shared" / "data" / "nlp"
    monkeypatch.setenv(tu.ENV_DATA_DIR, str(tmp_path))
    assert nt.resolve_data_dir(None) == tmp_path
    assert nt.resolve_data_dir(tmp_path / "x") == tmp_path / "x"  # the argument wins


def test_malformed_rows_name_file_and_line(tmp_path):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "val.jsonl").write_text('{"premise": "A.", "choice1": "b", "choice2": "c", '
                                                 '"question": "cause", "label": 0}\n{"premise": "x"\n')
    with pytest.raises(nt.NLPDataError, match=r"val.jsonl:2"):
        nt.local_docs("copa", tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(nt.NLPDataError, match="2 labels"):
        nt.local_docs("piqa", tmp_path)


# ---------------------------------------------------------------- synthetic tasks


def test_synth_tasks_format_and_determinism():
    facts = [("What colour is the sky?", "blue", ["green", "red", "blue"]), ("Q2?", "7", ["8"])]
    docs = nt.local_docs("synth_facts", synth_facts=facts)
    assert docs == nt.local_docs("synth_facts", synth_facts=facts)
    assert docs[0]["context"] == "\n\nHuman: What colour is the sky?\n\nAssistant:"
    assert sorted(docs[0]["choices"]) == ["blue", "green", "red"]  # duplicate distractor dropped
    assert docs[0]["choices"][docs[0]["label"]] == "blue"
    arith = nt.local_docs("synth_arith")
    assert len(arith) == tu.N_ARITH_ITEMS and arith == nt.local_docs("synth_arith")
    assert len({d["context"] for d in arith}) == len(arith)
    for d in arith:
        q = d["context"].split("What is ")[1].split("?")[0]
        assert int(d["choices"][d["label"]]) == eval(q)  # noqa: S307 - "a + b" / "a - b" only
        assert len(set(d["choices"])) == 4
    assert len(Counter(d["label"] for d in arith)) == 4  # gold position is shuffled
    with pytest.raises(nt.NLPDataError, match="distractor"):
        nt.local_docs("synth_facts", synth_facts=[("q", "a", ["a"])])


def test_synth_facts_default_comes_from_world_facts():
    synth = pytest.importorskip("alignbench.data.synth")
    facts = synth.world_facts()
    docs = nt.local_docs("synth_facts")
    assert len(docs) == len(facts)
    for (q, a, _), d in zip(facts, docs):
        assert d["context"] == f"\n\nHuman: {q}\n\nAssistant:" and d["choices"][d["label"]] == a


# ---------------------------------------------------------------- tiny models through lm-eval

OBJECTS = ["apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "peach", "pear", "kiwi",
           "mango", "melon", "olive", "onion", "carrot", "tomato", "pepper", "radish", "turnip",
           "squash", "bean", "pea", "corn", "leek"]
COLOURS = ["red", "blue", "green", "yellow"]
# 24 facts, 6 per colour, so a model that always prefers one colour scores exactly chance (1/4)
FACTS = [(f"What colour is the {o}?", COLOURS[i % 4], [c for c in COLOURS if c != COLOURS[i % 4]])
         for i, o in enumerate(OBJECTS)]


def _build_tiny(out: Path, texts: list[str], hidden: int = 32, layers: int = 2, vocab: int = 320):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(ft), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=ft.bos_token_id,
                      eos_token_id=ft.eos_token_id, pad_token_id=ft.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    ft.save_pretrained(out)
    return model, ft


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(random_dir, trained_dir): one tiny Llama before and after ~100 full-batch steps on FACTS."""
    import torch

    root = tmp_path_factory.mktemp("tiny_llama")
    qa = [f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a, _ in FACTS]
    rng = random.Random(0)
    filler = [f"Question: What is {rng.randint(0, 99)} + {rng.randint(0, 99)}?\nAnswer: yes no"
              for _ in range(200)]
    model, tok = _build_tiny(root / "random", qa * 5 + filler)
    enc = tok([t + tok.eos_token for t in qa], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / "trained")
    tok.save_pretrained(root / "trained")
    return str(root / "random"), str(root / "trained")


@needs_real
def test_end_to_end_local_tasks(tiny_models):
    rnd, _ = tiny_models
    tasks = ["local_arc_easy", "local_copa", "local_sst2"]
    res = nt.run_nlp_tasks(rnd, tasks, limit=10, data_dir=str(REAL), batch_size=8, device="cpu", seed=0)
    assert set(res) == set(tasks)
    for t in tasks:
        r = res[t]
        assert r["n"] == 10 and len(r["per_item"]) == 10 and r["doc_ids"] == list(range(10))
        assert set(r["per_item"]) <= {0, 1} and 0.0 <= r["acc"] <= 1.0
        assert r["acc"] == pytest.approx(np.mean(r["per_item"]))
        assert r["acc_stderr"] >= 0 and r["metric"] == "acc"
    assert "acc_norm" in res["local_arc_easy"] and len(res["local_arc_easy"]["per_item_norm"]) == 10
    assert "acc_norm" not in res["local_copa"]
    assert res["local_copa"]["n_total"] == 100

    rows = nt.nlp_rows(res, sweep="sw", run="r1", method="dpo", seed=3)
    assert len(rows) == 4  # 3 x acc + arc's acc_norm
    for row in rows:
        assert tuple(row) == COLUMNS
        assert row["evaluator"] == "nlp_tasks" and row["n"] == 10 and row["seed"] == 3
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert {(r["slice"], r["metric"]) for r in rows} >= {("local_copa", "acc"), ("local_arc_easy", "acc_norm")}

    # deterministic: same seed and limit give the same items and scores
    again = nt.run_nlp_tasks(rnd, ["local_copa"], 10, str(REAL), 4, "cpu", 0)
    assert again["local_copa"]["per_item"] == res["local_copa"]["per_item"]


def test_seeded_subset(tiny_models):
    rnd, _ = tiny_models
    a = nt.run_nlp_tasks(rnd, ["local_synth_arith"], 12, None, 16, seed=1, subset="seeded")
    b = nt.run_nlp_tasks(rnd, ["local_synth_arith"], 12, None, 16, seed=1, subset="seeded")
    ids = a["local_synth_arith"]["doc_ids"]
    assert len(ids) == 12 and ids == sorted(ids) and ids != list(range(12))
    assert ids == b["local_synth_arith"]["doc_ids"]
    assert a["local_synth_arith"]["per_item"] == b["local_synth_arith"]["per_item"]
    assert ids == nt.seeded_subset("local_synth_arith", tu.N_ARITH_ITEMS, 12, 1)
    # a task's subset does not depend on the other tasks in the call (pairing across runs)
    c = nt.run_nlp_tasks(rnd, ["local_synth_facts", "local_synth_arith"], 12, None, 16, seed=1,
                         subset="seeded", synth_facts=FACTS)
    assert c["local_synth_arith"]["doc_ids"] == ids
    assert nt.seeded_subset("local_synth_arith", tu.N_ARITH_ITEMS, 12, 2) != ids


def test_trained_model_beats_chance_on_synth_facts(tiny_models):
    rnd, trained = tiny_models
    r0 = nt.run_nlp_tasks(rnd, ["local_synth_facts"], None, None, 32, synth_facts=FACTS)["local_synth_facts"]
    r1 = nt.run_nlp_tasks(trained, ["local_synth_facts"], None, None, 32, synth_facts=FACTS)["local_synth_facts"]
    assert r0["n"] == r1["n"] == len(FACTS)
    assert r0["acc"] <= 0.6  # chance is 0.25
    assert r1["acc"] >= 0.9
    row = nt.nlp_rows({"local_synth_facts": r1}, "sw", "r", "sft", 0)[0]
    assert row["ci_low"] > 0.25  # exact binomial interval excludes chance
    delta = nt.nlp_delta_rows({"local_synth_facts": r1}, {"local_synth_facts": r0}, "sw", "r", "sft", 0)
    assert len(delta) == 1 and delta[0]["metric"] == "acc_delta_vs_pi0"
    assert delta[0]["value"] == pytest.approx(r1["acc"] - r0["acc"]) and delta[0]["ci_low"] > 0


# ---------------------------------------------------------------- rows and deltas without a model


def test_rows_and_paired_delta():
    res = {"local_copa": {"acc": 0.6, "per_item": [1, 1, 1, 0, 0] * 4, "metric": "acc"}}
    (row,) = nt.nlp_rows(res, "s", "r", "m", 0)
    assert row["value"] == pytest.approx(0.6) and row["n"] == 20
    from scipy.stats import binomtest

    ci = binomtest(12, 20).proportion_ci(0.95, method="exact")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))

    rng = np.random.default_rng(0)
    pi0 = rng.integers(0, 2, 400).tolist()
    same = nt.nlp_delta_rows({"t": pi0}, {"t": pi0}, "s", "r", "m", 0)[0]
    assert (same["value"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    better = [1 if (x or rng.random() < 0.3) else 0 for x in pi0]
    d = nt.nlp_delta_rows({"t": better}, {"t": pi0}, "s", "r", "m", 0)[0]
    assert d["value"] == pytest.approx(np.mean(better) - np.mean(pi0))
    assert 0 < d["ci_low"] < d["value"] < d["ci_high"]
    assert d == nt.nlp_delta_rows({"t": better}, {"t": pi0}, "s", "r", "m", 0)[0]  # seeded
    with pytest.raises(ValueError, match="items"):
        nt.nlp_delta_rows({"t": [1, 0]}, {"t": [1]}, "s", "r", "m", 0)
    with pytest.raises(ValueError, match="different documents"):
        nt.nlp_delta_rows({"t": {"per_item": [1], "doc_ids": [0]}},
                          {"t": {"per_item": [1], "doc_ids": [5]}}, "s", "r", "m", 0)


def test_hub_task_names_are_registered():
    """Built-in lm-eval task names resolve next to ours (loading them needs the Hub)."""
    tm = nt.make_task_manager(include_defaults=True)
    assert {"arc_easy", "boolq", "piqa"} <= set(tm.all_tasks)
    assert set(nt.LOCAL_TASKS) <= set(tm.all_tasks)
    local_only = nt.make_task_manager(include_defaults=False)
    assert set(local_only.all_tasks) == set(nt.LOCAL_TASKS)


@needs_real
def test_gsm8k_generative_optional(tiny_models):
    rnd, _ = tiny_models
    assert "local_gsm8k" not in nt.DEFAULT_TASKS
    r = nt.run_nlp_tasks(rnd, ["local_gsm8k"], 2, str(REAL), 2)["local_gsm8k"]
    assert r["metric"] == "exact_match" and r["filter"] == "flexible-extract"
    assert r["n"] == 2 and set(r["per_item"]) <= {0, 1}
    (row,) = nt.nlp_rows({"local_gsm8k": r}, "s", "r", "m", 0)
    assert row["metric"] == "exact_match" and row["n"] == 2
