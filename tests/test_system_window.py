"""A system context (safety context distillation's preprompt) is never cut (issue 24 §1.3): a
dialogue too long for the prompt window loses whole turns from the left instead, and where even
its last turn cannot fit beside the context, a one-line ConfigError names the keys."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from alignbench import formats
from alignbench.config import ConfigError, MIN_PROMPT_TOKENS
from alignbench.encoding import prompt_window, system_window
from alignbench.formats import set_chat_template
from alignbench.models import train_tokenizer
from alignbench.sampling import sample
from alignbench.stages.prompts import safety_preprompt
from tests.test_sampler import peaked_lm

PREPROMPT = safety_preprompt("template")
WORDS = ["how", "do", "I", "bake", "bread", "kill", "a", "python", "process", "thanks", "neighbour", "7"]
CORPUS = [PREPROMPT, *("\n\nHuman: " + " ".join(WORDS[i:]) + "\n\nAssistant: " + " ".join(WORDS[:i])
                       for i in range(len(WORDS)))] * 10
KEY = "stages.pi0.safety_preprompt"


@pytest.fixture(scope="module")
def toks():
    raw = train_tokenizer(CORPUS, vocab_size=400)
    chat = train_tokenizer(CORPUS, vocab_size=400)
    set_chat_template(chat, "chatml")
    return {"raw": raw, "chat": chat}


@pytest.fixture(scope="module")
def lms(toks):
    return {fmt: peaked_lm(tok) for fmt, tok in toks.items()}


def dialogue(turns: list[tuple[int, int]]) -> str:
    """An HH prompt of len(turns) Human turns (a Human turn of h words, then an Assistant reply of
    a words, the last reply left open)."""
    text = ""
    for i, (h, a) in enumerate(turns):
        text += "\n\nHuman: " + " ".join(WORDS[j % len(WORDS)] for j in range(h + 1)) + "\n\nAssistant:"
        if i < len(turns) - 1:
            text += " " + " ".join(WORDS[-1 - j % len(WORDS)] for j in range(a + 1))
    return text


def turn_suffixes(prompt: str) -> list[str]:
    """The dialogue with 0, 1, 2, ... whole turns dropped from the left (by hand: split on tags)."""
    parts = prompt.split("\n\nHuman:")[1:]
    return ["".join("\n\nHuman:" + p for p in parts[i:]) for i in range(len(parts))]


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(turns=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=6),
       max_len=st.integers(24, 400), room=st.integers(1, 64), fmt=st.sampled_from(["raw", "chat"]))
def test_the_preprompt_is_whole_in_the_sampled_prompt_ids_or_one_line_names_the_keys(toks, lms, turns, max_len,
                                                                                     room, fmt):
    tok, prompt = toks[fmt], dialogue(turns)
    keep = max(MIN_PROMPT_TOKENS, max_len - room)
    fits = [s for s in turn_suffixes(prompt) if len(formats.prompt_ids(tok, s, fmt, PREPROMPT)) <= keep]
    try:
        out = sample(lms[fmt], tok, [prompt], max_new_tokens=room, max_len=max_len, fmt=fmt, seed=0,
                     system=PREPROMPT, system_key=KEY)
    except ConfigError as e:
        msg = str(e)
        assert not fits and "\n" not in msg and msg.startswith(f"{KEY}: ")
        assert "model.max_seq_len" in msg and "train.max_new_tokens" in msg
        return
    ids = out.prompt_ids[0]
    assert fits and len(ids) <= keep
    # the whole preprompt, then the longest dialogue of whole turns that fits: nothing else cut
    assert ids == formats.prompt_ids(tok, fits[0], fmt, PREPROMPT)
    assert PREPROMPT in tok.decode(ids)


def test_a_dialogue_that_fits_is_encoded_as_before(toks):
    tok, prompt = toks["raw"], dialogue([(5, 5), (3, 0)])
    whole = formats.prompt_ids(tok, prompt, "raw", PREPROMPT)
    assert system_window(tok, prompt, "raw", PREPROMPT, max_len=len(whole) + 8, response_room=8) == whole
    assert prompt_window(whole, len(whole) + 8, 8) == whole


def test_the_old_rule_cut_the_preprompt_and_the_new_drops_the_first_turn(toks):
    tok, prompt = toks["raw"], dialogue([(30, 30), (2, 0)])
    whole = formats.prompt_ids(tok, prompt, "raw", PREPROMPT)
    last = formats.prompt_ids(tok, turn_suffixes(prompt)[1], "raw", PREPROMPT)
    keep = len(last) + 2  # room for the last turn and the preprompt, not for the first turn
    assert len(whole) > keep
    assert PREPROMPT not in tok.decode(prompt_window(whole, keep + 8, 8))  # the last-tokens rule cuts it
    assert system_window(tok, prompt, "raw", PREPROMPT, max_len=keep + 8, response_room=8) == last
    with pytest.raises(ConfigError, match=f"^{KEY}: .*train.max_new_tokens"):
        system_window(tok, prompt, "raw", PREPROMPT, max_len=len(last) - 1 + 8, response_room=8, key=KEY)
