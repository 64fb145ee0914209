"""One job of a sweep: validate the config, get the shared stages (built once, cached), train the
method, evaluate the policy on the fixed held-out prompts, and write the run directory.

Run directory (``<sweep>/runs/<run_id>/``): config.yaml, status.json, train_log.jsonl,
samples.jsonl, metrics.json, results.csv and DONE (written last). A job whose run directory has
DONE is skipped; one that fails records the error and leaves the rest of the sweep running.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from alignbench.chain import add_cost, chain_record, check_source, check_stages, own_stages, run_label
from alignbench.config import Config, to_config
from alignbench.distributed import Dist, launched_world_size, main_only_logging
from alignbench.memory import maybe_fix_mmap_threshold
from alignbench.methods import PolicyArtifact, get_method, method_config
from alignbench.models import pick_device, set_threads
from alignbench.precision import check_precision, precision_scope
from alignbench.cache import write_json_atomic
from alignbench.subruns import SUBRUNS_DIR
from alignbench.walltime import RunClock, RunTimes, stage_times

log = logging.getLogger(__name__)


def _id_parts(cfg: Config, overrides: Optional[list[str]]) -> tuple[list[str], str]:
    """The method's own overrides (sorted) and a hash suffix for any other override (paths and the
    experiment preset, which already name the sweep directory, excepted; the seed is not here)."""
    rest = [o.lstrip("+~") for o in (overrides or []) if not re.match(r"^[+~]*(method|seed|experiment|paths\.[\w.]+)=", o)]
    # a named configuration (conf/frontier/<name>.yaml) is the run's own: its name, not a hash
    own = sorted(o.split("=", 1)[1] if o.startswith("frontier=") else o for o in rest
                 if o.startswith(("method.", "frontier=")))
    other = sorted(o for o in rest if not o.startswith(("method.", "frontier=")))
    return own, ("_cfg-" + hashlib.sha256("\n".join(other).encode()).hexdigest()[:8]) if other else ""


def _clean_id(rid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", rid)[:200]


def run_id_for(cfg: Config, overrides: Optional[list[str]] = None) -> str:
    """Readable and stable across re-runs: method, seed, the method's own overrides (what a sweep
    over hyperparameters varies), then a short hash of any other override (paths and the
    experiment preset, which already name the sweep directory, excepted)."""
    own, other = _id_parts(cfg, overrides)
    return _clean_id("_".join([f"{cfg.method['name']}_s{cfg.seed}", *own]) + other)


def config_id_for(cfg: Config, overrides: Optional[list[str]] = None) -> str:
    """The configuration a run belongs to: its run id without the seed part (``dpo``,
    ``dpo_method.beta=0.1``, ``ppo_cfg-1a2b3c4d``). Runs that share it differ only by seed, so the
    report aggregates across them and never across configurations."""
    own, other = _id_parts(cfg, overrides)
    return _clean_id("_".join([cfg.method["name"], *own]) + other)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def validate(cfg_node: DictConfig) -> tuple[Config, object, type]:
    """Everything that can be checked before training: fails fast, naming the key."""
    cfg = to_config(cfg_node)
    method_cls = get_method(cfg.method.get("name", ""))
    mcfg = method_config(method_cls, cfg.method)
    from alignbench.stages.graph import check_inputs, judge_kind
    judge_kind(cfg)
    check_inputs(cfg)  # the GGUF file and the HH folder exist
    check_source(cfg)  # init.from_run: exists, finished, has weights (its stages are checked once built)
    for key, path in (("paths.sweep_dir", cfg.paths.sweep_dir), ("paths.cache_dir", cfg.paths.cache_dir)):
        check_writable(key, Path(path))
    check_distributed(cfg, mcfg, method_cls, launched_world_size())
    return cfg, mcfg, method_cls


def check_distributed(cfg: Config, mcfg, method_cls, world: int) -> None:
    """Under a multi-process launch: the method must support it, and its global batch must split
    evenly over the processes (else a step would not equal the single-process step)."""
    if world <= 1:
        return
    from alignbench.config import ConfigError
    if not method_cls.supports_distributed:
        raise ConfigError(f"method={method_cls.name}: multi-process training is not supported by this method "
                          f"(launched with WORLD_SIZE={world}); run it as one process")
    for key, batch in mcfg.global_batches(cfg.train).items():
        if batch % world:
            raise ConfigError(f"{key}: the global batch ({batch}) must divide evenly over the {world} processes")


def check_writable(key: str, path: Path) -> None:
    """Fail before any training when an output directory cannot be written (missing permission,
    a file in the way, a full disk), naming the config key."""
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        from alignbench.config import ConfigError
        raise ConfigError(f"{key}: cannot write to {path}: {e.strerror or e}") from e


def run_job(cfg_node: DictConfig, overrides: Optional[list[str]] = None) -> dict:
    cfg, mcfg, method_cls = validate(cfg_node)
    dist = Dist.from_env(cfg.train.device)
    device = dist.device or pick_device(cfg.train.device)  # the device every stage and the method run on
    check_precision(cfg.train.precision, device)  # bf16 where the device has none: fails before any training
    run_dir = Path(cfg.paths.sweep_dir) / "runs" / run_id_for(cfg, overrides)
    config_id = config_id_for(cfg, overrides)
    if (run_dir / "DONE").exists():
        log.info("run %s is complete; skipping", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    status = {"status": "running", "error": None, "config": config_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if dist.is_main:  # one process owns the run directory
        _clear_incomplete(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node, resolve=True))
        write_json_atomic(run_dir / "status.json", status)
        _update_index(cfg)
    dist.wait()
    try:
        with main_only_logging(dist), precision_scope(cfg.train.precision, device):
            metrics = _train_and_evaluate(cfg, mcfg, method_cls, run_dir, dist, config_id)
        if dist.is_main:
            status.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            write_json_atomic(run_dir / "status.json", status)
            (run_dir / "DONE").write_text("")
        return metrics
    except BaseException as e:
        status.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        # another rank's error is kept beside the main status (the launcher stops the main one)
        write_json_atomic(run_dir / ("status.json" if dist.is_main else f"status.rank{dist.rank}.json"), status)
        raise
    finally:
        if dist.is_main:
            _update_index(cfg)


# what a restart keeps of an earlier attempt: the mid-training checkpoint and finished sub-runs
# (alignbench.subruns), both written atomically
KEPT_ON_RESTART = ("checkpoint", SUBRUNS_DIR)


def _clear_incomplete(run_dir: Path) -> None:
    """An earlier attempt died or failed: never trust its files, except a complete mid-training
    checkpoint and finished sub-runs (written atomically), which the method resumes from."""
    if not run_dir.exists():
        return
    for p in run_dir.iterdir():
        if p.name not in KEPT_ON_RESTART:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _train_and_evaluate(cfg: Config, mcfg, method_cls, run_dir: Path, dist: Dist, config_id: str) -> dict:
    from alignbench.run_evaluation import build_context, final_evaluation
    from alignbench.stages.graph import build_shared_stages
    set_threads(cfg.train.num_threads)
    maybe_fix_mmap_threshold(cfg.model.kind != "tiny")  # a pretrained model fragments the heap
    clock = RunClock()
    stages = build_shared_stages(cfg)
    clock.stages_done()
    source = check_source(cfg)
    if source is not None:  # before any training: the source shares this run's base LM and π0
        check_stages(source, stages.keys())
    ctx = build_context(cfg, mcfg, run_dir, dist, stages=stages, source=source)
    clock.mark("setup", ctx.cost)
    try:
        set_seed(cfg.seed)
        method = method_cls()
        ctx.point_hooks = [*ctx.point_hooks, *method.point_hooks(ctx)]  # from π0's point on
        ctx.log_point(0, model=ctx.pi0(), label="pi0")
        if source is not None:  # the chain's start: its cost so far, then its policy's point
            add_cost(ctx.cost, source.cost)
            ctx.log_point(0, model=ctx.load(source.policy).eval(), label="start")
        artifact: PolicyArtifact = method.train(ctx)
        if not dist.is_main:  # the main process evaluates; the others' part ends with training
            return {}
        clock.mark("train", ctx.cost)
        with ctx.cost.measuring():  # free, except what an inference-time policy spends serving (Cost.charging)
            metrics = final_evaluation(ctx, artifact, config_id)
        own = own_stages(metrics["family"], config_id, run_label(cfg.paths.sweep_dir, run_dir.name), artifact.info)
        chain = chain_record(source, own)
        if chain is not None:
            metrics["chain"] = chain
        clock.mark("eval", ctx.cost)
        return _record_times(run_dir, metrics, clock.times(stage_times(stages)))
    finally:
        if ctx.tracker is not None:  # flushes the event files
            ctx.tracker.close()


def _record_times(run_dir: Path, metrics: dict, times: RunTimes) -> dict:
    """Add the run's wall-time breakdown to metrics.json and log it in one line."""
    metrics = {**metrics, "time": times.as_dict()}
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info(times.summary(run_dir.name))
    return metrics


# ``alignbench run`` puts its command line here; index.json keeps it (the report prints it at its top)
COMMAND_ENV = "ALIGNBENCH_COMMAND"


def _update_index(cfg: Config) -> None:
    """Rebuild <sweep>/index.json from the run directories (under a lock: jobs run in parallel)."""
    from filelock import FileLock
    sweep = Path(cfg.paths.sweep_dir)
    sweep.mkdir(parents=True, exist_ok=True)
    with FileLock(str(sweep / ".index.lock")):
        runs = []
        for d in sorted((sweep / "runs").glob("*/")):
            try:
                st = json.loads((d / "status.json").read_text())
            except (OSError, ValueError):
                st = {"status": "incomplete", "error": "no status.json"}
            if st.get("status") == "done" and not (d / "DONE").exists():
                st["status"] = "incomplete"
            meta = _run_meta(d)
            runs.append({"run_id": d.name, "dir": f"runs/{d.name}", **meta, "config": st.get("config"),
                         "status": st.get("status"), "error": st.get("error")})
        command = os.environ.get(COMMAND_ENV) or _read_index(sweep).get("command")
        write_json_atomic(sweep / "index.json", {"sweep": sweep.name, **({"command": command} if command else {}),
                                                 "runs": runs})


def _read_index(sweep: Path) -> dict:
    try:
        return json.loads((sweep / "index.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_meta(d: Path) -> dict:
    try:
        c = OmegaConf.load(d / "config.yaml")
        return {"method": c.method.name, "seed": int(c.seed)}
    except Exception:  # noqa: BLE001 - an unreadable config is reported as unknown, not fatal
        return {"method": None, "seed": None}


class SweepSummary(Callback):
    """Hydra callback: after a multirun, log what every job ended as (from index.json)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        path = Path(config.paths.sweep_dir) / "index.json"
        if not path.exists():
            return
        runs = json.loads(path.read_text())["runs"]
        by = {}
        for r in runs:
            by.setdefault(r["status"], []).append(r["run_id"])
        log.info("sweep %s: %s", path.parent, ", ".join(f"{len(v)} {k}" for k, v in sorted(by.items())))
        for r in runs:
            if r["status"] != "done":
                log.warning("  %s: %s %s", r["run_id"], r["status"], r.get("error") or "")
