"""What a run spends (``Cost``), the cap on it (``Budget``), and the FLOPs arithmetic.

A cost users can compare across methods: training tokens, generated tokens, PM calls, estimated
compute in FLOPs and wall-clock seconds. Measurement (log points, the best-of-n curve, the final
evaluation) is free: its seconds are kept apart in ``measure_s`` and left out of ``wall_s``, and it
never charges tokens, PM calls or FLOPs.

FLOPs follow the usual transformer estimate (Kaplan et al. 2020, arXiv 2001.08361, §2.1): a forward
pass costs 2·N per token and a training step (forward + backward) 6·N per token, N the parameter
count of the model involved (all of its parameters, embeddings included: at the sizes this bench
runs, a tiny model's embeddings are a large share of its compute). Attention's extra
context-length term is left out, as in that estimate.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional


class BudgetExceeded(RuntimeError):
    """Raised by a charged operation (a sampling batch, a PM batch, a forward or an optimiser step)
    when the run's budget is already spent; the message is the reason (``budget.pm_calls=... reached``).
    Every method's loop catches it and stops cleanly."""


def forward_flops(n_params: int, tokens: int) -> float:
    """FLOPs of a forward pass over ``tokens`` tokens: 2·N·tokens."""
    return 2.0 * n_params * tokens


def train_flops(n_params: int, tokens: int) -> float:
    """FLOPs of a training step (forward + backward) over ``tokens`` tokens: 6·N·tokens."""
    return 6.0 * n_params * tokens


@dataclass
class Cost:
    """A run's spending. ``wall_s`` is elapsed time minus measurement (``measure_s``), including a
    measurement still in progress, so a point logged during measurement reads the same as one after."""
    tokens_trained: int = 0
    tokens_generated: int = 0
    pm_calls: int = 0
    flops: float = 0.0
    annotations: int = 0  # preference labels bought from an annotator (iterated online RLHF)
    measure_s: float = 0.0  # seconds spent measuring, finished measurements only
    # the same seconds, this process's only: never restored from a checkpoint, so a resumed run's
    # wall-time breakdown (alignbench.walltime) covers this attempt, as its clock does
    measured_here_s: float = 0.0
    started: float = field(default_factory=time.time)
    _measuring_since: Optional[float] = field(default=None, repr=False, compare=False)
    _depth: int = field(default=0, repr=False, compare=False)  # nesting of measuring()

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Time spent inside is measurement: added to ``measure_s``, left out of ``wall_s``.
        Re-entrant: nested measurements count once (the outermost)."""
        if self._depth == 0:
            self._measuring_since = time.time()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._end_measurement()

    @contextlib.contextmanager
    def charging(self) -> Iterator[None]:
        """Suspend a measurement in progress for a spend the method is charged for, made from inside
        it: best-of-n serving the evaluation prompts during the final evaluation."""
        depth, self._depth = self._depth, 0
        if depth:
            self._end_measurement()
        try:
            yield
        finally:
            self._depth = depth
            if depth:
                self._measuring_since = time.time()

    def _end_measurement(self) -> None:
        seconds = time.time() - self._measuring_since
        self.measure_s += seconds
        self.measured_here_s += seconds
        self._measuring_since = None

    def measured_s(self, now: Optional[float] = None) -> float:
        """Measurement seconds so far, the one in progress included."""
        now = time.time() if now is None else now
        return self.measure_s + (now - self._measuring_since if self._measuring_since is not None else 0.0)

    def wall_s(self, now: Optional[float] = None) -> float:
        """Seconds the method itself has run: elapsed minus measurement."""
        now = time.time() if now is None else now
        return now - self.started - self.measured_s(now)

    def restore(self, saved: dict) -> None:
        """Continue the costs of a checkpoint (``as_dict`` of the run that wrote it); a checkpoint
        written before FLOPs and measurement were recorded lacks those two and restarts them at 0."""
        self.tokens_trained, self.tokens_generated = saved["tokens_trained"], saved["tokens_generated"]
        self.pm_calls, self.flops = saved["pm_calls"], float(saved.get("flops", 0.0))
        self.annotations = int(saved.get("annotations", 0))
        self.measure_s = float(saved.get("measure_s", 0.0))
        self.started = time.time() - saved["wall_s"] - self.measure_s

    def as_dict(self) -> dict:
        now = time.time()
        return {"wall_s": round(self.wall_s(now), 3), "tokens_trained": self.tokens_trained,
                "tokens_generated": self.tokens_generated, "pm_calls": self.pm_calls, "flops": self.flops,
                "annotations": self.annotations, "measure_s": round(self.measured_s(now), 3)}


# What each kind of charged operation spends, by Cost field name (see Budget.exhausted)
SAMPLE_USES = ("tokens_generated", "flops", "wall_s")
SCORE_USES = ("pm_calls", "flops", "wall_s")
STEP_USES = ("flops", "wall_s")  # an optimiser step, or a no-grad forward run for training
ANNOTATE_USES = ("annotations", "wall_s")  # labels bought from the (simulated) annotator
CONFIG_KEYS = {"pm_calls": "pm_calls", "tokens_generated": "generated_tokens", "flops": "flops",
               "wall_s": "wall_seconds", "annotations": "annotations"}  # Cost field -> budget.<key>


@dataclass
class Budget:
    """Matched-cost cap shared by every method in a sweep (None: no cap on that quantity). A run's
    context checks it before every charged operation and raises BudgetExceeded when it may not run."""
    pm_calls: Optional[int] = None
    generated_tokens: Optional[int] = None
    wall_seconds: Optional[float] = None  # the method's own seconds: measurement excluded
    flops: Optional[float] = None
    annotations: Optional[int] = None  # preference labels bought (iterated online RLHF)

    @property
    def caps(self) -> dict:
        """The set caps by Cost field name (what a planned spend must fit; see best-of-n)."""
        caps = {"pm_calls": self.pm_calls, "tokens_generated": self.generated_tokens, "flops": self.flops,
                "wall_s": self.wall_seconds, "annotations": self.annotations}
        return {k: v for k, v in caps.items() if v}

    def exhausted(self, cost: Cost, uses: Optional[tuple] = None) -> Optional[str]:
        """Why an operation spending ``uses`` (Cost field names; None: all) may not run, or None.

        It may not run once a cap it spends is reached (cost ≥ cap), nor once any cap is exceeded
        (cost > cap): the batch that went over the cap is paid for but never used. So a budget of
        exactly two rollouts' PM calls trains on both rollouts, while one between two rollouts stops
        before any update on the second."""
        values = {"pm_calls": cost.pm_calls, "tokens_generated": cost.tokens_generated, "flops": cost.flops,
                  "wall_s": cost.wall_s(), "annotations": cost.annotations}
        for key, cap in self.caps.items():
            spends = uses is None or key in uses
            if values[key] > cap or (spends and values[key] >= cap):
                return f"budget.{CONFIG_KEYS[key]}={cap:g} reached"
        return None
