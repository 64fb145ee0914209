"""Measure a model once: what a (KL, reward) point costs is paid once per distinct set of weights.

Measurement is deterministic given the weights (the held-out prompts, the evaluation seed, the
sampler, the PMs and the judge are fixed for a run). Yet a run measured the same weights twice:
its last log point and its final evaluation (the policy saved right after it), and every run of a
sweep measured π0 at step 0, once per run. On SmolLM2 on 2 CPU cores one point (128 samples, two
KL forwards, two PM forwards) takes minutes, so the repeats were a large share of a study.

``Measured`` is what a point reads from a model: its held-out samples, their proxy and judge scores
and its KL to π0 (and to the start). ``MeasureMemo`` keeps the last one in memory, keyed by a
fingerprint of the weights, and π0's on disk (``<paths.cache_dir>/measured/``) keyed by the
fingerprint and everything else a point depends on, so the other runs of a sweep reuse it. A
repeat of a point this run already logged is marked ``repeats_step`` in train_log.jsonl, and the
frontier counts each point once (``report.aggregate.train_points``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from alignbench.sampling import SampleBatch
from alignbench.cache import stable_hash, write_json_atomic

log = logging.getLogger(__name__)
MEASURE_VERSION = 1  # bump when the sampler, the scorers or the KL estimators change what a point reads


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (name, dtype, shape, bytes): equal exactly when the
    weights are. A tied head is listed under both names, so π0 and its untied copy (a policy under
    model.trainable_layers before its first step) are the same weights. About a second for 135M
    parameters on one core."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")  # 0-dim too
    return h.hexdigest()


@dataclass
class Measured:
    """What a (KL, reward) point reads from one set of weights."""
    samples: SampleBatch
    proxy: list
    judge: list
    kl: dict  # kl_k1, kl_k3 against π0; kl_k1_start, kl_k3_start against the start when there is one
    step: Optional[float] = None  # the step of this run's point that measured it (None: not logged here)

    def to_json(self) -> dict:
        return {"samples": dataclasses.asdict(self.samples), "proxy": self.proxy, "judge": self.judge, "kl": self.kl}

    @classmethod
    def from_json(cls, raw: dict) -> "Measured":
        return cls(SampleBatch(**raw["samples"]), raw["proxy"], raw["judge"], raw["kl"])


class MeasureMemo:
    """The last model measured in this run (memory) and π0's point across runs (disk).

    ``context``: everything besides the weights that a point depends on (stage keys, prompts,
    seeds, temperature, lengths, judge); ``disk_dir`` None keeps nothing on disk."""

    def __init__(self, context: dict, disk_dir: Optional[Path]):
        self.key = stable_hash({"version": MEASURE_VERSION, **context})
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.last: Optional[tuple[str, Measured]] = None

    def _file(self, prefix: str, material) -> Optional[Path]:
        """Where a measurement of ``material`` (weights' fingerprint, or texts) is kept; None: no disk."""
        return self.disk_dir / f"{prefix}{stable_hash({'key': self.key, **material})}.json" if self.disk_dir else None

    @staticmethod
    def _load(path: Optional[Path], parse):
        """``parse`` of the JSON at ``path``, or None when there is none (or it is torn or foreign)."""
        if path is None or not path.is_file():
            return None
        try:
            return parse(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:  # torn, foreign or just removed: measure afresh
            log.warning("measured: ignoring %s (%s)", path, e)
            return None

    @staticmethod
    def _save(path: Optional[Path], obj: dict) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, obj)

    def get(self, fp: str) -> tuple[Optional[Measured], bool]:
        """(the memo for these weights or None, whether it is this run's own)."""
        if self.last is not None and self.last[0] == fp:
            return self.last[1], True
        return self._load(self._file("", {"weights": fp}), Measured.from_json), False

    def scores(self, prompts: list, responses: list, score) -> tuple[list, list]:
        """(proxy, judge) of fixed texts (the dataset's chosen responses to the eval prompts, which
        every run of a sweep scores): ``score()`` once, then read from disk."""
        path = self._file("texts-", {"texts": [prompts, responses]})
        kept = self._load(path, lambda raw: (list(raw["proxy"]), list(raw["judge"])))
        if kept is not None:
            return kept
        proxy, judge = score()
        proxy, judge = [float(x) for x in proxy], [float(x) for x in judge]
        self._save(path, {"proxy": proxy, "judge": judge})
        return proxy, judge

    def put(self, fp: str, measured: Measured, to_disk: bool) -> None:
        self.last = (fp, measured)
        if to_disk:
            self._save(self._file("", {"weights": fp}), measured.to_json())
