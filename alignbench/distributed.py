"""Multi-process training through accelerate, and bf16 autocast.

Launch one run on several processes with accelerate (or torchrun, whose environment accelerate
reads); a plain ``alignbench run`` is one process and everything here is a no-op:

    accelerate launch --multi_gpu --num_processes 4 -m alignbench.cli run method=dpo ...   # 4 GPUs, DDP
    torchrun --nproc_per_node 2 -m alignbench.cli run method=dpo train.device=cpu ...        # 2 CPU processes, gloo

What runs where:
- every rank trains. ``train.batch_size`` (or the method's) stays the *global* batch: each step
  splits it evenly across the ranks (``shard``) and DDP averages the gradients, so a step equals
  the single-process step on the same global batch, up to float summation order;
- the main rank alone measures (``ctx.log_point``), checkpoints, saves the policy and runs the final
  evaluation; costs are summed over ranks, and the budget decision is the main rank's;
- shared stages are built once by whichever process takes their file lock, single-process.

Only methods whose class sets ``supports_distributed = True`` accept several processes (the config
check says which). FSDP and DeepSpeed accelerate configs are refused before training: the methods
sample from the policy between steps on the main rank, which needs every parameter on that rank.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from alignbench.train import autocast


def launched_world_size() -> int:
    """Processes in this run as set by the launcher (accelerate launch, torchrun, or a submitit job
    with several tasks); 1 otherwise."""
    _export_submitit_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _export_submitit_env() -> None:
    """A submitit job with several tasks (SLURM ``hydra.launcher.tasks_per_node=4``, or the local
    executor's) runs the same Hydra job once per task: publish torch.distributed's env:// variables
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK) from submitit's job environment, so those tasks
    form one DDP run. Not under submitit, or already set by a launcher: nothing to do."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:  # set in submitit jobs only
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
        if JobEnvironment().num_tasks > 1:
            # each task keeps every GPU visible and picks cuda:LOCAL_RANK (accelerate's convention)
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):  # not inside a submitit job after all
        return


@functools.lru_cache(maxsize=None)
def _accelerator(cpu: bool):
    """One Accelerator per process (accelerate's state is a process-wide singleton); it starts the
    process group (gloo on CPU, NCCL on GPU) from the launcher's environment."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs
    # The other ranks wait while the main one builds a shared stage or evaluates: allow hours.
    acc = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
    if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        from alignbench.config import ConfigError
        raise ConfigError(f"accelerate config: distributed_type {acc.distributed_type.value} is not supported; "
                          f"alignbench trains with DDP (accelerate launch --multi_gpu, or torchrun)")
    return acc


@dataclass
class Dist:
    """The process's place in the run; rank 0 of 1 when not launched multi-process."""
    rank: int = 0
    world: int = 1
    device: Optional[torch.device] = None  # the rank's device under a launcher (cuda:LOCAL_RANK)
    accelerator: Any = None

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        if launched_world_size() <= 1:
            return cls()
        cpu = device == "cpu" or not torch.cuda.is_available()
        acc = _accelerator(cpu)
        return cls(acc.process_index, acc.num_processes, acc.device, acc)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: DDP-wrapped under a launcher (its
        backward all-reduces the gradients). Parameters are shared with ``model``, so sampling,
        measuring and saving keep using the plain module."""
        return self.accelerator.prepare_model(model) if self.enabled else model

    def shard(self, items: list) -> list:
        """This rank's contiguous part of a global batch (the batch size divides evenly: checked
        with the config)."""
        if not self.enabled:
            return items
        if len(items) % self.world:
            raise ValueError(f"a global batch of {len(items)} does not split over {self.world} processes")
        n = len(items) // self.world
        return items[self.rank * n:(self.rank + 1) * n]

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sums of integers over ranks (every rank must call it)."""
        return self.all_sum(torch.tensor(values, dtype=torch.long)).tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over ranks (every rank must call it); on the tensor's device."""
        if not self.enabled:
            return t
        out = t.detach().to(self.device, copy=True)  # NCCL reduces GPU tensors, gloo CPU ones
        torch.distributed.all_reduce(out)
        return out.to(t.device)

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank: the inverse of ``shard``
        (every rank must call it)."""
        if not self.enabled:
            return list(items)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def seed(self, seed: int) -> int:
        """A sampling seed for this rank: rank 0 keeps ``seed`` (so a single-process run is
        unchanged), the others get their own streams."""
        return seed + 1_000_003 * self.rank

    def from_main(self, value):
        """The main rank's value on every rank (every rank must call it): decisions that must
        agree, such as stopping on a wall-clock budget."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wait(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def autocast_forward(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """bf16 mixed precision, as accelerate's ``mixed_precision="bf16"`` does it: the forward runs
    under torch.autocast (matmuls in bf16), weights and optimizer state stay fp32. Applied to the
    module itself, so training, sampling and measurement all see the same numerics."""
    if precision != "bf16":
        return model
    forward = model.forward

    def forward_in_bf16(*args, **kwargs):
        with autocast(precision, device):
            return forward(*args, **kwargs)

    model.forward = forward_in_bf16  # an instance attribute: nn.Module.__call__ (and DDP) use it
    return model


@contextlib.contextmanager
def main_only_logging(dist: Dist):
    """Quiet the other ranks' INFO logs for the duration (one process narrates)."""
    import logging
    root = logging.getLogger()
    level = root.level
    if not dist.is_main:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
