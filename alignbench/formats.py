"""How a dialogue meets the model (``data.format``), decided here and nowhere else.

Data, samples.jsonl and the judge always see HH transcript strings ("\\n\\nHuman: ...\\n\\nAssistant:"
prompts, " ..." responses). Only tokenisation differs:

- ``raw``: the transcript text itself, the response followed by EOS (what the HH and DPO papers fed
  base models). A sampled response ends at EOS or where the model opens a new "\\n\\nHuman:" turn.
- ``chat``: the tokenizer's chat template. The prompt's turns become user/assistant messages (the
  context-distillation teacher's HHH prompt a system message) rendered with the generation prompt;
  the response is the final assistant turn's content followed by the template's end-of-turn token
  (``<|im_end|>`` for ChatML models such as SmolLM2 and Qwen, ``<|eot_id|>`` for Llama-3), so only
  that turn is trained and scored, a sampled response ends at that token and the PM reads there.

The prompt and the response are tokenised apart, so the response boundary is exact in both formats.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

from alignbench.config import ConfigError
from alignbench.data.hh import ASSISTANT, ASSISTANT_TAG, parse_transcript

HUMAN_TAG = "\n\nHuman:"

FORMATS = ("raw", "chat")
ROLES = {"Human": "user", ASSISTANT: "assistant"}
_MARK = "\x07alignbench-end-of-turn-probe\x07"  # content no template alters, to find what follows it

# TRL's ChatML (``setup_chat_format``), for tokenizers without a template (model.chat_template=chatml)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def set_chat_template(tokenizer, name: Optional[str]) -> int:
    """Give ``tokenizer`` the chat template ``name`` (``model.chat_template``; None: keep its own).
    Returns how many tokens were added to its vocabulary (the model's embeddings must grow by as many)."""
    if name is None:
        return 0
    if name != "chatml":
        raise ConfigError(f"model.chat_template: must be null or 'chatml', got {name!r}")
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = CHATML
    return len(tokenizer) - before


def check_format(tokenizer, fmt: str) -> None:
    """A one-line ConfigError unless ``tokenizer`` can render ``fmt`` (call before any training)."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format: must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.format: 'chat' needs a tokenizer with a chat template; "
                          f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} has none "
                          f"(use data.format=raw, an instruct checkpoint, or model.chat_template=chatml)")


def messages(prompt: str, system: Optional[str] = None) -> list[dict]:
    """The chat messages of an HH prompt: its Human/Assistant turns as user/assistant messages
    (consecutive turns of one role joined by a blank line, since many templates require
    alternation), without the empty final Assistant turn the prompt ends with; ``system`` first."""
    out = [{"role": "system", "content": system}] if system else []
    for role, text in parse_transcript(prompt, "prompt"):
        role = ROLES[role]
        if out and out[-1]["role"] == role:
            out[-1]["content"] = f"{out[-1]['content']}\n\n{text}" if text else out[-1]["content"]
        else:
            out.append({"role": role, "content": text})
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def render(tokenizer, msgs: list[dict], generation_prompt: bool) -> str:
    """The chat template's text (special tokens written out, tokenised by ``_ids``)."""
    check_format(tokenizer, "chat")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str, fmt: str, system: Optional[str] = None) -> list[int]:
    """The model-facing ids of an HH prompt: its text (raw; ``system`` is then prepended as text),
    or its messages rendered with the generation prompt (chat; ``system`` a system message)."""
    if fmt == "raw":
        return _ids(tokenizer, system + prompt if system else prompt)
    return _ids(tokenizer, render(tokenizer, messages(prompt, system), generation_prompt=True))


def human_turn_starts(prompt: str) -> list[int]:
    """Where the dialogue may be cut from the left, whole turns dropped: 0 (all of it), then the
    index of every later "\\n\\nHuman:" tag, ascending, so ``prompt[i:]`` is a dialogue that opens
    with a Human turn and ends as ``prompt`` ends."""
    starts, at = [0], prompt.find(HUMAN_TAG, 1)
    while at >= 0:
        starts.append(at)
        at = prompt.find(HUMAN_TAG, at + 1)
    return starts


def response_ids(tokenizer, response: str, fmt: str, eos: bool = True) -> list[int]:
    """The ids of a dataset response, ended (``eos``) by EOS (raw) or the end-of-turn token (chat,
    where the HH response's leading space is dropped as the message content would be)."""
    text = response if fmt == "raw" else response.strip()
    return _ids(tokenizer, text) + ([end_of_turn_id(tokenizer, fmt)] if eos else [])


def end_of_turn_id(tokenizer, fmt: str) -> int:
    """The token that ends a response: EOS (raw), or the first token the chat template writes after
    an assistant message's content (found by rendering a one-turn conversation)."""
    if fmt == "raw":
        return tokenizer.eos_token_id
    check_format(tokenizer, fmt)  # before rendering: a missing template names data.format
    return _end_of_turn(tokenizer, tokenizer.chat_template)


def _end_of_turn(tokenizer, template: str) -> int:
    known = _EOT.get(tokenizer)
    if known is None or known[0] != template:  # rendered once per tokenizer and template
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                      generation_prompt=False)
        if _MARK not in text:
            raise ConfigError("data.format: the tokenizer's chat template drops the assistant's message content")
        after = _ids(tokenizer, text[text.index(_MARK) + len(_MARK):])
        known = _EOT[tokenizer] = (template, after[0] if after else tokenizer.eos_token_id)  # nothing after: EOS
    return known[1]


_EOT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (template, end-of-turn id)


def split_transcript(transcript: str) -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:" tag, final response); the whole text
    is the prompt when it has no Assistant turn."""
    at = transcript.rfind(ASSISTANT_TAG)
    if at < 0:
        return transcript, ""
    return transcript[:at + len(ASSISTANT_TAG)], transcript[at + len(ASSISTANT_TAG):]


def dialogue_ids(tokenizer, transcript: str, fmt: str, system: Optional[str] = None) -> list[int]:
    """A whole dialogue as one LM training text (base-LM corpus, PPO-ptx, context distillation):
    raw, its text + EOS; chat, its rendered prompt + final response + end-of-turn."""
    if fmt == "raw":
        return prompt_ids(tokenizer, transcript, fmt, system) + [tokenizer.eos_token_id]
    prompt, response = split_transcript(transcript)
    return prompt_ids(tokenizer, prompt, fmt, system) + response_ids(tokenizer, response, fmt)


def system_prefixes(tokenizer, fmt: str, system: str, probe: str) -> tuple[list[int], list[int]]:
    """(student prefix, teacher prefix): the ids before the dialogue when it is rendered without
    and with the ``system`` message, so that every dialogue's ids are ``prefix + X`` for the same X
    (raw: [] and the system text's ids). Found from the longest common suffix of one rendered
    ``probe`` transcript."""
    if fmt == "raw":
        return [], _ids(tokenizer, system)
    student, teacher = dialogue_ids(tokenizer, probe, fmt), dialogue_ids(tokenizer, probe, fmt, system)
    common = 0
    while common < min(len(student), len(teacher)) and student[-1 - common] == teacher[-1 - common]:
        common += 1
    return student[:len(student) - common], teacher[:len(teacher) - common]


def strip_prefix(ids: Sequence[int], prefix: Sequence[int], what: str) -> list[int]:
    """``ids`` without ``prefix``, which it must start with."""
    if list(ids[:len(prefix)]) != list(prefix):
        raise ValueError(f"{what}: the chat template renders this dialogue with a different prefix than the probe's")
    return list(ids[len(prefix):])
