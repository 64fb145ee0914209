"""Ghost Attention (issue 14 §3): checkable system instructions in hh_synth, the GAtt stage (its loss
mask), instruction adherence by turn, and GAtt on data without instructions failing before training."""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.data.instructions import (HELDOUT_INSTRUCTIONS, TRAIN_INSTRUCTIONS, check_instruction, follow,
                                          instruct_data_prompt, strip_instruction)
from alignbench.data.hh import parse_transcript
from alignbench.data.synth import SynthConfig, generate_hh_synth, gold_reward, parse_task
from alignbench.eval.gatt import adherence_by_turn
from alignbench.report.gatt import adherence_table, by_config, claim_paragraphs
from alignbench.models import train_tokenizer
from alignbench.runner import run_job
from alignbench.cache import data_key
from alignbench.stages.gatt import IGNORE, gatt_example, pick_reply, sampling_prompt, training_transcript
from alignbench.stages.graph import build_shared_stages

# the tiny end-to-end run on instructed data (its own base LM, π0 and PM: smaller data, one base epoch)
INSTRUCTED = ["data.synth.system_instructions=true", "data.synth.n_pairs=600", "stages.base.epochs=1",
              "stages.gatt.dialogues=24", "stages.gatt.candidates=2",
              "eval.n_prompts=12", "eval.temperatures=[]", "eval.nlp_tasks=[]", "method=context_distilled"]
UPPER, END, WORDS = "Answer in capital letters.", "End every reply with 'Be kind.'", "Answer in at most three words."


def _pairs_hash(pairs) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.chosen, p.rejected, p.subset, p.n_turns, p.source, p.meta],
                            sort_keys=True).encode())
    return h.hexdigest()


def test_check_instruction_on_hand_written_replies():
    assert check_instruction(UPPER, " IT IS 12.") and check_instruction(UPPER, "I'M SORRY, I CAN'T HELP.")
    assert check_instruction(UPPER, " 12.")  # nothing lowercase: it follows
    assert not check_instruction(UPPER, " It is 12.") and not check_instruction(UPPER, "  ")
    assert check_instruction(END, " Ana lives in Pella. Be kind.") and check_instruction(END, "12. Be kind.  ")
    assert not check_instruction(END, " Be kind. Ana lives in Pella.") and not check_instruction(END, " be kind.")
    assert check_instruction(WORDS, " It is 12.") and check_instruction(WORDS, " 12.")
    assert not check_instruction(WORDS, " The answer is 12.") and not check_instruction(WORDS, "  ")
    # a reply running on into a new turn is judged before the tag, like the gold reward
    assert check_instruction(WORDS, " It is 12.\n\nHuman: what now and then")
    held = {i.text: i for i in HELDOUT_INSTRUCTIONS}
    assert check_instruction("Use no more than six words.", " one two three four five six")
    assert not check_instruction("Use no more than four words.", " one two three four five")
    assert check_instruction("Finish each answer with 'Always ask.'", " 7. Always ask.")
    assert check_instruction("Write every answer in uppercase.", " LAMP.") and len(held) == 5
    with pytest.raises(ValueError, match="unknown system instruction"):
        check_instruction("Speak like a pirate.", " Arr.")


def test_follow_makes_a_reply_pass_and_train_heldout_disjoint():
    for inst in TRAIN_INSTRUCTIONS + HELDOUT_INSTRUCTIONS:
        for reply in (" I'm sorry, I can't help with that.", " 12.", " The word reversed is pmal."):
            assert check_instruction(inst.text, follow(inst.text, reply)), (inst.text, reply)
    train, held = {i.text for i in TRAIN_INSTRUCTIONS}, {i.text for i in HELDOUT_INSTRUCTIONS}
    assert not train & held and len(train) == len(TRAIN_INSTRUCTIONS) and len(held) == len(HELDOUT_INSTRUCTIONS)
    # held-out differs in substance too: other sign-offs and other word limits, not only phrasing
    ends = lambda s: {i.ending for i in s if i.kind == "end"}  # noqa: E731
    limits = lambda s: {i.max_words for i in s if i.kind == "max_words"}  # noqa: E731
    assert not ends(TRAIN_INSTRUCTIONS) & ends(HELDOUT_INSTRUCTIONS)
    assert not limits(TRAIN_INSTRUCTIONS) & limits(HELDOUT_INSTRUCTIONS)


def test_default_data_bitwise_unchanged_and_keys_unchanged(tiny_config):
    # hashes of the first 200 pairs (and rankings) produced by main before system instructions existed
    assert _pairs_hash(generate_hh_synth(SynthConfig(n_pairs=200))) == \
        "8cb3ce3c1bfd8363f799527118cc7b7a003f3ab1b577b8a2ac9ca9bf9911d2e2"
    assert _pairs_hash(generate_hh_synth(SynthConfig(n_pairs=200, rank_k=4))) == \
        "1f7cd41bbe84cf71c3c5423b22a1a10c38114fff03852d8613422d2c4138099e"
    assert "system_instructions" not in data_key(tiny_config)["synth"]
    on = to_config(compose([f"paths.cache_dir={tiny_config.paths.cache_dir}", "data.synth.system_instructions=true"]))
    assert data_key(on)["synth"]["system_instructions"] is True  # instructed data: new stages


def test_instructed_data_first_reply_follows_later_ones_ignore_gold_unchanged():
    plain = generate_hh_synth(SynthConfig(n_pairs=300))
    inst = generate_hh_synth(SynthConfig(n_pairs=300, system_instructions=True))
    changed = [(a, b) for a, b in zip(plain, inst) if a.prompt != b.prompt]
    multi = sum(p.n_turns >= 2 for p in plain)
    assert 0.3 * multi < len(changed) < 0.7 * multi  # INSTRUCTED_SHARE = 0.5 of the multi-turn dialogues
    for a, b in changed:
        text = b.meta["instruction"]
        assert a.n_turns >= 2 and (b.chosen, b.rejected) == (a.chosen, a.rejected)
        first_a, first_b = parse_transcript(a.prompt, "a")[0][1], parse_transcript(b.prompt, "b")[0][1]
        assert strip_instruction(first_b) == (text, first_a)
        assert parse_task(b.prompt) == parse_task(a.prompt)
        assert gold_reward(b.prompt, b.chosen) == b.meta["gold_chosen"] == a.meta["gold_chosen"]
        first_reply = b.prompt.split("\n\nAssistant:")[1].split("\n\nHuman:")[0]
        assert check_instruction(text, first_reply)
    # the later replies are the data's own, unchanged
    a, b = changed[0]
    assert a.prompt.split("\n\nHuman:")[2:] == b.prompt.split("\n\nHuman:")[2:]
    assert instruct_data_prompt("\n\nHuman: Hi\n\nAssistant:", UPPER) == f"\n\nHuman: {UPPER} Hi\n\nAssistant:"
    with pytest.raises(ValueError, match="data.synth.system_instructions"):
        SynthConfig(max_turns=1, system_instructions=True)


def test_gatt_loss_mask_on_a_hand_built_dialogue():
    corpus = [p.prompt + p.chosen for p in generate_hh_synth(SynthConfig(n_pairs=300, system_instructions=True))]
    tok = train_tokenizer(corpus, 512)  # the tiny model's tokenizer, trained like the base stage's
    users, replies = ["What is 2 plus 3?", "Now double that."], [" 5. Be kind.", " 10. Be kind."]
    prompt, response = training_transcript(END, users, replies)
    # the instruction in the first user turn only; the sampled first reply is history
    assert prompt == (f"\n\nHuman: {END} What is 2 plus 3?\n\nAssistant: 5. Be kind.\n\nHuman: Now double that."
                      "\n\nAssistant:") and response == " 10. Be kind."
    assert sampling_prompt(END, users, replies[:1]) == (f"\n\nHuman: {END} What is 2 plus 3?\n\nAssistant: 5. Be kind."
                                                        f"\n\nHuman: {END} Now double that.\n\nAssistant:")
    ids, labels = gatt_example(tok, END, users, replies, max_len=256)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_resp = len(tok(response, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert len(ids) == len(labels) == n_prompt + n_resp
    assert labels[:n_prompt] == [IGNORE] * n_prompt  # every earlier token, the instruction's included
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == response
    assert pick_reply(UPPER, ["it is 5.", "IT IS 5. ", "NO"]) == (" IT IS 5.", True)
    assert pick_reply(UPPER, ["it is 5."]) == (" it is 5.", False)


def test_adherence_by_turn_known_answer():
    per_turn = adherence_by_turn([[True, True, False], [True, False, False], [True, True, True], [False, True]])
    assert {k: sum(v) / len(v) for k, v in per_turn.items()} == {1: 0.75, 2: 0.75, 3: 1 / 3}


@pytest.mark.parametrize("extra", [["data.synth.system_instructions=false"], ["data=hh_rlhf"]])
def test_gatt_without_instructions_fails_before_training(tiny_overrides, extra, tmp_path):
    cfg = to_config(compose(tiny_overrides + extra + ["stages.pi0.gatt=true", f"paths.cache_dir={tmp_path}/c"]))
    with pytest.raises(ConfigError, match=r"^stages\.pi0\.gatt: .*system_instructions"):
        build_shared_stages(cfg)
    assert not (tmp_path / "c").exists()  # nothing built


def test_gatt_stage_and_adherence_rows_end_to_end(tiny_overrides, tmp_path):
    over = INSTRUCTED
    plain = to_config(compose(tiny_overrides + over))
    with_gatt = to_config(compose(tiny_overrides + over + ["stages.pi0.gatt=true"]))
    a, b = build_shared_stages(plain), build_shared_stages(with_gatt)
    assert b.pi0.stage == "pi0-gatt" and b.pi0.key != a.pi0.key and (b.pm.key, b.base.key) == (a.pm.key, a.base.key)
    rec = b.pi0.record["metrics"]
    assert rec["dialogues"] == 24 and 0 < rec["examples"] <= 24 * 3 and rec["steps"] >= 1
    assert set(rec["sampled_follow_rate"]) >= {"1", "2"} or set(rec["sampled_follow_rate"]) >= {1, 2}
    metrics = run_job(compose(tiny_overrides + over + ["stages.pi0.gatt=true"]), ["stages.pi0.gatt=true"])
    assert "pi0-gatt" in metrics["stages_reused"]
    rows = pd.read_csv(tmp_path / "sweep" / "runs" / metrics["run_id"] / "results.csv")
    gatt = rows[rows.evaluator == "gatt"]
    assert list(gatt.slice) == ["turn:1", "turn:2", "turn:3"] and set(gatt.metric) == {"adherence"}
    assert (gatt.n > 0).all() and (gatt.ci_low <= gatt.value).all() and (gatt.value <= gatt.ci_high).all()
    samples = [json.loads(line) for line in
               (tmp_path / "sweep" / "runs" / metrics["run_id"] / "gatt_samples.jsonl").read_text().splitlines()]
    held = {i.text for i in HELDOUT_INSTRUCTIONS}
    assert samples and all(s["instruction"] in held and len(s["replies"]) == 3 for s in samples)
    # the rows are the checks of the written replies
    turn1 = sum(check_instruction(s["instruction"], s["replies"][0]) for s in samples) / len(samples)
    assert gatt.value.iloc[0] == pytest.approx(turn1)


def test_report_section_says_what_the_intervals_show():
    rows = []
    for seed, (on3, off3) in enumerate([(0.9, 0.2), (0.8, 0.3), (0.85, 0.25)]):
        for gatt, cfg, vals in ((True, "cd_gatt", (0.95, 0.9, on3)), (False, "cd", (0.95, 0.5, off3))):
            rows += [{"config": cfg, "seed": seed, "gatt": gatt, "turn": k + 1, "value": v, "ci_low": v - 0.1,
                      "ci_high": v + 0.1, "n": 40} for k, v in enumerate(vals)]
    agg = by_config(pd.DataFrame(rows))
    turn3 = agg[(agg.turn == 3) & agg.gatt].iloc[0]
    assert turn3["mean"] == pytest.approx(0.85) and turn3["seeds"] == 3 and turn3["interval"] == "t(n=3)"
    assert turn3["lo"] < 0.85 < turn3["hi"]
    text = claim_paragraphs(agg)[0].text
    assert "turn 2: 0.90 [0.90, 0.90] vs 0.50 [0.50, 0.50], higher with GAtt" in text and "is supported here" in text
    # with GAtt turn 3's t interval (0.85 ± 0.12) reaches turn 1's 0.95; without, 0.25 ± 0.12 does not
    assert "with GAtt no drop from turn 1 is shown; without GAtt it is lower than at turn 1" in text
    assert adherence_table(agg).header[1:5] == ["GAtt", "turn 1", "turn 2", "turn 3"]
    # equal adherence with and without: the intervals overlap, so the claim is not shown
    same = pd.DataFrame([{**r, "value": 0.5} for r in rows])
    assert "not shown here" in claim_paragraphs(by_config(same))[0].text
