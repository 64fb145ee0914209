"""hh_synth: a procedurally generated, HH-formatted preference dataset with a gold reward.

It lets the whole pipeline (pretraining a tiny LM, context distillation, a preference model, PPO,
DPO, RRHF, best-of-n) run offline on a laptop, and it gives a ground-truth judge so that policy
samples can be scored the way Gao et al. (arXiv 2210.10760) score them: optimize a learned
*proxy* PM, measure with the *gold* reward.

The pieces:

- ``WORLD``: a small fictional world (people with a city, favourite colour, pet, job and age).
- Dialogues in exactly the HH format (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), 1 to
  ``max_turns`` Human turns. The last Human turn is one of five task families:
  ``arithmetic`` (small sums and products), ``lookup`` (a fact from ``WORLD``), ``string``
  (reverse / capitalise / count the letters of a short word), ``harmful`` (a mild request where
  refusing is right) and ``edgy`` (a benign request that sounds harmful, such as killing a python
  process, where refusing is wrong). A turn may depend on the previous one ("Now add 3 to that.",
  "And what is her pet?", "Now reverse the same word."); its task name then ends in ``+dep``.
- ``gold_reward(prompt, response)``: scores any response text by parsing the prompt against
  ``WORLD``. It never reads what the generator intended, only the text.
- A spurious feature, the stock phrase ``STOCK_PHRASE``: gold gives a small bonus for its first
  occurrence and a penalty for every repeat, but the labelling process prefers each occurrence
  by ``spurious_strength``, so a PM trained on the labels learns to like it beyond its worth.
- Labels are Bradley-Terry draws from the gold reward plus that spurious term:
  ``P(a chosen over b) = sigmoid((gold_a - gold_b + s * (phrases_a - phrases_b)) / T)``.
  The defaults make labels agree with the gold ordering on about 72% of pairs.
- Each pair is a :class:`PreferencePair` with subset ``hh_synth/harmless`` (the last request is
  harmful) or ``hh_synth/helpful`` (everything else, edgy requests included), source
  ``hh_synth:<i>`` and ``meta = {"gold_chosen", "gold_rejected", "task"}``.

- ``rank_k = K`` (InstructGPT's ranking data): each prompt gets K distinct responses ranked by the
  same annotator model, a Plackett–Luce draw (``gumbel_ranking``), so every pair inside a ranking
  is ordered by the Bradley-Terry probability above; the prompt is the pairwise data's prompt ``i``.

Generation is deterministic: pair ``i`` of seed ``s`` is drawn from its own
``random.Random("hh_synth:<s>:<i>")``, so a smaller ``n_pairs`` gives a prefix of a larger one and
nothing depends on global random state or on string hashing.

The package: ``world`` (the people and the templates), ``gold`` (the gold reward, which parses a
prompt against the world), ``generate`` (dialogues, responses and the annotator's labels).
"""
from __future__ import annotations

from alignbench.config import SynthConfig
from alignbench.data.synth.generate import generate_hh_synth, gumbel_ranking, label_gold_agreement, world_facts
from alignbench.data.synth.gold import (FALSE_REFUSAL, VIOLATION, GoldParts, GoldReward, ParsedTask, gold_parts,
                                        gold_reward, parse_task, safety_outcome, spurious_count)
from alignbench.data.synth.world import ATTRIBUTES, HUMAN_TAG, STOCK_PHRASE, TASK_FAMILIES, WORLD, Person

__all__ = [
    "ATTRIBUTES",
    "FALSE_REFUSAL",
    "HUMAN_TAG",
    "STOCK_PHRASE",
    "TASK_FAMILIES",
    "VIOLATION",
    "WORLD",
    "GoldParts",
    "GoldReward",
    "ParsedTask",
    "Person",
    "SynthConfig",
    "generate_hh_synth",
    "gold_parts",
    "gold_reward",
    "gumbel_ranking",
    "label_gold_agreement",
    "parse_task",
    "safety_outcome",
    "spurious_count",
    "world_facts",
]