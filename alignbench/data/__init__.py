"""Data layer: every source yields PreferencePair records, split by a seeded, prompt-keyed hash.

``load_data(cfg.data)`` is the one entry point the stages and CLI use; methods get only their share
of it through the run context (``alignbench.stages.access`` decides who sees what).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
from dataclasses import dataclass

from alignbench.config import DataConfig, SynthConfig
from alignbench.data.hh import load_hh_rlhf
from alignbench.data.splits import data_stats, split_pairs
from alignbench.data.synth import generate_hh_synth
from alignbench.data.types import BAD_ROW_REASONS, DataError, PreferencePair, RejectedRow

__all__ = ["DataBundle", "load_data", "pairwise_config", "PreferencePair", "RejectedRow", "DataError", "BAD_ROW_REASONS"]


@dataclass(frozen=True)
class DataBundle:
    splits: dict  # "train" | "eval" | "test" -> list[PreferencePair]
    rejected: tuple  # RejectedRow, counted in data-stats and in stage records
    stats: dict

    @property
    def train(self) -> list[PreferencePair]:
        return self.splits["train"]

    @property
    def eval(self) -> list[PreferencePair]:
        return self.splits["eval"]

    @property
    def test(self) -> list[PreferencePair]:
        return self.splits["test"]


def load_data(cfg) -> DataBundle:
    """Load and split the configured data (memoised per config within a process)."""
    return _load(json.dumps(_as_dict(cfg), sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _load(cfg_json: str) -> DataBundle:
    raw = json.loads(cfg_json)
    raw["synth"] = SynthConfig(**raw["synth"])
    cfg = DataConfig(**raw)
    if cfg.name == "hh_synth":
        pairs, rejected = generate_hh_synth(cfg.synth), []
    else:
        pairs, rejected = load_hh_rlhf(cfg.path, list(cfg.subsets), list(cfg.source_splits), cfg.bad_rows)
    if cfg.max_pairs and cfg.max_pairs < len(pairs):  # a seeded sample across subsets, in file order
        keep = set(random.Random(cfg.seed).sample(range(len(pairs)), cfg.max_pairs))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    splits = split_pairs(pairs, dict(cfg.split), cfg.seed)
    stats = {"dataset": cfg.name, **data_stats(splits, rejected, cfg.bad_rows)}
    if cfg.name == "hh_rlhf":
        stats["rows_read_by_subset"] = _rows_read(stats["by_subset"], rejected)
    return DataBundle(splits, tuple(rejected), stats)


def pairwise_config(cfg):
    """``cfg`` (a DataConfig) with hh_synth's ``rank_k`` unset: the pairwise data on the same prompts
    and splits, which the base LM, π0 and every PM's held-out evaluation read."""
    if getattr(cfg.synth, "rank_k", None) is None:
        return cfg
    return dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, rank_k=None))


def _rows_read(kept_by_subset: dict, rejected) -> dict:
    """Rows in the files per subset: kept pairs plus rejected rows (subset = the file's folder)."""
    from pathlib import Path
    out = dict(kept_by_subset)
    for row in rejected:
        subset = Path(row.source.rsplit(":", 1)[0]).parent.name
        out[subset] = out.get(subset, 0) + 1
    return out


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)
