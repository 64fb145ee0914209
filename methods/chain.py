"""Method chaining inside one run: ``method=chain`` with ``method.stages``, a list of method nodes
(``{name: rejection_sampling, mode: finetune, ...}``, each validated by its method's own config
dataclass on top of its conf/method/<name>.yaml defaults), run one after another. Each stage starts
from the previous stage's policy (the first from the run's start: π0, or init.from_run's policy)
and is anchored (DPO's reference, PPO's KL penalty) to that start (``method.reference=start``, the
DPO paper's recipe) or to π0 (``pi0``). KL is measured against π0 and against the stage's start.

Stages are sub-runs (alignbench.subruns): each has its own checkpoint and policy directories and a
done record, so a run killed inside stage i skips the finished stages and resumes stage i from its
own checkpoint. The stages share the run's cost, so it accumulates over the chain; their points go
to the run's train_log.jsonl with ``chain_stage`` and ``chain_method``, on one step axis.

A stage that returns only a sampler (best-of-n) has no policy to continue from: it may only be last.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, List

from omegaconf import OmegaConf

from alignbench.config import ConfigError, opt
from alignbench.policy_measures import method_family
from alignbench.methods import Method, MethodConfig, PolicyArtifact, get_method, nested_method_config
from alignbench.subruns import SubRun, resume_subruns

log = logging.getLogger(__name__)


def stage_config(node: Any, key: str) -> Any:
    """One stage's method config: the node on top of its method's shipped defaults
    (conf/method/<name>.yaml), validated by the method's dataclass; errors name ``key`` (e.g.
    ``method.stages[1].beta``)."""
    node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(node, dict) or not node.get("name"):
        raise ConfigError(f"{key}.name: each stage is a method node with a name, got {node!r}")
    try:
        cls = get_method(node["name"])
    except ConfigError as e:
        raise ConfigError(f"{key}.name: {str(e).split(': ', 1)[1]}") from e
    if cls.name == "chain":
        raise ConfigError(f"{key}.name: a chain's stage cannot be a chain itself")
    shipped = files("alignbench_conf").joinpath("method", f"{cls.name}.yaml")
    defaults = OmegaConf.create(shipped.read_text()) if shipped.is_file() else {}
    return cls, nested_method_config(cls, node, key, defaults)


def sampler_only(name: str, mcfg: Any) -> bool:
    """A stage that trains nothing and returns an inference-time sampler: best-of-n."""
    return method_family(name, mcfg) == "best_of_n"


def stage_label(mcfg: Any) -> str:
    """``{name k=v ...}`` of a stage's settings that differ from its method's dataclass defaults."""
    default = type(mcfg)()
    diff = [f"{k}={v}" for k, v in vars(mcfg).items() if k != "name" and v != getattr(default, k, None)]
    return " ".join([mcfg.name, *diff])


@dataclass
class ChainConfig(MethodConfig):
    name: str = "chain"
    # the methods run one after another, each a method node ({name: ..., its keys}); at least two
    stages: List[Any] = opt(factory=list)
    # each stage's training anchor: the policy it starts from (start) or π0 (pi0)
    reference: str = opt("start", choices=["start", "pi0"])

    def validate(self, prefix: str) -> None:
        if len(self.stages) < 2:
            raise ConfigError(f"{prefix}.stages: a chain needs at least two stages, got {len(self.stages)}")
        for i, node in enumerate(self.stages):
            _, mcfg = stage_config(node, f"{prefix}.stages[{i}]")
            if sampler_only(mcfg.name, mcfg) and i < len(self.stages) - 1:
                raise ConfigError(f"{prefix}.stages[{i}].mode: {mcfg.name} mode=best_of_n returns a sampler, "
                                  f"not a policy, so only the last stage can be one")

    def resolved(self) -> list[tuple[type, Any]]:
        return [stage_config(node, f"method.stages[{i}]") for i, node in enumerate(self.stages)]


class Chain(Method):
    """Methods run one after another, each from the previous one's policy (Llama 2's RS then PPO, the DPO paper's Preferred-FT then DPO)."""

    name = "chain"
    config_class = ChainConfig

    def train(self, ctx) -> PolicyArtifact:
        cfg: ChainConfig = ctx.method_cfg
        stages = cfg.resolved()
        subs = [SubRun(ctx, i, method_family(m.name, m)) for i, (_, m) in enumerate(stages)]
        first = resume_subruns(subs)
        start, reference = ctx.start_path, ctx.reference_path
        records, offset, artifact = [], 0, None
        for i, ((cls, mcfg), sub) in enumerate(zip(stages, subs)):
            done = sub.done()
            if i < first:  # finished before a restart: continue from its policy
                start, offset = ctx.out_dir / done["policy"], done["steps"]
                reference = start if cfg.reference == "start" else None
                records.append(done["record"])
                continue
            extra = {"chain_stage": i, "chain_method": sub.name}
            sub_ctx = sub.ctx(method_cfg=mcfg, start_path=start, reference_path=reference, step_offset=offset,
                              point_extra=extra)
            log.info("chain stage %d/%d: %s from %s", i + 1, len(stages), sub.name, start or "π0")
            if i > 0 and sub_ctx.checkpoint_state() is None:  # the stage's start, on the chain's curve
                sub_ctx.log_point(0, model=sub_ctx.load(start).eval(), label=f"stage {i} start")
            artifact = cls().train(sub_ctx)
            offset = max([offset, *_stage_steps(ctx.out_dir, i)])
            record = {"stage": i, "method": sub.name, "config": stage_label(mcfg), "steps": offset,
                      "info": artifact.info, **_last_kl(ctx.out_dir, i)}
            records.append(record)
            if artifact.path is None:  # a sampler (the last stage): nothing to continue or skip on resume
                break
            start = artifact.path
            reference = start if cfg.reference == "start" else None
            sub.mark_done(policy=_relative(start, ctx.out_dir), steps=offset, record=record)
        info = {"stages": records, "reference": cfg.reference}
        if artifact is not None and artifact.path is None:
            return PolicyArtifact(sampler=artifact.sampler, info={**artifact.info, **info})
        return PolicyArtifact(path=start, info={**info, "policy": _relative(start, ctx.out_dir)})


def _relative(path: Path, root: Path) -> str:
    """A policy path as the done record and metrics.json keep it: relative to the run directory
    (it moves with it) when inside it."""
    path = Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _stage_points(run_dir: Path, stage: int) -> list[dict]:
    log_file = run_dir / "train_log.jsonl"
    lines = log_file.read_text().splitlines() if log_file.exists() else []
    return [p for p in map(json.loads, lines) if p.get("chain_stage") == stage]


def _stage_steps(run_dir: Path, stage: int) -> list[float]:
    """The steps (on the chain's axis) of a stage's logged points: the next stage continues after the last."""
    return [p["step"] for p in _stage_points(run_dir, stage) if p["step"] >= 0]


def _last_kl(run_dir: Path, stage: int) -> dict:
    """The stage's KL at its last point, against π0 and against the stage's start."""
    points = _stage_points(run_dir, stage)
    last = points[-1] if points else {}
    return {k: last[k] for k in ("kl_k3", "kl_k3_start") if k in last}
