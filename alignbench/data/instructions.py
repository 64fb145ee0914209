"""System instructions for hh_synth dialogues (Llama 2 §3.3, Ghost Attention), checkable on any reply.

With ``data.synth.system_instructions=true`` a share (``INSTRUCTED_SHARE``) of the multi-turn
hh_synth dialogues open with an instruction prepended to the first Human turn
(``"\\n\\nHuman: Answer in capital letters. What is 3 plus 4?"``). Three kinds, each checked by
``check_instruction`` on the text alone:

- ``upper``: the reply is not empty and has no lowercase letter ("12." follows it);
- ``end``: the reply ends with a given sign-off (made of words of hh_synth's vocabulary, so the gold
  reward's garbage term never charges a reply for following it);
- ``max_words``: the reply has 1 to N whitespace-separated words.

``TRAIN_INSTRUCTIONS`` appear in the data and in GAtt's training dialogues; ``HELDOUT_INSTRUCTIONS``
(other phrasings, other sign-offs, other limits) only in the adherence evaluation.

In the generated data the assistant follows the instruction in its FIRST reply only; later replies
ignore it, like dialogue data collected without instructions: the forgetting Ghost Attention
fixes. Only dialogues with two or more Human turns get one, so the final (compared) responses are
never the instructed turn and labels, gold and the pair's responses stay those of the dialogue
without it; ``parse_task`` strips the instruction before reading a turn.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

from alignbench.data.hh import ASSISTANT_TAG

HUMAN_TAG = "\n\nHuman:"
INSTRUCTED_SHARE = 0.5  # of the dialogues with two or more Human turns


@dataclass(frozen=True)
class Instruction:
    text: str  # as written in the Human turn
    kind: str  # "upper" | "end" | "max_words"
    ending: str = ""  # kind "end": the sign-off every reply must end with
    max_words: int = 0  # kind "max_words"


def _end(text: str, ending: str) -> Instruction:
    return Instruction(text.format(e=ending), "end", ending=ending)


def _limit(text: str, n: int, word: str) -> Instruction:
    return Instruction(text.format(n=word), "max_words", max_words=n)


TRAIN_INSTRUCTIONS = (
    Instruction("Answer in capital letters.", "upper"),
    _end("End every reply with '{e}'", "Be kind."),
    _end("End every reply with '{e}'", "Keep it up."),
    _limit("Answer in at most {n} words.", 3, "three"),
    _limit("Answer in at most {n} words.", 5, "five"),
)
HELDOUT_INSTRUCTIONS = (
    Instruction("Write every answer in uppercase.", "upper"),
    _end("Finish each answer with '{e}'", "Have a good one."),
    _end("Finish each answer with '{e}'", "Always ask."),
    _limit("Use no more than {n} words.", 4, "four"),
    _limit("Use no more than {n} words.", 6, "six"),
)
_BY_TEXT = {i.text: i for i in TRAIN_INSTRUCTIONS + HELDOUT_INSTRUCTIONS}
_PREFIX_RE = re.compile("^(" + "|".join(re.escape(t) for t in _BY_TEXT) + r")\s*")
_TURN_TAG_RE = re.compile(r"\n(?:Human|Assistant):")  # a reply running on into a new turn ends there


def instruction(text: str) -> Instruction:
    """The ``Instruction`` written as ``text`` (ValueError for an unknown one)."""
    try:
        return _BY_TEXT[text]
    except KeyError:
        raise ValueError(f"unknown system instruction {text!r}") from None


def check_instruction(instruction_text: str, reply: str) -> bool:
    """Whether ``reply`` (its text before any run-on turn tag) follows the instruction: upper — not
    empty, no lowercase letter; end — ends with the sign-off (after whitespace); max_words —
    1 ≤ whitespace-separated words ≤ N."""
    inst = instruction(instruction_text)
    tag = _TURN_TAG_RE.search(reply)
    text = (reply[: tag.start()] if tag else reply).strip()
    if inst.kind == "upper":
        return bool(text) and not any(c.islower() for c in text)
    if inst.kind == "end":
        return text.endswith(inst.ending)
    return 1 <= len(text.split()) <= inst.max_words


def follow(instruction_text: str, reply: str) -> str:
    """``reply`` rewritten to follow the instruction (the data's first reply): upper-cased, the
    sign-off appended, or cut to the first N words (its last word's punctuation replaced by ".")."""
    inst = instruction(instruction_text)
    if inst.kind == "upper":
        return reply.upper()
    if inst.kind == "end":
        return reply.rstrip() + " " + inst.ending
    words = reply.split()
    if len(words) <= inst.max_words:
        return reply
    return " " + " ".join(words[: inst.max_words]).rstrip(".,!?") + "."


def strip_instruction(turn: str) -> tuple[Optional[str], str]:
    """(the instruction a Human turn's text opens with or None, the rest of the turn)."""
    m = _PREFIX_RE.match(turn)
    return (m.group(1), turn[m.end():]) if m else (None, turn)


def instruct_prompt(prompt: str, instruction_text: str, every_turn: bool = False) -> str:
    """``prompt`` (HH format, opening with a Human turn) with the instruction at the start of its
    first Human turn (``every_turn``: of every Human turn, GAtt's sampling prompts). Text of the
    Human turns is otherwise unchanged; so are the Assistant replies."""
    parts = prompt.split(HUMAN_TAG)
    if parts[0].strip() or len(parts) < 2:
        raise ValueError("instruct_prompt: the prompt must open with a Human turn")
    for k in range(1, len(parts) if every_turn else 2):
        parts[k] = f" {instruction_text} {parts[k].lstrip()}"
    return HUMAN_TAG.join(parts)


def instruct_data_prompt(prompt: str, instruction_text: str) -> str:
    """The data's instructed dialogue: the instruction in the first Human turn and the first
    Assistant reply following it (``follow``); later replies unchanged (they ignore it)."""
    head, sep, rest = instruct_prompt(prompt, instruction_text).partition(ASSISTANT_TAG)
    reply, sep2, tail = rest.partition(HUMAN_TAG)
    if not sep2:  # a single-turn prompt: the instructed reply is the compared response, not here
        return head + sep + rest
    return head + sep + follow(instruction_text, reply) + sep2 + tail


def draw_instruction(seed: int, index: int, n_turns: int) -> Optional[str]:
    """Pair ``index``'s training instruction, or None: from its own stream
    ``random.Random("hh_synth-instructions:<seed>:<index>")`` (never the pair's, so the data without
    instructions is unchanged), for ``INSTRUCTED_SHARE`` of the dialogues with ≥ 2 Human turns."""
    rng = random.Random(f"hh_synth-instructions:{seed}:{index}")
    if rng.random() >= INSTRUCTED_SHARE or n_turns < 2:
        return None
    return rng.choice(TRAIN_INSTRUCTIONS).text


def heldout_instruction(seed: int, index: int) -> str:
    """Evaluation dialogue ``index``'s held-out instruction (stream ``"gatt-eval:<seed>:<index>"``)."""
    return random.Random(f"gatt-eval:{seed}:{index}").choice(HELDOUT_INSTRUCTIONS).text
