"""Read a sweep directory (see LAYOUT.md) into plain records, never failing on a bad run.

A run is usable ("done") only when its directory exists, it is not marked failed (in index.json or
status.json), it has DONE, and its files parse. Every other run keeps a ``mark`` the report shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from alignbench.data.types import DataError
from alignbench.eval.stats import read_rows


@dataclass
class RunRecord:
    run_id: str
    method: str
    seed: int | None
    dir: Path
    config: str = ""  # method plus its own overrides: the report's unit (see config_of)
    state: str = "done"  # done | failed | incomplete | missing | unreadable
    error: str | None = None
    rows: pd.DataFrame | None = None
    train_log: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    temperature_samples: list[dict] = field(default_factory=list)  # samples_by_temperature.jsonl; none in older runs
    metrics: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "done"

    @property
    def mark(self) -> str:
        if self.state in ("done", "missing"):
            return self.state
        return f"{self.state}: {self.error}"


@dataclass
class Sweep:
    name: str
    dir: Path
    runs: list[RunRecord]
    notes: list[str] = field(default_factory=list)
    command: str = ""  # the ``alignbench run`` command that made the sweep (index.json), when recorded

    @property
    def ok_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.ok]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


class _Unreadable(Exception):
    pass


def _read(run_dir: Path, name: str):
    path = run_dir / name
    try:
        if name.endswith(".csv"):
            return read_rows(path) if path.exists() else None
        return _read_jsonl(path) if name.endswith(".jsonl") else _read_json(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise _Unreadable(f"{name}: {exc}") from exc


def config_of(entry: dict, run_id: str, method: str, seed) -> str:
    """The run's configuration: index.json's ``config``, else its run id without the seed part
    (run ids are ``<method>_s<seed>[_<own overrides>][_cfg-<hash>]``, also in sweeps written before
    the field existed), else the method."""
    if entry.get("config"):
        return str(entry["config"])
    prefix = f"{method}_s{seed}"
    return method + run_id[len(prefix):] if seed is not None and run_id.startswith(prefix) else method


def _load_files(run: RunRecord) -> None:
    try:
        run.rows = _read(run.dir, "results.csv")
        run.train_log = _read(run.dir, "train_log.jsonl")
        run.samples = _read(run.dir, "samples.jsonl")
        run.temperature_samples = _read(run.dir, "samples_by_temperature.jsonl")
        run.metrics = _read(run.dir, "metrics.json")
        if isinstance(run.metrics, dict) and run.metrics.get("config"):
            run.config = str(run.metrics["config"])
    except _Unreadable as exc:
        run.state, run.error = "unreadable", str(exc)


def _load_run(sweep_dir: Path, entry: dict) -> RunRecord:
    run_id = str(entry.get("run_id", "?"))
    run_dir = Path(entry.get("dir") or Path("runs") / run_id)
    run_dir = run_dir if run_dir.is_absolute() else sweep_dir / run_dir
    seed = entry.get("seed")
    method, seed = str(entry.get("method", "?")), int(seed) if seed is not None else None
    run = RunRecord(run_id=run_id, method=method, seed=seed, dir=run_dir, config=config_of(entry, run_id, method, seed))
    try:
        status = _read_json(run_dir / "status.json")
    except (OSError, ValueError) as exc:
        status = {"status": "unreadable", "error": f"status.json: {exc}"}
    if "failed" in (entry.get("status"), status.get("status")):
        run.state, run.error = "failed", status.get("error") or entry.get("error") or "unknown error"
    elif not run_dir.is_dir():
        run.state = "missing"
    elif not (run_dir / "DONE").exists():
        run.state = "incomplete"
        run.error = f"no DONE (status {status.get('status') or entry.get('status') or 'unknown'})"
    else:
        _load_files(run)
    return run


def read_index(index_path: Path) -> dict:
    """``index.json`` as an object whose ``runs`` is a list of objects; anything else is a one-line
    DataError naming the file (and the line, or the entry)."""
    if not index_path.is_file():
        raise DataError(f"{index_path}: no index.json; is {index_path.parent} a sweep directory "
                        f"(alignbench run -m writes one)?")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{index_path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{index_path}:{exc.lineno}: not JSON ({exc.msg})") from None
    except OSError as exc:
        raise DataError(f"{index_path}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(index, dict) or not isinstance(index.get("runs", []), list):
        raise DataError(f"{index_path}: expected an object with a \"runs\" list")
    for i, entry in enumerate(index.get("runs", [])):
        if not isinstance(entry, dict):
            raise DataError(f"{index_path}: runs[{i}] is not an object")
        seed = entry.get("seed")
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)
                                     or isinstance(seed, str) and seed.lstrip("-").isdigit()):
            raise DataError(f"{index_path}: runs[{i}].seed is not an integer: {seed!r}")
        if not isinstance(entry.get("dir") or "", str):
            raise DataError(f"{index_path}: runs[{i}].dir is not a path: {entry['dir']!r}")
    return index


def load_sweep(sweep_dir) -> Sweep:
    """Every run listed in ``<sweep>/index.json``, with its state; notes name runs not listed."""
    sweep_dir = Path(sweep_dir)
    index = read_index(sweep_dir / "index.json")
    runs = [_load_run(sweep_dir, entry) for entry in index.get("runs", [])]
    listed = {r.dir.resolve() for r in runs}
    notes = [f"run directory {p.name} is not listed in index.json and was ignored"
             for p in sorted((sweep_dir / "runs").glob("*")) if p.is_dir() and p.resolve() not in listed]
    return Sweep(str(index.get("sweep") or sweep_dir.name), sweep_dir, runs, notes, str(index.get("command") or ""))
