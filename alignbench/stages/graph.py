"""The stage graph, in one place:

    data ──► base LM ──► π0 (context distilled) ──► PM (proxy)
                                     │           └─► test PM (judge, real HH only)
                                     └──► method.train(ctx) ──► policy ──► evaluators

On hh_synth the judge is the gold reward; on real HH it is a test PM trained on the other half of
the comparisons (Bai et al. §4.2), so no method is judged by the model it optimised against, and
no method consumes the judge's comparisons (alignbench.stages.access says who sees what).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from alignbench import packing
from alignbench.config import Config
from alignbench.stages.access import judge_kind, pm_parts
from alignbench.stages.base import build_base
from alignbench.stages.cache import Artifact
from alignbench.stages.distill import build_pi0
from alignbench.stages.preference import build_pm, check_judgements


@dataclass(frozen=True)
class SharedStages:
    base: Artifact
    pi0: Artifact
    pm: Artifact
    judge_pm: Optional[Artifact]  # None when the judge is the gold reward

    def keys(self) -> dict:
        out = {"base": self.base.key, "pi0": self.pi0.key, "pm": self.pm.key}
        if self.judge_pm:
            out["judge_pm"] = self.judge_pm.key
        return out

    def reused(self) -> dict:
        return {a.stage: a.reused for a in (self.base, self.pi0, self.pm, self.judge_pm) if a}


__all__ = ["SharedStages", "build_shared_stages", "judge_kind"]


def build_shared_stages(cfg: Config) -> SharedStages:
    """Which PM sees which comparisons is decided in alignbench.stages.access."""
    check_judgements(cfg)  # a bad stages.pm.judgements fails before the base LM trains
    packing.configure(cfg.train.packing)  # the stages' training forwards, and the run's after them
    base = build_base(cfg)
    pi0 = build_pi0(cfg, base)
    init = pi0 if cfg.stages.pm.init == "pi0" else base
    proxy, judge = pm_parts(cfg)
    return SharedStages(base, pi0, build_pm(cfg, init, proxy), build_pm(cfg, init, judge) if judge else None)
