"""`alignbench study NAME`: a study (shared stages, sweeps, a report) as one resumable command.

A study is a list of parts in ``conf/study/<NAME>.yaml`` (or any YAML file named by its path):

    overrides: [experiment=hh_smollm2, name=hh-smollm2-cpu]   # every part, before the command line's
    parts:
      - name: stages                  # alignbench stages <overrides>
        stages: []
      - name: dpo                     # alignbench run -m <overrides> (comma lists and the preset's
        sweep: [method=dpo]           #   hydra.sweeper.params sweep, as on the command line)
      - name: report                  # alignbench report <sweep_dir> --out <dir> (--out replaces it)
        report: reports/hh-smollm2-cpu

The parts run in order. Each finished part is recorded, with its wall time, in
``<paths.sweep_dir>/study.json`` (written atomically), and a rerun of the same command skips it;
a part whose definition or overrides changed runs again. Within a part nothing finished is redone
either: stages are cached, a sweep skips its finished runs (DONE) and a killed run resumes from its
last mid-training checkpoint (train.checkpoint_every). So a kill loses at most the part it hit,
and usually much less.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from alignbench.config import ConfigError
from alignbench.cache import stable_hash, write_json_atomic

STUDY_FILE = "study.json"
KINDS = ("stages", "sweep", "report")


@dataclass(frozen=True)
class Part:
    name: str
    kind: str  # one of KINDS
    args: tuple  # the part's own overrides (stages, sweep), or (report directory,)


@dataclass(frozen=True)
class Study:
    name: str
    overrides: tuple  # every part's, before the command line's
    parts: tuple


def study_file(name: str, conf_dir: Path) -> Path:
    """``name`` as a YAML file of its own, else ``<conf_dir>/study/<name>.yaml``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    found = conf_dir / "study" / f"{name}.yaml"
    if not found.is_file():
        known = sorted(p.stem for p in (conf_dir / "study").glob("*.yaml"))
        raise ConfigError(f"study: no study {name!r} (conf/study/<name>.yaml or a .yaml file); known: {known}")
    return found


def parse_study(name: str, text: str) -> Study:
    """A study definition, checked before anything runs (one-line ConfigErrors naming the key)."""
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict) or set(raw) - {"overrides", "parts"}:
        got = sorted(raw) if isinstance(raw, dict) else raw
        raise ConfigError(f"study {name}: keys are overrides and parts, got {got}")
    overrides = _strings(raw.get("overrides") or [], f"study {name}: overrides")
    parts, seen = [], set()
    for i, entry in enumerate(raw.get("parts") or []):
        where = f"study {name}: parts[{i}]"
        kinds = [k for k in KINDS if isinstance(entry, dict) and k in entry]
        if not isinstance(entry, dict) or "name" not in entry or len(kinds) != 1 or len(entry) != 2:
            raise ConfigError(f"{where}: needs a name and exactly one of {', '.join(KINDS)}, got {entry!r}")
        part_name = str(entry["name"])
        if part_name in seen:
            raise ConfigError(f"{where}: the name {part_name!r} is used twice")
        seen.add(part_name)
        kind = kinds[0]
        if kind == "report":
            if not isinstance(entry[kind], str) or not entry[kind]:
                raise ConfigError(f"{where}.report: the report's output directory, got {entry[kind]!r}")
            args = (entry[kind],)
        else:
            args = _strings(entry[kind] or [], f"{where}.{kind}")
        parts.append(Part(part_name, kind, args))
    if not parts:
        raise ConfigError(f"study {name}: parts is empty")
    return Study(name, overrides, tuple(parts))


def _strings(value, where: str) -> tuple:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise ConfigError(f"{where}: a list of overrides (key=value), got {value!r}")
    return tuple(str(v) for v in value)


def part_overrides(study: Study, part: Part, extra: list[str]) -> list[str]:
    """What a stages or sweep part runs with: the study's, the part's, then the command line's
    (the last of several values of a key wins)."""
    return [*study.overrides, *part.args, *extra]


def fingerprint(study: Study, part: Part, extra: list[str], out: Optional[str]) -> str:
    """Identifies what a finished part did: a rerun skips it only if this is unchanged."""
    what = [out or part.args[0]] if part.kind == "report" else part_overrides(study, part, extra)
    return stable_hash({"kind": part.kind, "args": what, "extra": extra})


def read_progress(sweep_dir: Path) -> dict:
    try:
        return json.loads((sweep_dir / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return {}


def hms(seconds: float) -> str:
    """``1h 02m 03s`` / ``2m 03s`` / ``3.4s``."""
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    h, m = divmod(s // 60, 60)
    return f"{h}h {m:02d}m {s % 60:02d}s" if h else f"{m}m {s % 60:02d}s"


def run_study(study: Study, sweep_dir: Path, extra: list[str], out: Optional[str],
              run_part: Callable[[Part, list[str], Optional[str]], int], command: str = "") -> int:
    """Run the parts not yet finished, in order; ``run_part(part, overrides, report_dir)`` runs one
    and returns its exit status (0 = finished). Stops at the first part that does not finish."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    progress = read_progress(sweep_dir)
    done = progress.get("parts", {})
    start, n = time.time(), len(study.parts)
    for i, part in enumerate(study.parts, 1):
        fp = fingerprint(study, part, extra, out)
        label = f"[study {study.name}] part {i}/{n} {part.name!r} ({part.kind})"
        if done.get(part.name, {}).get("fingerprint") == fp:
            _banner(f"{label}: finished earlier in {hms(done[part.name]['seconds'])}; skipped")
            continue
        _banner(f"{label}: starting (study time so far {hms(time.time() - start)})")
        t0 = time.time()
        report_dir = (out or part.args[0]) if part.kind == "report" else None
        rc = run_part(part, part_overrides(study, part, extra) if part.kind != "report" else [], report_dir)
        seconds = time.time() - t0
        if rc:
            _banner(f"{label}: failed (exit {rc}) after {hms(seconds)}; rerun the same command to resume")
            return rc
        done[part.name] = {"fingerprint": fp, "seconds": round(seconds, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(sweep_dir / STUDY_FILE, {"study": study.name, "command": command, "parts": done})
        _banner(f"{label}: done in {hms(seconds)}")
    times = ", ".join(f"{p.name} {hms(done[p.name]['seconds'])}" for p in study.parts)
    total = sum(done[p.name]["seconds"] for p in study.parts)
    _banner(f"[study {study.name}] complete: {times} (parts' time {hms(total)}; this call {hms(time.time() - start)})")
    return 0


def failed_runs(sweep_dir: Path) -> list[str]:
    """Runs of the sweep's index that did not finish (a sweep part is finished only without any)."""
    try:
        runs = json.loads((sweep_dir / "index.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []
    return [r["run_id"] for r in runs if r.get("status") != "done"]


def _banner(text: str) -> None:
    print(f"== {text}", flush=True)
