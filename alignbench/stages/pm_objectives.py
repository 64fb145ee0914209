"""The PM's training objectives (``stages.pm.objective``) and their data shapes, model-free: the
scores come from ``alignbench.stages.preference.pm_scores``.

- ``pairwise``: L = −log σ(r_chosen − r_rejected) per comparison (Bai et al. 2022). On ranked data
  every one of a prompt's C(K,2) pairs is its own training element (InstructGPT's "shuffled pairs").
- ``ranking``: InstructGPT's eq. 1 (Ouyang et al. 2022): all C(K,2) pairs of one prompt in one
  element, ℓ = −(1/C(K,2)) Σ_{i better than j} log σ(r_i − r_j), so a prompt enters once per epoch.
- ``classifier``: Askell et al. 2021's binary discrimination: BCE of σ(r) against good = 1 (the
  chosen response, or the top half of a ranking) and bad = 0 (the rejected one, the bottom half).
- ``lm``: no training; the score is log p(response | prompt) under the init LM (their imitation
  baseline as a scorer), served by ``preference.LMScorer``.

Every loss takes per-element weights w: harmless comparisons weigh λ = ``stages.pm.harmless_weight``,
helpful ones 1, and L = (1/B) Σ_g w_g ℓ_g = L_helpful + λ·L_harmless, both summed over the batch of B.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from alignbench.data.types import PreferencePair, harm_group
from alignbench.encoding import encode_responses, pad_batch


@dataclass(frozen=True)
class Ranked:
    """One human judgement: a prompt and its responses best→worst (two for a plain comparison)."""
    prompt: str
    responses: tuple[str, ...]
    subset: str


def ranked_of(pair: PreferencePair) -> Ranked:
    """A comparison as a ranking: hh_synth's ``meta["ranked"]`` when present, else (chosen, rejected)."""
    responses = pair.meta.get("ranked") or (pair.chosen, pair.rejected)
    return Ranked(pair.prompt, tuple(responses), pair.subset)


def sub_pairs(ranking: Ranked) -> list[Ranked]:
    """The C(K,2) pairs (better, worse) of a ranking, each a comparison of its own."""
    r = ranking.responses
    return [Ranked(ranking.prompt, (r[i], r[j]), ranking.subset)
            for i in range(len(r)) for j in range(i + 1, len(r))]


def training_elements(pairs: Sequence[PreferencePair], objective: str) -> list[Ranked]:
    """What one optimiser element is under ``objective``: a sub-pair (pairwise) or a whole ranking."""
    rankings = [ranked_of(p) for p in pairs]
    if objective == "pairwise":
        return [sp for r in rankings for sp in (sub_pairs(r) if len(r.responses) > 2 else [r])]
    return rankings


def first_judgements(pairs: Sequence, n: int | None, seed: int) -> list:
    """The first ``n`` items of a seeded permutation (``None``: all, in order). Nested: a smaller n
    keeps a subset of a larger one, so label-efficiency points share their labels."""
    if n is None:
        return list(pairs)
    order = list(range(len(pairs)))
    random.Random(f"pm-judgements:{seed}").shuffle(order)
    return [pairs[i] for i in sorted(order[:n])]


def element_weights(subsets: Sequence[str], harmless_weight: float) -> torch.Tensor:
    """w_g = λ for a harmless element (``data.types.HARMLESS_SUBSETS``), 1 for a helpful one."""
    return torch.tensor([harmless_weight if harm_group(s) == "harmless" else 1.0 for s in subsets])


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = (1/B) Σ_i w_i · (−log σ(r_chosen,i − r_rejected,i)); with every w_i = 1 the mean of
    Bai et al.'s pairwise loss, bit for bit."""
    return (weights * -F.logsigmoid(chosen - rejected)).sum() / len(chosen)


def ranking_loss(scores: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """InstructGPT eq. 1 per element g with K_g responses best→worst in row g of ``scores`` [B, K]
    (``valid`` marks the real ones): ℓ_g = −(1/C(K_g,2)) Σ_{i<j} log σ(r_gi − r_gj), and
    L = (1/B) Σ_g w_g ℓ_g. For K = 2 it is ``pairwise_loss``."""
    k = scores.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1)
    pairs = upper & valid[:, :, None] & valid[:, None, :]  # [B, K, K]: i better than j, both real
    logp = F.logsigmoid(scores[:, :, None] - scores[:, None, :])
    per_element = -(logp * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)
    return (weights * per_element).sum() / len(scores)


def classifier_labels(k: int) -> list[float]:
    """Good/bad labels of a ranking of k, best first: the top ⌊k/2⌋ are 1, the bottom ⌊k/2⌋ are 0,
    the middle response of an odd k is left out (−1)."""
    half = k // 2
    return [1.0] * half + [-1.0] * (k - 2 * half) + [0.0] * half


def classifier_loss(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary discrimination: ℓ_g = mean over g's labelled responses (label 1 or 0; −1 = none) of
    −[y log σ(r) + (1 − y) log(1 − σ(r))], L = (1/B) Σ_g w_g ℓ_g."""
    known = labels >= 0
    bce = F.binary_cross_entropy_with_logits(scores, labels.clamp(min=0), reduction="none")
    per_element = (bce * known).sum(1) / known.sum(1).clamp(min=1)
    return (weights * per_element).sum() / len(scores)


def ranked_batch(tok, elements: Sequence[Ranked], idx: Sequence[int], max_len: int, fmt: str,
                 harmless_weight: float) -> dict:
    """The sequences of elements ``idx``, element by element (each on one shared prompt window,
    ``encode_responses``), with ``group``/``position`` [N] placing each in the [B, K] score matrix,
    ``labels`` [N] for the classifier and the elements' ``weights`` [B]."""
    seqs, group, position, labels = [], [], [], []
    for g, i in enumerate(idx):
        el = elements[i]
        seqs += encode_responses(tok, el.prompt, list(el.responses), max_len, fmt=fmt)
        group += [g] * len(el.responses)
        position += range(len(el.responses))
        labels += classifier_labels(len(el.responses))
    batch = pad_batch(seqs, tok.pad_token_id)
    batch.update(group=torch.tensor(group), position=torch.tensor(position), labels=torch.tensor(labels),
                 weights=element_weights([elements[i].subset for i in idx], harmless_weight))
    return batch


def score_matrix(scores: torch.Tensor, batch: dict, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence values [N] as a [B, K] matrix (``fill`` off the real entries) and its mask."""
    b, k = len(batch["weights"]), int(batch["position"].max()) + 1
    out = torch.full((b, k), fill, dtype=scores.dtype, device=scores.device)
    valid = torch.zeros((b, k), dtype=torch.bool, device=scores.device)
    out[batch["group"], batch["position"]] = scores
    valid[batch["group"], batch["position"]] = True
    return out, valid

