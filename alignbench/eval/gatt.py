"""Instruction adherence by turn (Llama 2 §3.3, Ghost Attention's metric), on hh_synth with system
instructions (``data.synth.system_instructions``): the statistic. A run's dialogues are drawn and
checked by ``alignbench.policy_measures.gatt_rows``.

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


def adherence_by_turn(follows: list[list[bool]]) -> dict[int, list[float]]:
    """Per turn k (1-based): [1.0 if dialogue d's k-th reply follows its instruction else 0.0]
    over the dialogues with a k-th reply; the adherence at turn k is their mean."""
    out: dict[int, list[float]] = {}
    for dialogue in follows:
        for k, ok in enumerate(dialogue, start=1):
            out.setdefault(k, []).append(float(ok))
    return out
