"""Instruction adherence by turn (Llama 2 §3.3, Ghost Attention's metric), on hh_synth with system
instructions (``data.synth.system_instructions``).

The dialogues: eval-split prompts with ``data.synth.max_turns`` Human turns (the same dialogues at
every turn, so turn k is not a different population than turn 1), at most ``eval.n_prompts``, each
given a HELD-OUT instruction (``instructions.heldout_instruction``, seeded by ``data.seed``: the same
for every run) in its first user turn. The policy writes every assistant turn itself, turn by turn
(human turns from the data, assistant turns its own, at eval.temperature), and each reply is checked
with ``check_instruction``. Measurement: free, never charged to the method.

Rows (evaluator "gatt", metric "adherence", slice "turn:k"): the share of dialogues whose k-th reply
follows the instruction, with a seeded percentile-bootstrap interval over dialogues.
"""
from __future__ import annotations

import json
import logging

from alignbench.data import load_data
from alignbench.data.instructions import HUMAN_TAG, check_instruction, heldout_instruction
from alignbench.eval.stats import bootstrap_ci, make_row
from alignbench.sampling import SampleBatch
from alignbench.stages.gatt import has_instructions, training_transcript, user_turns

log = logging.getLogger(__name__)
GATT_EVAL_SEED_OFFSET = 60_013  # the adherence samples' stream (turn k adds k)


def adherence_by_turn(follows: list[list[bool]]) -> dict[int, list[float]]:
    """Per turn k (1-based): [1.0 if dialogue d's k-th reply follows its instruction else 0.0]
    over the dialogues with a k-th reply; the adherence at turn k is their mean."""
    out: dict[int, list[float]] = {}
    for dialogue in follows:
        for k, ok in enumerate(dialogue, start=1):
            out.setdefault(k, []).append(float(ok))
    return out


def eval_dialogues(cfg) -> list[tuple[str, list[str]]]:
    """(HELD-OUT instruction, user turns) of the eval-split dialogues with max_turns Human turns."""
    prompts = dict.fromkeys(p.prompt for p in load_data(cfg.data).splits["eval"]
                            if p.prompt.count(HUMAN_TAG) == cfg.data.synth.max_turns)
    picked = list(prompts)[: cfg.eval.n_prompts]
    return [(heldout_instruction(cfg.data.seed, i), user_turns(p)) for i, p in enumerate(picked)]


def gatt_rows(ctx, draw, ident: dict) -> list[dict]:
    """Adherence rows of the run's policy, written with its replies to gatt_samples.jsonl; [] without
    system instructions in the data or when the policy cannot be drawn from at a temperature.
    ``draw(prompts, n, temperature, seed)``: the policy's samples (a SampleBatch or texts), or None
    (``evaluate_samples.policy_draw``)."""
    cfg = ctx.cfg
    if not has_instructions(cfg):
        return []
    dialogues = eval_dialogues(cfg)
    replies: list[list[str]] = [[] for _ in dialogues]
    for t in range(cfg.data.synth.max_turns):
        prompts = [training_transcript(inst, users[: t + 1], replies[i] + [""])[0]
                   for i, (inst, users) in enumerate(dialogues)]
        out = draw(prompts, 1, cfg.eval.temperature, ctx.seed + GATT_EVAL_SEED_OFFSET + t)
        if out is None:
            log.info("gatt adherence: %s's sampler takes no temperature; skipped", ident.get("config"))
            return []
        texts = out.responses if isinstance(out, SampleBatch) else list(out)
        for i, text in enumerate(texts):
            replies[i].append(" " + text.strip())
    follows = [[check_instruction(inst, r) for r in rs] for (inst, _), rs in zip(dialogues, replies)]
    with open(ctx.out_dir / "gatt_samples.jsonl", "w") as f:
        for i, ((inst, users), rs, ok) in enumerate(zip(dialogues, replies, follows)):
            f.write(json.dumps({"dialogue": i, "instruction": inst, "users": users, "replies": rs,
                                "follows": ok}) + "\n")
    rows = []
    for k, values in adherence_by_turn(follows).items():
        v, lo, hi = bootstrap_ci(values, n_boot=cfg.eval.bootstrap, seed=cfg.seed)
        rows.append(make_row(evaluator="gatt", metric="adherence", slice=f"turn:{k}", value=v, ci_low=lo,
                             ci_high=hi, n=len(values), **ident))
    return rows
