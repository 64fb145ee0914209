"""The stage graph, in one place:

    data ──► base LM ──► π0 (context distilled) ──► PM (proxy)
                                     │           ├─► test PM (judge, real HH only)
                                     │           └─► safety PM, helpfulness PM (reward=safety_helpful;
                                     │               the safety PM also for targeted safety distillation)
                                     ├──► safety context distillation (stages.pi0.safety_preprompt)
                                     │    └──► GAtt (stages.pi0.gatt): the π0 methods start from
                                     └──► method.train(ctx) ──► policy ──► evaluators

On hh_synth the judge is the gold reward; on real HH it is a test PM trained on the other half of
the comparisons (Bai et al. §4.2), so no method is judged by the model it optimised against, and
no method consumes the judge's comparisons (alignbench.stages.access says who sees what).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from alignbench import frozen_trunk, packing
from alignbench.config import Config
from alignbench.data.hh import check_hh_folder
from alignbench.models import check_gguf
from alignbench.stages.access import judge_kind, pm_parts
from alignbench.stages.base import build_base
from alignbench.cache import Artifact
from alignbench.stages.distill import build_pi0
from alignbench.stages.gatt import build_gatt_pi0, check_gatt
from alignbench.stages.preference import build_pm, check_judgements
from alignbench.stages.reward import build_reward_pms, check_reward
from alignbench.stages.safety_distill import build_safety_pi0, check_safety_distill


@dataclass(frozen=True)
class SharedStages:
    base: Artifact
    pi0: Artifact
    pm: Artifact
    judge_pm: Optional[Artifact]  # None when the judge is the gold reward
    safety_pm: Optional[Artifact] = None  # Llama 2's safety PM (reward=safety_helpful, targeted distillation)
    helpful_pm: Optional[Artifact] = None  # and its helpfulness PM (reward=safety_helpful)
    # the π0 stages ``pi0`` was built on, when later stages (safety context distillation, GAtt)
    # replaced the HHH π0: the HHH π0 first (every PM starts from it); empty when ``pi0`` is it
    earlier_pi0: tuple = ()

    @property
    def pm_init_lm(self) -> Artifact:
        """The π0 the PMs are trained from (stages.pm.init=pi0): the HHH π0, not a later one."""
        return self.earlier_pi0[0] if self.earlier_pi0 else self.pi0

    def artifacts(self) -> dict:
        """name -> every stage this run uses (the HHH π0 under "hhh_pi0" when it is not ``pi0``)."""
        earlier = [("hhh_pi0" if i == 0 else a.stage, a) for i, a in enumerate(self.earlier_pi0)]
        named = [("base", self.base), *earlier, ("pi0", self.pi0), ("pm", self.pm), ("judge_pm", self.judge_pm),
                 ("safety_pm", self.safety_pm), ("helpful_pm", self.helpful_pm)]
        return {name: a for name, a in named if a is not None}

    def keys(self) -> dict:
        return {name: a.key for name, a in self.artifacts().items()}

    def reused(self) -> dict:
        return {a.stage: a.reused for a in self.artifacts().values()}


__all__ = ["SharedStages", "build_shared_stages", "check_inputs", "judge_kind"]


def check_inputs(cfg: Config) -> None:
    """The files a run reads before it trains: the GGUF checkpoint (model.kind=gguf) and the local HH
    folder (data=hh_rlhf with data.path). A missing one is a one-line error naming the fix."""
    check_gguf(cfg.model)
    if cfg.data.name == "hh_rlhf":
        check_hh_folder(cfg.data.path, cfg.data.subsets, cfg.data.source_splits)


def build_shared_stages(cfg: Config) -> SharedStages:
    """Which PM sees which comparisons is decided in alignbench.stages.access."""
    check_inputs(cfg)  # a missing GGUF or HH folder fails before anything is built
    check_judgements(cfg)  # a bad stages.pm.judgements fails before the base LM trains
    check_reward(cfg)  # and so does reward=safety_helpful on data without both harm groups
    check_safety_distill(cfg)  # and targeted safety distillation without a preprompt
    check_gatt(cfg)  # and stages.pi0.gatt on data without system instructions
    frozen_trunk.check_config(cfg)  # and a PM trunk cache without a frozen trunk
    packing.configure(cfg.train.packing)  # the stages' training forwards, and the run's after them
    base = build_base(cfg)
    hhh = build_pi0(cfg, base)  # the HHH context-distilled π0: the PMs start from it
    init = hhh if cfg.stages.pm.init == "pi0" else base
    proxy, judge = pm_parts(cfg)
    safety, helpful = build_reward_pms(cfg, init)
    pm, judge_pm = build_pm(cfg, init, proxy), build_pm(cfg, init, judge) if judge else None
    safe = build_safety_pi0(cfg, hhh, safety)  # hhh itself when stages.pi0.safety_preprompt=none
    pi0 = build_gatt_pi0(cfg, safe)  # the π0 methods start from (safe itself without GAtt)
    chain = [hhh]  # the π0 stages in build order, each once
    for a in (safe, pi0):
        if a is not chain[-1]:
            chain.append(a)
    return SharedStages(base, pi0, pm, judge_pm, safety_pm=safety, helpful_pm=helpful, earlier_pi0=tuple(chain[:-1]))
