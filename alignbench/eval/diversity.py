"""Diversity of a policy's samples (DPO paper Fig. 3; Llama 2 §5): distinct-n and self-BLEU.

Both read text only, tokenised the way sacrebleu tokenises for BLEU (its "13a" tokenizer: the WMT
mteval-v13a rules, punctuation split off words), so distinct-n and self-BLEU count the same tokens.
Lower distinct-n and higher self-BLEU mean less diverse samples ("RLHF reduces diversity").
"""
from __future__ import annotations

from typing import Sequence

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZE = Tokenizer13a()
# sentence-level BLEU: effective order (n-gram orders longer than the hypothesis are left out) and
# sacrebleu's default "exp" smoothing, as sacrebleu.sentence_bleu does
_BLEU = BLEU(tokenize="13a", effective_order=True)


def tokens(text: str) -> list[str]:
    """``text`` split into sacrebleu 13a tokens."""
    return _TOKENIZE(text.strip()).split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n = |unique n-grams| / |n-grams| over all ``texts`` together (Li et al. 2016), with
    13a tokens (``tokens``); n-grams never cross texts. 0.0 when the texts hold no n-gram."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [tuple(t[i:i + n]) for t in map(tokens, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(groups: Sequence[Sequence[str]]) -> float:
    """Self-BLEU (Zhu et al. 2018), 0-100: the mean over every sample y_i of a group (the k samples
    of one prompt) of sacrebleu's sentence BLEU of y_i against the group's other k−1 samples as
    references. Identical non-empty samples give 100; samples sharing no token give 0."""
    scores = []
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"self_bleu: each group needs at least 2 samples, got {len(group)}")
        for i, hyp in enumerate(group):
            refs = [r for j, r in enumerate(group) if j != i]
            scores.append(_BLEU.sentence_score(hyp, refs).score)
    if not scores:
        raise ValueError("self_bleu: no groups")
    return sum(scores) / len(scores)
