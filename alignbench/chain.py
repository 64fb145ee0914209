"""Method chaining across runs: ``init.from_run=<sweep>/<run_id>`` starts this run's method from a
finished run's policy (Llama 2's RS fine-tuning then PPO, the DPO paper's Preferred-FT then DPO).

The source run is checked before any training: it must exist, have finished, carry policy weights
(an inference-time policy such as best-of-n has none) and be built on the same shared stages (base
LM, hence tokenizer, and π0) as this run. A chained run then

- starts its policy at the source's policy (``RunContext.start_path``) and anchors training to it or
  to π0 (``init.reference``); KL is measured against π0 and against that start either way;
- continues the source's cost: its counters (tokens, PM calls, FLOPs, annotations, seconds) are
  added at the start, so every later point and metrics.json show the chain's total;
- records the chain in metrics.json ``"chain"``: the source's chain (or its single stage) and this
  run's stage(s), each ``{"method", "config", "run"}``.

A ``<sweep>`` is a sweep directory path, or a bare sweep name under the sweeps root (the parent of
``paths.sweep_dir``, ``sweeps/`` by default).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alignbench.config import Config, ConfigError
from alignbench.cost import Cost

KEY = "init.from_run"
# the shared stages a continued policy must share with its source: the base LM (its tokenizer) and π0
SAME_STAGES = ("base", "pi0")
COST_COUNTERS = ("tokens_trained", "tokens_generated", "pm_calls", "flops", "annotations")


@dataclass(frozen=True)
class SourceRun:
    """A finished run a chain continues from."""
    run_dir: Path
    policy: Path
    metrics: dict

    @property
    def cost(self) -> dict:
        return self.metrics["cost"]

    @property
    def chain(self) -> list[dict]:
        """Its chain of stages: its own ``"chain"``, or the run itself as the single stage."""
        label = run_label(self.run_dir.parent.parent, self.run_dir.name)
        return self.metrics.get("chain") or [{"method": self.metrics.get("family") or self.metrics["method"],
                                              "config": self.metrics["config"], "run": label}]


def run_label(sweep_dir, run_id: str) -> str:
    """How a chain names a run: ``<sweep name>/<run_id>`` (the form init.from_run takes)."""
    return f"{Path(sweep_dir).name}/{run_id}"


def resolve_run_dir(spec: str, sweep_dir: str) -> Path:
    """``<sweep>/<run_id>`` -> ``<sweep dir>/runs/<run_id>``: the sweep is a directory when one
    exists at that path, else a sweep name under the sweeps root (the parent of ``sweep_dir``)."""
    sweep, _, run_id = spec.rstrip("/").rpartition("/")
    if not sweep or not run_id:
        raise ConfigError(f"{KEY}: expected <sweep>/<run_id>, got {spec!r}")
    sweep_path = Path(sweep)
    if not sweep_path.is_dir():
        sweep_path = Path(sweep_dir).parent / sweep
    return sweep_path / "runs" / run_id


def check_source(cfg: Config) -> Optional[SourceRun]:
    """The source run of ``init.from_run`` (None when unset), checked for everything that needs no
    shared stage: it exists, has finished, and has policy weights. Raises ConfigError naming the key."""
    spec = cfg.init.from_run
    if not spec:
        return None
    run_dir = resolve_run_dir(spec, cfg.paths.sweep_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{KEY}: no run directory {run_dir} (from {spec!r})")
    status = _status(run_dir)
    if status != "done" or not (run_dir / "DONE").exists():
        raise ConfigError(f"{KEY}: run {run_dir} has not finished (status: {status}); "
                          f"only a finished run can start a chain")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    policy = run_dir / metrics.get("info", {}).get("policy", "policy")
    if not (policy / "config.json").is_file():
        raise ConfigError(f"{KEY}: run {run_dir} ({metrics.get('family', metrics.get('method'))}) has no policy "
                          f"weights (an inference-time policy such as best-of-n, or π0 itself); a chain continues "
                          f"a trained policy")
    return SourceRun(run_dir=run_dir, policy=policy, metrics=metrics)


def check_stages(source: SourceRun, stage_keys: dict) -> None:
    """The source was built on this run's base LM (tokenizer) and π0, else ConfigError naming which differs."""
    theirs = source.metrics.get("stages", {})
    for stage in SAME_STAGES:
        if theirs.get(stage) != stage_keys.get(stage):
            raise ConfigError(f"{KEY}: run {source.run_dir} was built on another {stage} stage than this run "
                              f"(stage key {theirs.get(stage)} vs {stage_keys.get(stage)}): a different "
                              f"{'base LM and tokenizer' if stage == 'base' else 'π0'}; use the same data, "
                              f"model and stages settings")


def add_cost(cost: Cost, saved: dict) -> None:
    """Continue a source run's spending: each counter of ``saved`` (a ``Cost.as_dict``) is added to
    ``cost``'s, and its method and measurement seconds to the clock (wall_s = now − started − measure_s,
    so ``started`` moves back by both)."""
    for key in COST_COUNTERS:
        setattr(cost, key, getattr(cost, key) + type(getattr(cost, key))(saved.get(key, 0)))
    cost.measure_s += float(saved.get("measure_s", 0.0))
    cost.started -= float(saved["wall_s"]) + float(saved.get("measure_s", 0.0))


def chain_record(source: Optional[SourceRun], own: list[dict]) -> Optional[list[dict]]:
    """metrics.json ``"chain"``: the source's stages then this run's (``own``); None for a run that
    is no chain (no source, and not a chain method)."""
    if source is None and not any("stage" in s for s in own):
        return None
    return (source.chain if source is not None else []) + own


def own_stages(family: str, config_id: str, run: str, info: dict) -> list[dict]:
    """This run's stages: a chain method's (its ``info["stages"]``, each with its index as
    ``stage``), or the run itself."""
    stages = info.get("stages") if family == "chain" else None
    if not stages:
        return [{"method": family, "config": config_id, "run": run}]
    return [{"method": s["method"], "config": s["config"], "run": run, "stage": s["stage"]} for s in stages]


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "status.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return "no status.json"
