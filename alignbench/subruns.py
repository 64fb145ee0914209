"""Sub-runs: a method that runs other methods inside one run (a chain's stages, iterated RLHF's
rounds) gives each its own directory, so a killed run resumes like any other.

    <run>/subruns/<index>-<name>/checkpoint/   the sub-run's mid-training checkpoints (train.checkpoint_every)
                                /policy/       its trained policy (the next sub-run starts from it)
                                /done.json     written when it finished: the run's cost and train log
                                               at that moment, and what the method chose to keep

On a restart the runner keeps ``subruns/`` (``runner.KEPT_ON_RESTART``). The method skips every
sub-run with a ``done.json``, ``restore``s the last one (cost counters and train_log.jsonl continue
from there), and the unfinished sub-run resumes from its own checkpoint, which holds the later
costs and log. Everything is written atomically (``write_json_atomic``, the Checkpointer's renames).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from alignbench.cache import write_json_atomic

if TYPE_CHECKING:  # annotations only
    from alignbench.context import RunContext

SUBRUNS_DIR = "subruns"


class SubRun:
    """Sub-run ``index`` (0-based) called ``name`` of the run behind ``parent``."""

    def __init__(self, parent: "RunContext", index: int, name: str):
        self.parent, self.index, self.name = parent, index, name
        self.dir = Path(parent.out_dir) / SUBRUNS_DIR / f"{index:02d}-{name}"

    @property
    def policy_dir(self) -> Path:
        return self.dir / "policy"

    def done(self) -> Optional[dict]:
        """Its done record, or None while it has not finished."""
        path = self.dir / "done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def restore(self) -> dict:
        """Continue from this finished sub-run: the run's cost counters and train_log.jsonl as they
        were when it finished (a restart cleared the log). Returns its done record."""
        record = self.done()
        if record is None:
            raise RuntimeError(f"sub-run {self.dir} has not finished")
        self.parent.cost.restore(record["cost"])
        if self.parent.dist.is_main:
            (Path(self.parent.out_dir) / "train_log.jsonl").write_text(record["train_log"])
        return record

    def ctx(self, **changes) -> "RunContext":
        """The sub-run's context: its own checkpoint and policy directories, ``changes`` on top."""
        return self.parent.derive(checkpoint_dir=self.dir / "checkpoint", policy_dir=self.policy_dir, **changes)

    def mark_done(self, **info) -> dict:
        """Record that it finished (JSON-serialisable ``info`` kept with the cost and log); its
        mid-training checkpoint is no longer needed and is removed."""
        log_file = Path(self.parent.out_dir) / "train_log.jsonl"
        record = {"index": self.index, "name": self.name, "cost": self.parent.cost.as_dict(),
                  "train_log": log_file.read_text() if log_file.exists() else "", **info}
        if self.parent.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.dir / "done.json", record)
            shutil.rmtree(self.dir / "checkpoint", ignore_errors=True)
        return record


def resume_subruns(subruns: list[SubRun]) -> int:
    """The index of the first unfinished sub-run (len(subruns) when all are done), after restoring
    the run's cost and log from the last finished one before it."""
    first = next((i for i, s in enumerate(subruns) if s.done() is None), len(subruns))
    if first > 0:
        subruns[first - 1].restore()
    return first
