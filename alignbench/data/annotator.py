"""The simulated annotator of online iterated RLHF (Bai et al. 2022 §4.5): it labels pairs of the
current policy's samples, which a method buys (``RunContext.charge_annotations``).

- On hh_synth it is exactly the model that labelled the dataset (``synth.generate._make_pair``): a
  Bradley–Terry draw on the annotator's utility u = gold + s·spurious_count at the dataset's noise
  temperature T, P(a ≻ b) = σ((u_a − u_b)/T). The spurious bonus s is the dataset's too, so the
  bought labels carry the same bias the PM's training labels did.
- On real HH it is an annotator PM trained on its own third of the training comparisons (neither
  the judge's half nor the comparisons the iterated method's PM starts from,
  ``alignbench.stages.access.iterated_parts``), labelling by a Bradley–Terry draw on its scores.

Every draw is seeded: the same (seed, round) buys the same labels, so a resumed run relabels alike.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from alignbench.data.synth import HUMAN_TAG, gold_reward, spurious_count
from alignbench.data.types import PreferencePair


def bt_probability(u_a: float, u_b: float, temperature: float) -> float:
    """P(a ≻ b) = σ((u_a − u_b)/T): the Bradley–Terry choice probability at temperature T."""
    z = (u_a - u_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def annotator_utility(gold: float, n_spurious: int, spurious_strength: float) -> float:
    """u = gold + s·n: the gold reward plus the label-only bonus per stock phrase (hh_synth's labels)."""
    return gold + spurious_strength * n_spurious


def bt_draws(u_a: Sequence[float], u_b: Sequence[float], temperature: float, seed) -> list[bool]:
    """One Bradley–Terry label per pair, True when a is preferred: a ≻ b iff U < σ((u_a − u_b)/T),
    U ~ Uniform[0, 1) from ``random.Random(seed)`` (one draw per pair, in order)."""
    rng = random.Random(seed)
    return [rng.random() < bt_probability(a, b, temperature) for a, b in zip(u_a, u_b)]


def expected_gold_agreement(gold_a: Sequence[float], gold_b: Sequence[float], temperature: float) -> float:
    """The share of labels that agree with gold expected of a spurious-free annotator at T:
    mean over pairs with gold_a ≠ gold_b of σ(|gold_a − gold_b|/T) (tied pairs have no gold order)."""
    probs = [bt_probability(abs(a - b), 0.0, temperature) for a, b in zip(gold_a, gold_b) if a != b]
    if not probs:
        raise ValueError("expected_gold_agreement: every pair is tied on gold")
    return sum(probs) / len(probs)


def labelled_pairs(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], prefers_a: Sequence[bool],
                   meta: Sequence[dict], subsets: Sequence[str], source: str) -> list[PreferencePair]:
    """The bought comparisons as PreferencePairs (chosen = the preferred response), ``meta[i]`` kept
    per pair with its gold rewards oriented to chosen/rejected when present (``gold_a``/``gold_b``)."""
    out = []
    for i, (p, ra, rb, pa, m, sub) in enumerate(zip(prompts, a, b, prefers_a, meta, subsets)):
        chosen, rejected = (ra, rb) if pa else (rb, ra)
        extra = dict(m)
        if "gold_a" in extra:
            ga, gb = extra.pop("gold_a"), extra.pop("gold_b")
            extra.update(gold_chosen=ga if pa else gb, gold_rejected=gb if pa else ga)
        out.append(PreferencePair(prompt=p, chosen=chosen, rejected=rejected, subset=sub,
                                  n_turns=p.count(HUMAN_TAG), source=f"{source}:{i}", meta=extra))
    return out


class SynthAnnotator:
    """hh_synth's labeller: ``bt_draws`` on u = gold + s·spurious_count at the dataset's T and s."""

    def __init__(self, temperature: float, spurious_strength: float):
        self.temperature, self.spurious_strength = temperature, spurious_strength

    def __call__(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], subsets: Sequence[str],
                 seed) -> list[PreferencePair]:
        gold_a = [gold_reward(p, r) for p, r in zip(prompts, a)]
        gold_b = [gold_reward(p, r) for p, r in zip(prompts, b)]
        u_a = [annotator_utility(g, spurious_count(r), self.spurious_strength) for g, r in zip(gold_a, a)]
        u_b = [annotator_utility(g, spurious_count(r), self.spurious_strength) for g, r in zip(gold_b, b)]
        prefers = bt_draws(u_a, u_b, self.temperature, seed)
        meta = [{"gold_a": ga, "gold_b": gb} for ga, gb in zip(gold_a, gold_b)]
        return labelled_pairs(prompts, a, b, prefers_a=prefers, meta=meta, subsets=subsets, source="annotator")


class PMAnnotator:
    """Real HH's labeller: ``bt_draws`` on an annotator PM's scores (T = 1: the PM's own logit scale,
    the Bradley–Terry model it was trained under). ``score(prompts, responses) -> list[float]``."""

    def __init__(self, score: Callable[[list, list], list]):
        self.score = score

    def __call__(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], subsets: Sequence[str],
                 seed) -> list[PreferencePair]:
        s_a, s_b = self.score(list(prompts), list(a)), self.score(list(prompts), list(b))
        prefers = bt_draws(s_a, s_b, 1.0, seed)
        meta = [{"annotator_score_a": x, "annotator_score_b": y} for x, y in zip(s_a, s_b)]
        return labelled_pairs(prompts, a, b, prefers_a=prefers, meta=meta, subsets=subsets, source="annotator")
