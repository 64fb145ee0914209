"""Where a training run logs its (KL, reward) points: the schedule every method and the run context
share (below both, so neither imports the other for it)."""
from __future__ import annotations

import math
from typing import Any


def log_steps(planned_steps: int, n_points: int) -> set[int]:
    """The 1-based optimiser steps at which a run of ``planned_steps`` logs ``n_points`` evenly spread
    (KL, reward) points: s_i = ceil(i·S/n) for i = 1..n (S = planned_steps), so the last is S itself;
    every step when S ≤ n. Spacing over the PLANNED steps keeps the points where the run would put
    them even when a budget stops it early."""
    if planned_steps <= 0:
        return set()
    return {math.ceil(i * planned_steps / n_points) for i in range(1, n_points + 1)}


def point_steps(method_cfg: Any, planned_steps: int, n_points: int) -> set[int]:
    """Where a method logs: every ``method.eval_every`` steps when that is set (an explicit choice is
    honoured), else ``log_steps(planned_steps, n_points)`` (train.log_points)."""
    every = getattr(method_cfg, "eval_every", None)
    if every:
        return set(range(every, planned_steps + 1, every))
    return log_steps(planned_steps, n_points)
