"""What each stage and method may see of the data, decided here and nowhere else.

On real HH the judge is a test PM trained on half "b" of the training comparisons and the proxy PM
on half "a" (Bai et al. 2022 §4.2). Everything that consumes labels or labelled responses must stay
inside the proxy half, or a method would fit the judge's own labels:

- proxy PM: half "a" (all training comparisons when the judge is the gold reward);
- judge (test PM): half "b";
- methods (``ctx.pairs``, ``ctx.train_prompts``: DPO, PPO and PPO-ptx, RRHF, RS, plugins) and the
  Preferred-FT π0: the proxy PM's comparisons, prompts included, to keep the rule simple;
- PM pretraining (PMP): only outside comparisons whose conversation is in no other part of the
  data (the other half, the eval and test splits), since the PMP folder may hold the same files;
- iterated online RLHF (``methods/iterated_rlhf.py``): on hh_synth the gold reward annotates and
  its PM starts from the proxy PM's comparisons (exactly those the proxy PM trained on: the first
  ``stages.pm.judgements`` when set) and buys the rest; on real HH half "a" is split again by conversation
  (``iterated_parts``): its PM starts from part "a1" and the annotator PM is trained on "a2", so
  the annotator is neither the judge nor the PM it labels for;
- evaluation: a seeded, subset-stratified sample of the prompts of ``eval.split``.

The base LM and context distillation read unlabelled dialogue text (chosen and rejected
transcripts, no label) of the whole training split, both halves: see docs/data.md ("What each stage sees").
"""
from __future__ import annotations

from typing import Optional

from alignbench.config import Config, ConfigError
from alignbench.data import load_data, pairwise_config
from alignbench.data.splits import conversation_key, pm_half, stratified_sample
from alignbench.data.types import harm_group

# Part of the PM and Preferred-FT π0 cache keys: bump when a rule above changes which pairs they see.
ACCESS_RULES = "conversation-halves-v2"


def judge_kind(cfg: Config) -> str:
    """The judge: "gold" (hh_synth's reward) or "test_pm" (a PM trained on half "b")."""
    if cfg.eval.judge != "auto":
        if cfg.eval.judge == "gold" and cfg.data.name != "hh_synth":
            raise ConfigError("eval.judge: 'gold' exists only for data=hh_synth; use test_pm or auto")
        return cfg.eval.judge
    return "gold" if cfg.data.name == "hh_synth" else "test_pm"


def pm_parts(cfg: Config) -> tuple[str, Optional[str]]:
    """(the proxy PM's part, the judge PM's part or None when the judge is the gold reward)."""
    return ("a", "b") if judge_kind(cfg) == "test_pm" else ("all", None)


def iterated_parts(cfg: Config) -> tuple[str, Optional[str]]:
    """(the part iterated RLHF's PM starts from, the annotator PM's part or None when the gold
    reward annotates): ("all", None) on hh_synth, ("a1", "a2") on real HH."""
    return ("a1", "a2") if judge_kind(cfg) == "test_pm" else (pm_parts(cfg)[0], None)


def iterated_comparisons(cfg: Config) -> tuple[list, list]:
    """(the comparisons of iterated RLHF's ``iterated_parts`` part, whose prompts it rolls out on and
    buys labels for; the pairwise test comparisons its retrained PMs are scored on, like every PM
    stage: measurement, never trained on). Its PMs' labels are their round-0 stage's only (with
    ``stages.pm.judgements`` a subset of this part: ``preference.pm_training_pairs``) plus the bought ones."""
    return pm_pairs(cfg, load_data(cfg.data), iterated_parts(cfg)[0]), load_data(pairwise_config(cfg.data)).test


def pm_pairs(cfg: Config, data, part: str) -> list:
    """The training comparisons of the PM of ``part`` ("all", "a", "b", or "a1"/"a2": ``iterated_parts``)."""
    return pm_half(data.train, part, cfg.data.seed)


def whitening_pairs(cfg: Config, group: str) -> list:
    """The comparisons a reward PM (``reward.kind=safety_helpful``, ``alignbench.stages.reward``)
    standardises its scores on, shared and retrained ones alike: the eval split's of its harm group
    (only responses are read, no label; the test split stays measurement)."""
    return [p for p in load_data(cfg.data).eval if harm_group(p.subset) == group]


def method_pairs(cfg: Config, data) -> list:
    """The only comparisons (and responses) a method or the Preferred-FT π0 may consume."""
    return pm_pairs(cfg, data, pm_parts(cfg)[0])


def method_prompts(cfg: Config, data) -> list[str]:
    """Distinct prompts of ``method_pairs``, in data order (what PPO and RS roll out on)."""
    return list(dict.fromkeys(p.prompt for p in method_pairs(cfg, data)))


def pmp_pairs(cfg: Config, data, part: str, pmp: list) -> tuple[list, int]:
    """(PMP comparisons the PM of ``part`` may pretrain on, how many were dropped): a PMP pair is
    dropped when its conversation key belongs to any data pair outside this PM's own comparisons."""
    own = {id(p) for p in pm_pairs(cfg, data, part)}
    other = {conversation_key(p.prompt) for split in data.splits.values() for p in split if id(p) not in own}
    kept = [p for p in pmp if conversation_key(p.prompt) not in other]
    return kept, len(pmp) - len(kept)


def eval_prompts(cfg: Config, data) -> tuple[list[str], list[dict]]:
    """The fixed evaluation prompts of every run and their ``{"subset", "n_turns"}``: ``eval.n_prompts``
    drawn from ``eval.split``, stratified by subset and seeded by ``data.seed`` (not the run's seed,
    so every method and seed is measured on the same prompts)."""
    return stratified_sample(data.splits[cfg.eval.split], cfg.eval.n_prompts, cfg.data.seed)


def chosen_responses(cfg: Config, data, prompts: list[str], split: Optional[str] = None) -> list[str]:
    """The dataset's chosen response to each of ``prompts`` in ``split`` (default ``eval.split``),
    from the prompt's first pair there (the pair ``stratified_sample`` files the prompt under). The
    win rate against it is the DPO paper's HH metric; the eval and test splits are never trained on."""
    first: dict[str, str] = {}
    for p in data.splits[split or cfg.eval.split]:
        first.setdefault(p.prompt, p.chosen)
    return [first[q] for q in prompts]


def selection_prompts(cfg: Config, data) -> list[str]:
    """``eval.selection_prompts`` prompts of the EVAL split, stratified and seeded like ``eval_prompts``:
    where a report chooses a family's best configuration, never on the prompts it reports. With
    eval.split=eval (tuning) the reported prompts are the EVAL split's too: they are left out first,
    so the two sets never share a prompt."""
    if cfg.eval.selection_prompts <= 0:
        return []
    pool = data.splits["eval"]
    if cfg.eval.split == "eval":
        reported = set(eval_prompts(cfg, data)[0])
        pool = [p for p in pool if p.prompt not in reported]
    return stratified_sample(pool, cfg.eval.selection_prompts, cfg.data.seed)[0]
