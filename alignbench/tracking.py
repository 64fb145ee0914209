"""Experiment tracking (``train.report_to``): one ``Tracker`` fans scalars out to every named backend.

- ``tensorboard`` (the default): event files under ``<run_dir>/tb/`` (a stage's under ``<stage>/tb/``);
- ``wandb``, ``trackio``, ``mlflow``: when installed (``alignbench.config`` checks that before training).

What is written: per optimiser step, the losses and the learning rate (``train/<name>``, from
``RunContext.log_step`` and ``alignbench.train.supervised_loop``); per log point, every number of
train_log.jsonl (``eval/<name>``: proxy and judge reward, KL, ...; ``cost/<name>``: tokens, PM
calls, FLOPs, seconds). Tracking only reads values the run computed: it never changes a metric.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

COST_KEYS = ("wall_s", "tokens_trained", "tokens_generated", "pm_calls", "flops", "annotations", "measure_s")


def scalars_of(values: dict) -> dict[str, float]:
    """The real numbers of ``values`` (bools, strings, None and containers are left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, log_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandbLike:
    """wandb, and trackio (wandb's API): module-level init, log and finish."""

    def __init__(self, module: str, log_dir: Path, run_name: str, config: dict):
        self.module = importlib.import_module(module)  # installed: checked by TrainConfig.validate
        self.module.init(project="alignbench", name=run_name, config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.module.log(scalars, step=step)

    def close(self) -> None:
        self.module.finish()


class _MLflow:
    def __init__(self, log_dir: Path, run_name: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": _TensorBoard, "wandb": functools.partial(_WandbLike, "wandb"),
            "trackio": functools.partial(_WandbLike, "trackio"), "mlflow": _MLflow}


class Tracker:
    """Scalars to every backend of ``report_to`` (names checked by ``TrainConfig.validate``);
    ``report_to=[]`` writes nothing. Steps never go backwards: a point logged at step −1 (the
    final evaluation) is written at the last step seen."""

    def __init__(self, log_dir: Path | str, report_to: Sequence[str], run_name: str = "",
                 config: Optional[dict] = None):
        self.log_dir = Path(log_dir)
        self.backends = [BACKENDS[name](self.log_dir, run_name or self.log_dir.parent.name, config or {})
                         for name in report_to]
        self.last_step = 0

    def log(self, scalars: dict, step: int, prefix: str = "") -> None:
        step = self.last_step if step < 0 else step
        self.last_step = max(self.last_step, step)
        values = {f"{prefix}{k}": v for k, v in scalars_of(scalars).items()}
        for backend in self.backends:
            backend.log(values, step)

    def log_step(self, step: int, **scalars) -> None:
        """One optimiser step's losses, learning rate, ... as ``train/<name>``."""
        self.log(scalars, step, "train/")

    def log_point(self, point: dict) -> None:
        """One train_log.jsonl point at its step: costs as ``cost/<name>``, every other number as
        ``eval/<name>`` (π0's point, the training points and the final one form one series each)."""
        numbers = {k: v for k, v in point.items() if k not in ("step", "seed")}
        self.log({k: v for k, v in numbers.items() if k not in COST_KEYS}, point["step"], "eval/")
        self.log({k: numbers[k] for k in COST_KEYS if k in numbers}, point["step"], "cost/")

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
