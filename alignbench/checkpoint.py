"""Mid-training checkpoints, so a pre-empted or killed job resumes where it stopped.

A checkpoint holds everything the next step depends on: model weights (safetensors), optimizer and
scheduler state, the RNG states (python, torch), the step and the method's own state (cost
counters, log lines). It is written to a temporary directory and renamed over the previous one, so
a kill during the write leaves the last complete checkpoint in place. Loading uses
``torch.load(weights_only=True)``: no pickled code is ever executed.

Batches are a pure function of (seed, step) (``train.batch_schedule``), so restoring the step and
the RNG states makes the resumed run see exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model, save_model

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: Path, every: int):
        self.dir, self.every = Path(directory), every

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int) -> bool:
        """After finishing step ``step`` (0-based)."""
        return self.enabled and (step + 1) % self.every == 0

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None,
             state: Optional[dict] = None, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
        """``state``: the method's JSON-serialisable state; ``tensors``: its tensor state (e.g. a
        torch.Generator's ``get_state()``)."""
        tmp = self.dir.with_name(self.dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))  # handles tied weights
        torch.save({"optimizer": optimizer.state_dict() if optimizer else None,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": py_state_to_list(random.getstate()),
                    "tensors": tensors or {}}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
        old = self.dir.with_name(self.dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint at step %d -> %s", step, self.dir)

    def restore(self, modules: dict[str, torch.nn.Module], optimizer=None, scheduler=None) -> Optional[dict]:
        """Load the last complete checkpoint into the given objects; returns its state (with
        "step", the last finished step, and "tensors") or None when there is none."""
        state = self.peek()
        if state is None:
            return None
        for name, module in modules.items():
            load_model(module, str(self.dir / f"{name}.safetensors"), device=str(next(module.parameters()).device))
        trainer = torch.load(self.dir / "trainer.pt", weights_only=True)
        if optimizer is not None and trainer["optimizer"] is not None:
            optimizer.load_state_dict(trainer["optimizer"])
        if scheduler is not None and trainer["scheduler"] is not None:
            scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        random.setstate(py_state_from_list(trainer["python_rng"]))
        state["tensors"] = trainer.get("tensors", {})
        log.info("resuming from checkpoint %s (step %d)", self.dir, state["step"])
        return state

    def peek(self) -> Optional[dict]:
        """The last checkpoint's JSON state without loading anything (None when there is none):
        lets a method rebuild objects that depend on it (e.g. a per-round optimizer) first."""
        if not self.enabled or not (self.dir / "state.json").exists():
            return None
        return json.loads((self.dir / "state.json").read_text())


def py_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def py_state_from_list(state) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)
