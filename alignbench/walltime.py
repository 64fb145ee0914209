"""Where a run's wall-clock seconds go: metrics.json → ``time`` and the one-line summary
``alignbench run`` logs at the end of every run.

A run's seconds (this attempt's: a resumed run starts its clock again) split into phases that add
up to its total, every one measured:

- ``stages_s``: getting the shared stages: building the ones not in the cache (their build seconds
  are also in ``stages``), waiting for a parallel job that builds one, reading the records;
- ``setup_s``: the rest of the run's context: data, tokenizer, proxy PM and judge loading;
- ``train_s``: the method's own seconds: its training (checkpoints and saving the policy
  included) and, for an inference-time policy, serving the evaluation prompts; never measurement;
- ``measure_s``: measurement during training, timed by ``Cost.measuring``: every ``ctx.log_point``
  (π0's at step 0 included: held-out samples, proxy and judge scores, KL), ``ctx.sample_free`` /
  ``score_free``, best-of-n's curve pools;
- ``eval_s``: the final evaluation: held-out samples, scores, the final point, PM rows, NLP tasks
  and the run's files.

``stages`` records each shared stage the run used: its cache key, whether this run found it built
(``reused``), and the seconds its build took (``build_s``, from the stage record, whoever built it
and whenever) with when (``built_at``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from alignbench.cost import Cost

PHASES = ("stages_s", "setup_s", "train_s", "measure_s", "eval_s")


def stage_times(stages) -> dict:
    """Per shared stage (``SharedStages``) by name: key, reused, build_s and built_at."""
    return {a.stage: {"key": a.key, "reused": a.reused, "build_s": a.record.get("build_seconds"),
                      "built_at": a.record.get("built_at")}
            for a in stages.artifacts().values()}


@dataclass
class RunTimes:
    """The phases of one run (see the module docstring); seconds."""
    stages_s: float = 0.0
    setup_s: float = 0.0
    train_s: float = 0.0
    measure_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0
    stages: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}

    def summary(self, run_id: str) -> str:
        """One line: total and each phase, the stages this run built named with their seconds."""
        built = [f"{name} {s['build_s']:.1f}s" for name, s in self.stages.items()
                 if not s["reused"] and s.get("build_s") is not None]
        stages = f"stages {self.stages_s:.1f}s" + (f" (built {', '.join(built)})" if built else " (cached)")
        return (f"run {run_id} time: total {self.total_s:.1f}s = {stages} + setup {self.setup_s:.1f}s"
                f" + train {self.train_s:.1f}s + measurement {self.measure_s:.1f}s + evaluation {self.eval_s:.1f}s")


class RunClock:
    """Marks the phase boundaries of a run and splits the seconds between them into
    ``RunTimes``: measurement is what ``Cost.measuring`` timed (``Cost.measured_here_s``), the rest
    of a segment is the method's."""

    def __init__(self) -> None:
        self.start = time.time()
        self.stages_s = 0.0
        self._marks: dict[str, tuple[float, float]] = {}  # phase boundary -> (time, measured so far)

    def stages_done(self) -> None:
        self.stages_s = time.time() - self.start

    def mark(self, name: str, cost: Cost) -> None:
        """``name``: "setup" (the context is built), "train" (training ended) or "eval" (the
        final evaluation ended)."""
        if torch.cuda.is_initialized():  # queued kernels belong to the phase that launched them
            torch.cuda.synchronize()
        self._marks[name] = (time.time(), cost.measured_here_s)

    def times(self, stages: Optional[dict] = None) -> RunTimes:
        (t_setup, m_setup), (t_train, m_train), (t_eval, m_eval) = (self._marks[k] for k in ("setup", "train", "eval"))
        measure_s, eval_s = m_train - m_setup, m_eval - m_train
        return RunTimes(stages_s=self.stages_s, setup_s=t_setup - self.start - self.stages_s,
                        train_s=(t_eval - t_setup) - measure_s - eval_s, measure_s=measure_s, eval_s=eval_s,
                        total_s=t_eval - self.start, stages=stages or {})
