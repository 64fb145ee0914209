"""The reward a method optimises: one proxy PM (``reward.kind=single``), or Llama 2's safety and
helpfulness PMs combined per response (``reward.kind=safety_helpful``, Touvron et al. 2023 §3.2.2).

The two PMs are shared stages (``pm-safety``: the harmless comparisons, hh_synth/harmless or real
HH's harmless-base; ``pm-helpful``: the helpful ones), trained like the proxy PM on the proxy PM's
part of the data, from the same init, so no method sees the judge's comparisons. ``SafetyHelpfulScorer``
has ``PMScorer``'s interface, so PPO, best-of-n, RS fine-tuning, RRHF and iterated RLHF use it
through ``ctx.score`` unchanged, and are charged for every token each PM reads.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from alignbench.config import Config, ConfigError
from alignbench.data import load_data
from alignbench.data.types import harm_group
from alignbench.stages.access import pm_pairs, pm_parts
from alignbench.cache import Artifact
from alignbench.stages.preference import PMScorer, build_pm, heldout_credits, stage_scorer

# what tag=classifier asks the safety PM to compare on a prompt (a refusal against a compliance)
PROBE_REFUSAL = " I'm sorry, I can't help with that."
PROBE_COMPLIANCE = " Sure, here is how to do it."


def whiten(scores: torch.Tensor, stats: dict) -> torch.Tensor:
    """(s − μ) / σ with a PM's held-out score statistics (``preference.score_stats``). A
    Bradley–Terry PM's scores have an arbitrary offset and scale, so this is what puts the two PMs
    on one scale and gives the threshold a meaning."""
    return (scores.double() - stats["mean"]) / stats["std"]


def uses_safety(safety: torch.Tensor, harmful: torch.Tensor, threshold: float) -> torch.Tensor:
    """The responses Llama 2's rule gives to the safety PM: tagged harmful or σ(z_s) < threshold."""
    return harmful.bool() | (torch.sigmoid(safety) < threshold)


def combine_rewards(safety: torch.Tensor, helpful: torch.Tensor, harmful: torch.Tensor,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 2's combination (§3.2.2), on whitened scores z_s, z_h:

        R_c = z_s   if the prompt is tagged harmful or σ(z_s) < threshold
              z_h   otherwise
        R   = whiten(logit(σ(R_c))) = R_c  (the scores are already whitened logits)

    ``harmful``: a bool tensor. Returns (R, used_safety) where ``used_safety`` marks the responses
    scored by the safety PM."""
    used_safety = uses_safety(safety, harmful, threshold)
    return torch.where(used_safety, safety, helpful), used_safety


def check_reward(cfg: Config) -> None:
    """``reward.kind=safety_helpful`` needs both harm groups among the PM's training comparisons:
    checked before any stage trains."""
    if cfg.reward.kind != "safety_helpful":
        return
    groups = {harm_group(p.subset) for p in pm_pairs(cfg, load_data(cfg.data), pm_parts(cfg)[0])}
    for group, example in (("harmless", "hh_synth/harmless or harmless-base"),
                           ("helpful", "hh_synth/helpful or a helpful-* subset")):
        if group not in groups:
            raise ConfigError(f"reward.kind: safety_helpful needs {group} comparisons ({example}) in the "
                              f"PM's training data, and data.subsets={list(cfg.data.subsets)} "
                              f"(data.name={cfg.data.name}) has none")


def needs_safety_pm(cfg: Config) -> bool:
    return cfg.reward.kind == "safety_helpful" or cfg.stages.pi0.safety_targeted


def build_reward_pms(cfg: Config, init: Artifact) -> tuple[Optional[Artifact], Optional[Artifact]]:
    """(safety PM, helpfulness PM) stages, each None when nothing needs it: the safety PM serves
    ``reward.kind=safety_helpful`` and targeted safety distillation, the helpfulness PM the former."""
    part = pm_parts(cfg)[0]
    safety = build_pm(cfg, init, part, harm="harmless") if needs_safety_pm(cfg) else None
    helpful = build_pm(cfg, init, part, harm="helpful") if cfg.reward.kind == "safety_helpful" else None
    return safety, helpful


class SafetyHelpfulScorer:
    """Two PMs behind ``PMScorer``'s interface: the safety PM scores every response, the
    helpfulness PM only those the rule gives to it (``combine_rewards``), so the tokens counted,
    and charged, are the tokens the two PMs read. ``harmful_tags`` maps a prompt to its tag
    (tag=subset); None asks the safety PM (tag=classifier, once per prompt, charged too)."""

    reads_prompt_text = True  # SampleScorer passes the samples' prompt texts to score_ids (the tag)

    def __init__(self, safety: PMScorer, helpful: PMScorer, stats: tuple[dict, dict], *, threshold: float,
                 harmful_tags: Optional[dict] = None, classifier_threshold: float = 0.5):
        self.safety, self.helpful, self.stats = safety, helpful, stats
        self.threshold, self.tags, self.classifier_threshold = threshold, harmful_tags, classifier_threshold
        self._classified: dict = {}
        self.used_safety = 0  # responses scored by the safety PM's rule, and all responses scored
        self.scored = 0
        # the interface ctx and SampleScorer read: N (both PMs share the init's size), tokenizer, batch
        self.model, self.tokenizer, self.fmt = safety.model, safety.tokenizer, safety.fmt
        self.batch_size, self.max_len, self.device = safety.batch_size, safety.max_len, safety.device

    def trunk_models(self) -> list:
        return [self.safety.model, self.helpful.model]

    @property
    def tokens(self) -> int:
        return self.safety.tokens + self.helpful.tokens

    @property
    def calls(self) -> int:
        return self.safety.calls + self.helpful.calls

    def harmful(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.tags is not None:
            missing = [p for p in prompts if p not in self.tags]
            if missing:
                raise ValueError(f"reward.tag=subset: a prompt is in no subset of the data ({missing[0][:80]!r}); "
                                 "use reward.tag=classifier")
            return torch.tensor([self.tags[p] for p in prompts], dtype=torch.bool)
        new = [p for p in dict.fromkeys(prompts) if p not in self._classified]
        if new:
            refuse = whiten(self.safety.score(new, [PROBE_REFUSAL] * len(new)), self.stats[0])
            comply = whiten(self.safety.score(new, [PROBE_COMPLIANCE] * len(new)), self.stats[0])
            flags = torch.sigmoid(refuse - comply) >= self.classifier_threshold
            self._classified.update(zip(new, flags.tolist()))
        return torch.tensor([self._classified[p] for p in prompts], dtype=torch.bool)

    def _combine(self, prompts: Sequence[str], safety_raw: torch.Tensor, helpful_score) -> torch.Tensor:
        """``helpful_score(index list)`` scores the responses at those indices with the helpfulness PM."""
        safety = whiten(safety_raw, self.stats[0])
        harmful = self.harmful(prompts)
        helpful = torch.zeros_like(safety)
        rest = [i for i, use in enumerate(uses_safety(safety, harmful, self.threshold).tolist()) if not use]
        if rest:
            helpful[rest] = whiten(helpful_score(rest), self.stats[1])
        reward, used = combine_rewards(safety, helpful, harmful, self.threshold)
        self.used_safety += int(used.sum())
        self.scored += len(reward)
        return reward.float()

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self._combine(prompts, self.safety.score(prompts, responses),
                             lambda idx: self.helpful.score([prompts[i] for i in idx], [responses[i] for i in idx]))

    def score_ids(self, prompt_ids, response_ids, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        if prompts is None:
            raise ValueError("reward.kind=safety_helpful scores sampled ids only with their prompt texts (for the tag)")
        return self._combine(prompts, self.safety.score_ids(prompt_ids, response_ids),
                             lambda idx: self.helpful.score_ids([prompt_ids[i] for i in idx],
                                                                [response_ids[i] for i in idx]))

    def score_pairs(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [p.prompt for p in pairs]
        return self.score(prompts, [p.chosen for p in pairs]), self.score(prompts, [p.rejected for p in pairs])


def subset_tags(cfg: Config) -> dict:
    """prompt → tagged harmful, from the data's subset labels (every split: a tag is a property of
    the prompt, like Llama 2's annotated prompt categories, not of a label)."""
    data = load_data(cfg.data)
    return {p.prompt: harm_group(p.subset) == "harmless" for split in data.splits.values() for p in split}


def combined_scorer(cfg: Config, safety: PMScorer, helpful: PMScorer, stats: tuple[dict, dict]) -> SafetyHelpfulScorer:
    """The two PMs combined with ``cfg.reward``'s threshold and tag (the shared stages' PMs, or
    iterated RLHF's retrained ones)."""
    return SafetyHelpfulScorer(safety, helpful, stats, threshold=cfg.reward.threshold,
                               harmful_tags=subset_tags(cfg) if cfg.reward.tag == "subset" else None,
                               classifier_threshold=cfg.reward.classifier_threshold)


def reward_scorer(cfg: Config, stages, device) -> PMScorer | SafetyHelpfulScorer:
    """What ``ctx.pm`` is: the proxy PM stage's scorer, or the two reward PMs combined."""
    if cfg.reward.kind == "single":
        return stage_scorer(stages.pm, device, fmt=cfg.data.format)  # a trained PM, or objective=lm's LM
    safety, helpful = (stage_scorer(a, device, fmt=cfg.data.format) for a in (stages.safety_pm, stages.helpful_pm))
    return combined_scorer(cfg, safety, helpful,
                           (stages.safety_pm.record["score_stats"], stages.helpful_pm.record["score_stats"]))


@contextmanager
def uncounted(scorer):
    """Scoring for measurement leaves ``used_safety`` / ``scored`` as they were: they count what the
    training reward scored (a single PM has no such counters)."""
    counts = (getattr(scorer, "used_safety", None), getattr(scorer, "scored", None))
    try:
        yield scorer
    finally:
        if counts[1] is not None:
            scorer.used_safety, scorer.scored = counts


def safety_share(used_safety: int, scored: int) -> Optional[float]:
    """used_safety_share = responses the safety PM's rule scored / all responses scored in training
    (None when nothing was scored)."""
    return used_safety / scored if scored else None


def tag_agreement(classified: Sequence[bool], tagged: Sequence[bool]) -> dict:
    """How the classifier's harmful flags c_i match the subset tags t_i on n prompts:
    agreement = Σ[c_i = t_i] / n, harmful_recall = Σ[c_i ∧ t_i] / Σ t_i,
    benign_flagged = Σ[c_i ∧ ¬t_i] / Σ ¬t_i (None over no prompt)."""
    c, t = torch.tensor(list(classified), dtype=torch.bool), torch.tensor(list(tagged), dtype=torch.bool)
    rate = lambda hits, over: float(hits.sum()) / int(over.sum()) if int(over.sum()) else None  # noqa: E731
    return {"tag_agreement": rate(c == t, torch.ones_like(t)), "harmful_recall": rate(c & t, t),
            "benign_flagged": rate(c & ~t, ~t), "n": len(t)}


def pm_heldout(artifact: Artifact) -> dict:
    """A PM stage's held-out accuracy (its ``heldout_scores.jsonl``: the pairwise test split, of its
    harm group for a reward PM): ``heldout_accuracy`` against the labels and ``heldout_gold_accuracy``
    on hh_synth, overall and per harm group, each with ``n_<metric>`` pairs (gold ties left out)."""
    recs = [json.loads(line) for line in (artifact.path / "heldout_scores.jsonl").read_text().splitlines()]
    out = {"stage": artifact.stage, "key": artifact.key}
    for (metric, group), credit in heldout_credits(recs).items():
        if credit.size:
            name = metric + ("" if group == "all" else f"_{group}")
            out[name], out[f"n_{name}"] = float(credit.mean()), int(credit.size)
    return out


def reward_pms(stages) -> dict:
    """``pm_heldout`` of the single proxy PM and of the reward PMs the run built (report: the reward
    PMs' held-out accuracy next to the single PM's)."""
    pms = {"single": stages.pm, "safety": stages.safety_pm, "helpful": stages.helpful_pm}
    return {name: pm_heldout(a) for name, a in pms.items()
            if a is not None and (a.path / "heldout_scores.jsonl").exists()}


def reward_record(cfg: Config, scorer, eval_prompts: Sequence[str], eval_meta: Sequence[dict],
                  counts: Optional[tuple[int, int]] = None) -> dict:
    """metrics.json's ``reward``: kind, threshold, tag, used_safety_share (of ``counts`` =
    (used_safety, scored) when the method trained against scorers of its own, iterated RLHF's, else
    of ``scorer``), and with tag=classifier its ``tag_agreement`` with the subset tags on the eval
    prompts (the classifier's PM calls here are measurement: run under the caller's measuring())."""
    if cfg.reward.kind == "single":
        return {"kind": "single", "threshold": None, "tag": None, "used_safety_share": None}
    used, scored = counts if counts is not None else (scorer.used_safety, scorer.scored)
    record = {"kind": cfg.reward.kind, "threshold": cfg.reward.threshold, "tag": cfg.reward.tag,
              "used_safety_share": safety_share(used, scored), "used_safety": used, "scored": scored}
    if cfg.reward.tag == "classifier":
        flags = scorer.harmful(list(eval_prompts)).tolist()
        record["classifier"] = tag_agreement(flags, [harm_group(m["subset"]) == "harmless" for m in eval_meta])
    return record
