"""The stage graph, in one place:

    data ──► base LM ──► π0 (context distilled) ──► PM (proxy)
                                     │           └─► test PM (judge, real HH only)
                                     └──► method.train(ctx) ──► policy ──► evaluators

On hh_synth the judge is the gold reward; on real HH it is a test PM trained on the other half of
the comparisons (Bai et al. §4.2), so no method is judged by the model it optimised against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from alignbench.config import Config
from alignbench.stages.base import build_base
from alignbench.stages.cache import Artifact
from alignbench.stages.distill import build_pi0
from alignbench.stages.preference import build_pm


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


def judge_kind(cfg: Config) -> str:
    if cfg.eval.judge != "auto":
        if cfg.eval.judge == "gold" and cfg.data.name != "hh_synth":
            from alignbench.config import ConfigError
            raise ConfigError("eval.judge: 'gold' exists only for data=hh_synth; use test_pm or auto")
        return cfg.eval.judge
    return "gold" if cfg.data.name == "hh_synth" else "test_pm"


def build_shared_stages(cfg: Config) -> SharedStages:
    base = build_base(cfg)
    pi0 = build_pi0(cfg, base)
    init = pi0 if cfg.stages.pm.init == "pi0" else base
    if judge_kind(cfg) == "test_pm":
        return SharedStages(base, pi0, build_pm(cfg, init, "a"), build_pm(cfg, init, "b"))
    return SharedStages(base, pi0, build_pm(cfg, init, "all"), None)
