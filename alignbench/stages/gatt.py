"""Ghost Attention (Llama 2 §3.3): stage ``pi0-gatt``, π0 fine-tuned to keep a system instruction
across a multi-turn dialogue (on when ``stages.pi0.gatt``; every method then starts from it and is
anchored to it).

1. Dialogues: ``stages.gatt.dialogues`` of the method's training prompts (``access.method_prompts``,
   never the judge's) with two or more Human turns u1..un, each given a TRAIN instruction
   (``alignbench.data.instructions``; a held-out set is kept for the evaluation).
2. Sampling: every assistant turn is sampled from π0 turn by turn, with the instruction attached to
   EVERY user turn (so π0, which follows an instruction in the same turn, follows it); per turn
   ``stages.gatt.candidates`` samples, the first that passes ``check_instruction`` is kept (Llama 2
   rejection-sampled too), else the first.
3. Training: the dialogue with the instruction in the FIRST user turn only and the sampled turns as
   history; the loss is zero on every token but the last assistant turn's (``gatt_example``). Each
   turn t of a dialogue gives one example (the dialogue cut after turn t), kept when replies 1..t
   all follow the instruction: every trained reply, and the history it sees, follow it.
"""
from __future__ import annotations

import dataclasses
import random

from alignbench import freeze, lora
from alignbench.config import Config, ConfigError
from alignbench.data import load_data, pairwise_config
from alignbench.data.hh import ASSISTANT_TAG, parse_transcript
from alignbench.data.instructions import HUMAN_TAG, TRAIN_INSTRUCTIONS, check_instruction, strip_instruction
from alignbench.models import load_lm, load_tokenizer, pick_device
from alignbench.sampling import sample
from alignbench.stages.access import method_prompts
from alignbench.cache import Artifact, build_stage, data_key, format_key, lora_key, precision_key
from alignbench.tracking import Tracker
from alignbench.encoding import Encoded, encode, pad_batch
from alignbench.train import batch_schedule, lm_loss, supervised_loop

IGNORE = -100  # the label of a token the loss skips
GATT_SEED_OFFSET = 50_021  # the sampling stream of GAtt's data, apart from every other stream


def has_instructions(cfg: Config) -> bool:
    """Whether the data has system instructions (hh_synth with data.synth.system_instructions)."""
    return cfg.data.name == "hh_synth" and cfg.data.synth.system_instructions


def check_gatt(cfg: Config) -> None:
    """GAtt needs dialogues that open with a checkable instruction: fails before any training."""
    if cfg.stages.pi0.gatt and not has_instructions(cfg):
        raise ConfigError("stages.pi0.gatt: Ghost Attention needs data with system instructions "
                          "(data=hh_synth with data.synth.system_instructions=true), got "
                          f"data={cfg.data.name}" + (" with system_instructions=false" if cfg.data.name == "hh_synth"
                                                     else ""))


def user_turns(prompt: str) -> list[str]:
    """The Human turns of an HH prompt, any system instruction removed."""
    return [strip_instruction(text)[1] for role, text in parse_transcript(prompt, "gatt") if role == "Human"]


def sampling_prompt(instruction: str, users: list[str], replies: list[str]) -> str:
    """GAtt's sampling prompt for the turn after ``replies``: the instruction on EVERY user turn."""
    done = "".join(f"{HUMAN_TAG} {instruction} {u}{ASSISTANT_TAG}{r}" for u, r in zip(users, replies))
    return done + f"{HUMAN_TAG} {instruction} {users[len(replies)]}{ASSISTANT_TAG}"


def training_transcript(instruction: str, users: list[str], replies: list[str]) -> tuple[str, str]:
    """(prompt, response) GAtt trains on: the instruction in the first user turn only, replies
    1..n-1 as history, reply n the response (``len(replies) == len(users) == n``)."""
    if len(users) != len(replies) or not users:
        raise ValueError(f"training_transcript: {len(users)} user turns but {len(replies)} replies")
    turns = [f"{instruction} {users[0]}", *users[1:]]
    history = "".join(f"{HUMAN_TAG} {u}{ASSISTANT_TAG}{r}" for u, r in zip(turns[:-1], replies[:-1]))
    return history + f"{HUMAN_TAG} {turns[-1]}{ASSISTANT_TAG}", replies[-1]


def gatt_example(tokenizer, instruction: str, users: list[str], replies: list[str], max_len: int,
                 fmt: str = "raw") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one GAtt example: ``training_transcript`` tokenised like every
    supervised example (``encoding.encode``: the prompt window, the response and EOS); labels are the
    ids on the last assistant turn and ``IGNORE`` (-100) on every earlier token, the instruction's
    and the earlier turns' included."""
    prompt, response = training_transcript(instruction, users, replies)
    enc = encode(tokenizer, prompt, response, max_len, fmt=fmt)
    ids = enc.input_ids
    return ids, [IGNORE] * enc.response_start + ids[enc.response_start:]


def pick_reply(instruction: str, candidates: list[str]) -> tuple[str, bool]:
    """(the first candidate that follows the instruction, else the first; whether it follows), as
    " text" (the data's replies open with a space)."""
    texts = [" " + c.strip() for c in candidates]
    for text in texts:
        if check_instruction(instruction, text):
            return text, True
    return texts[0], False


def sample_dialogues(model, tokenizer, dialogues: list[tuple[str, list[str]]], *, candidates: int,
                     temperature: float, max_new_tokens: int, max_len: int, fmt: str,
                     seed: int) -> list[tuple[list[str], list[bool]]]:
    """Every assistant turn of each (instruction, user turns) dialogue, turn by turn, from
    ``sampling_prompt`` (instruction on every user turn): (replies, follows) per dialogue."""
    out: list[tuple[list[str], list[bool]]] = [([], []) for _ in dialogues]
    for t in range(max(len(users) for _, users in dialogues)):
        active = [i for i, (_, users) in enumerate(dialogues) if len(users) > t]
        prompts = [sampling_prompt(dialogues[i][0], dialogues[i][1], out[i][0]) for i in active]
        batch = sample(model, tokenizer, prompts, n=candidates, temperature=temperature,
                       max_new_tokens=max_new_tokens, seed=seed + t, max_len=max_len, fmt=fmt)
        for row, i in enumerate(active):
            reply, ok = pick_reply(dialogues[i][0], batch.responses[row * candidates:(row + 1) * candidates])
            out[i][0].append(reply)
            out[i][1].append(ok)
    return out


def gatt_dialogues(cfg: Config) -> list[tuple[str, list[str]]]:
    """(TRAIN instruction, user turns) of ``stages.gatt.dialogues`` method training prompts with two
    or more Human turns, drawn with ``stages.seed``."""
    data = load_data(pairwise_config(cfg.data))
    prompts = [p for p in method_prompts(cfg, data) if p.count(HUMAN_TAG) >= 2]
    rng = random.Random(f"gatt:{cfg.stages.seed}")
    picked = rng.sample(prompts, min(cfg.stages.gatt.dialogues, len(prompts)))
    return [(rng.choice(TRAIN_INSTRUCTIONS).text, user_turns(p)) for p in picked]


def build_gatt_pi0(cfg: Config, pi0: Artifact) -> Artifact:
    """π0 after Ghost Attention (stage ``pi0-gatt``), or ``pi0`` itself when not stages.pi0.gatt."""
    if not cfg.stages.pi0.gatt:
        return pi0
    sc = cfg.stages.gatt
    key = {"upstream": {"pi0": pi0.key}, "gatt": dataclasses.asdict(sc),
           "instructions": [i.text for i in TRAIN_INSTRUCTIONS],
           "sampling": {"temperature": cfg.train.temperature, "max_new_tokens": cfg.train.max_new_tokens},
           "data": data_key(cfg), "seed": cfg.stages.seed, **precision_key(cfg), **format_key(cfg), **lora_key(cfg)}

    def build(out):
        tok, model = load_tokenizer(pi0.path), load_lm(pi0.path)
        device, max_len, fmt = pick_device(cfg.train.device), pi0.record["max_len"], cfg.data.format
        dialogues = gatt_dialogues(cfg)
        sampled = sample_dialogues(model.to(device), tok, dialogues, candidates=sc.candidates,
                                   temperature=cfg.train.temperature, max_new_tokens=cfg.train.max_new_tokens,
                                   max_len=max_len, fmt=fmt, seed=cfg.stages.seed + GATT_SEED_OFFSET)
        examples, follows_by_turn = [], {}
        for (inst, users), (replies, follows) in zip(dialogues, sampled):
            for t in range(len(users)):
                follows_by_turn.setdefault(t + 1, []).append(follows[t])
                if all(follows[: t + 1]):
                    ids, labels = gatt_example(tok, inst, users[: t + 1], replies[: t + 1], max_len=max_len, fmt=fmt)
                    examples.append(Encoded(ids, labels.count(IGNORE)))
        if not examples:
            raise RuntimeError("stages.pi0.gatt: no sampled turn followed its instruction; raise "
                               "stages.gatt.candidates or train π0 longer")
        model = freeze.prepare(model, cfg.model, seed=cfg.stages.seed)  # like π0: LoRA, or the top layers only
        tracker = Tracker(out / "tb", cfg.train.report_to, "pi0-gatt")
        batches = batch_schedule(len(examples), batch_size=sc.batch_size, epochs=sc.epochs, seed=cfg.stages.seed,
                                 max_steps=sc.max_steps)
        res = supervised_loop(model, batches, lambda idx: pad_batch([examples[i] for i in idx], tok.pad_token_id),
                              lm_loss, lr=sc.lr, desc="π0 Ghost Attention", grad_clip=cfg.train.grad_clip,
                              device=device, precision=cfg.train.precision,
                              gradient_checkpointing=cfg.train.gradient_checkpointing, log_step=tracker.log_step)
        tracker.close()
        lora.save(model.to("cpu"), out)
        tok.save_pretrained(out)
        metrics = {"dialogues": len(dialogues), "examples": len(examples), "steps": res.steps,
                   "train_tokens": res.tokens, "train_seconds": round(res.seconds, 2), "final_loss": res.losses[-1],
                   # share of sampled turns (instruction on every user turn) that followed it, by turn
                   "sampled_follow_rate": {t: sum(v) / len(v) for t, v in sorted(follows_by_turn.items())}}
        return {"metrics": metrics, "max_len": max_len}

    return build_stage("pi0-gatt", key, cfg.paths.cache_dir, build)
