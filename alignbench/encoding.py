"""Tokenisation of prompts and responses into training and scoring sequences, written once so every
stage, method and measurement encodes alike: the one prompt-truncation rule (``prompt_window``),
dataset pairs on a shared prompt window, sampled ids as drawn, and right padding. How a dialogue is
rendered (raw HH text or a chat template) is ``alignbench.formats``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from alignbench import formats
from alignbench.config import ConfigError, MIN_PROMPT_TOKENS


@dataclass
class Encoded:
    input_ids: list[int]
    response_start: int  # index of the first response token; labels before it are masked


def prompt_window(prompt_ids: Sequence[int], max_len: int, response_room: int) -> list[int]:
    """The one prompt-truncation rule, used by the sampler and by every encoder: keep the last
    max(MIN_PROMPT_TOKENS, max_len − response_room) prompt tokens (the last turns matter most)."""
    keep = max(MIN_PROMPT_TOKENS, max_len - response_room)
    return list(prompt_ids[-keep:])


def system_window(tokenizer, prompt: str, fmt: str, system: str, max_len: int, response_room: int,
                  key: str = "system") -> list[int]:
    """The prompt window of a dialogue read with a system context (a safety preprompt): the context
    is never cut. With keep = max(MIN_PROMPT_TOKENS, max_len − response_room), the ids are
    ``formats.prompt_ids(prompt[i:], system)`` for the first (longest) cut i of
    ``formats.human_turn_starts`` whose ids number ≤ keep: dialogue turns are dropped from the left
    instead. Where even the last Human turn does not fit with the context, a one-line ConfigError
    names ``key`` and the window's keys (there is nothing left to drop but the context itself)."""
    keep = max(MIN_PROMPT_TOKENS, max_len - response_room)
    for start in formats.human_turn_starts(prompt):
        ids = formats.prompt_ids(tokenizer, prompt[start:], fmt, system)
        if len(ids) <= keep:
            return ids
    n_system = len(ids) - len(formats.prompt_ids(tokenizer, prompt[start:], fmt))
    raise ConfigError(f"{key}: its {n_system}-token context plus the dialogue's last turn ({len(ids)} tokens in all) "
                      f"exceed the {keep}-token prompt window (model.max_seq_len={max_len} − "
                      f"train.max_new_tokens={response_room}); shorten the context or raise model.max_seq_len")


def encode_responses(tokenizer, prompt: str, responses: Sequence[str], max_len: int,
                     eos: bool = True, fmt: str = "raw") -> list[Encoded]:
    """Dataset responses to one prompt, all conditioned on the same prompt window.

    Each response is tokenised apart from the prompt (so the boundary is exact) and gets EOS, or
    the chat template's end-of-turn token (the dataset says it ended; ``alignbench.formats``
    renders the prompt and response for ``fmt``). The response room is room = min(longest
    response, max(max_len // 2, max_len − len(prompt))); every response keeps its first ``room``
    tokens and the prompt keeps ``prompt_window(prompt, max_len, room)``, so chosen and rejected of
    a pair see the same context. For one response this is the old single-sequence rule."""
    p = formats.prompt_ids(tokenizer, prompt, fmt)
    rs = [formats.response_ids(tokenizer, r, fmt, eos) for r in responses]
    room = min(max(map(len, rs)), max(max_len // 2, max_len - len(p)))
    window = prompt_window(p, max_len, room)
    return [Encoded(window + r[:room], len(window)) for r in rs]


def encode(tokenizer, prompt: str, response: str, max_len: int, eos: bool = True, fmt: str = "raw") -> Encoded:
    """One dataset (prompt, response), by the rule of ``encode_responses``."""
    return encode_responses(tokenizer, prompt, [response], max_len, eos=eos, fmt=fmt)[0]


def encode_chosen(tokenizer, pairs, max_len: int, fmt: str = "raw") -> list[Encoded]:
    """Preferred-FT's data (the DPO paper's SFT on the preferred responses): each comparison's
    (prompt, chosen), trained on with ``lm_loss`` (π0's stages.pi0.mode=preferred_ft, method preferred_ft)."""
    return [encode(tokenizer, p.prompt, p.chosen, max_len, fmt=fmt) for p in pairs]


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_len: int,
                fmt: str = "raw") -> tuple[Encoded, Encoded]:
    """Chosen and rejected of one comparison, on one shared prompt window."""
    c, r = encode_responses(tokenizer, prompt, [chosen, rejected], max_len, fmt=fmt)
    return c, r


def encode_dialogue(tokenizer, transcript: str, max_len: int, fmt: str = "raw") -> Encoded:
    """A whole dialogue as LM training text, every token scored, its first ``max_len`` tokens kept
    (base-LM corpus, held-out NLL, PPO-ptx): ``formats.dialogue_ids``. Raw, this is
    ``encode(tokenizer, "", transcript, max_len)``."""
    return Encoded(formats.dialogue_ids(tokenizer, transcript, fmt)[:max_len], 0)


def encode_ids(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Encoded:
    """Already-tokenised sequences, as they were sampled: nothing re-tokenised, nothing appended."""
    return Encoded(list(prompt_ids) + list(response_ids), len(prompt_ids))


def encode_samples(samples, with_stop: bool = False) -> list[Encoded]:
    """A SampleBatch exactly as drawn: the sampler's prompt window plus the generated ids (EOS
    only where it was sampled). ``with_stop``: also the tokens of the stop string that ended a row
    (``SampleBatch.stop_ids``), every token the policy sampled: a response that is only the stop
    string still has the action that ended it (PPO's rollouts)."""
    stops = samples.stop_ids if with_stop and samples.stop_ids else [[]] * len(samples.response_ids)
    return [encode_ids(p, [*r, *s]) for p, r, s in zip(samples.prompt_ids, samples.response_ids, stops)]


def pad_batch(seqs: Sequence[Encoded], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and a mask over response tokens (the positions we score)."""
    n = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    resp = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        attn[i, : len(s.input_ids)] = 1
        resp[i, s.response_start: len(s.input_ids)] = True
    out = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
