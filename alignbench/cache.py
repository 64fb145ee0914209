"""Content-addressed, atomic, locked stage artifacts.

A stage's directory is ``<cache>/stages/<stage>-<key>`` where the key hashes everything the stage
depends on (its config, the data config, the upstream stages' keys, the code version), so a change
upstream invalidates exactly what depends on it. A stage is built in a temporary directory and
renamed into place only when ``record.json`` (written last) says it is complete; a directory without
a complete record is never trusted. A file lock around each build makes parallel jobs that need the
same stage build it once: the others wait, then reuse it.

A stage whose model is an upstream stage's, unchanged (π0 with ``stages.pi0.mode=none``, a pretrained
base LM that is not fine-tuned), copies nothing: its record names that stage's directory
(``weights_from``, a sibling name, so the cache can move) and ``Artifact.path`` is where the model
files are, found by following those links. A link to a stage that is missing or incomplete makes
the pointing stage incomplete too: it is rebuilt (after its upstream), never half-loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock

log = logging.getLogger(__name__)

# Bump when a stage's training code changes in a way that changes its output.
STAGE_CODE_VERSION = "1"
RECORD = "record.json"
# record field of a stage that holds no model files of its own: the sibling stage directory whose
# files it uses (which may point on in turn)
POINTER = "weights_from"
MAX_LINKS = 8  # longer chains (or cycles) are corrupt


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path  # where the stage's model files are: its own directory, or the one its record points at
    record: dict
    reused: bool  # True when this process found it complete on disk
    stage_dir: Optional[Path] = None  # the stage's own directory (record.json), when not ``path``

    @property
    def home(self) -> Path:
        """The stage's own directory (its record), whether or not it holds model files."""
        return self.stage_dir or self.path


def read_record(path: Path) -> dict | None:
    """The record of a complete artifact, or None for anything incomplete or corrupt."""
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("complete") is True else None


def file_sizes(stage_dir: Path) -> dict[str, int]:
    """The size of every file a stage wrote (its record aside), by path inside the stage."""
    return {p.relative_to(stage_dir).as_posix(): p.stat().st_size for p in sorted(Path(stage_dir).rglob("*"))
            if p.is_file() and p.name != RECORD}


def intact(stage_dir: Path, record: dict) -> bool:
    """Every file the record lists (``files``, written at build) is there with its size: a
    truncated or deleted weight file makes the stage untrusted (rebuilt), not a crash at load.
    Records from before the field list none and are trusted as before."""
    for name, size in (record.get("files") or {}).items():
        try:
            if (Path(stage_dir) / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def pointer_to(artifact: Artifact) -> dict:
    """Record fields of a stage whose model is ``artifact``'s, unchanged: a link, not a copy."""
    return {POINTER: artifact.home.name}


def model_dir(stage_dir: Path, record: Optional[dict] = None) -> Optional[Path]:
    """The directory holding the model files of the stage at ``stage_dir`` (its record given or read):
    itself, or the end of its ``weights_from`` links. None when the stage or any stage it links to is
    missing or incomplete, or the links run longer than MAX_LINKS (a cycle)."""
    path = Path(stage_dir)
    record = read_record(path) if record is None else record
    for _ in range(MAX_LINKS):
        if record is None:
            return None
        if record.get(POINTER) is None:
            return path if intact(path, record) else None
        path = path.parent / record[POINTER]
        record = read_record(path)
    return None


def same_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two model directories load the same files (a no-op stage points at its upstream's)."""
    return resolve_model_dir(a).resolve() == resolve_model_dir(b).resolve()


def resolve_model_dir(path: str | Path) -> Path:
    """What a loader reads for ``path``: a stage directory that points elsewhere resolves to the
    directory holding its files (``model_dir``); anything else (a run's policy, a Hub id, a stage
    with files of its own) is itself. A broken link raises, so nothing is half-loaded."""
    record = read_record(Path(path)) if (Path(path) / RECORD).is_file() else None
    if record is None or record.get(POINTER) is None:
        return Path(path)
    files = model_dir(Path(path), record)
    if files is None:
        raise FileNotFoundError(f"stage {path} points at {record[POINTER]}, which is missing or incomplete; "
                                "rebuild the stages (alignbench stages with the same overrides)")
    return files


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def precision_key(cfg) -> dict:
    """Part of a stage key: bf16-trained stages are cached apart from fp32 ones (fp32 keys are
    unchanged, so existing caches stay valid)."""
    return {"precision": "bf16"} if cfg.train.precision == "bf16" else {}


def lora_key(cfg) -> dict:
    """Part of the key of a stage that trains under model.peft or model.trainable_layers (π0, the
    PMs, safety distillation, GAtt): LoRA-trained and partly frozen stages are cached apart; full
    fine-tuning keys are unchanged. Gradient checkpointing is not part of any key: it recomputes
    the same activations, so it changes memory, not the result."""
    out = {"trainable_layers": cfg.model.trainable_layers} if cfg.model.trainable_layers is not None else {}
    if cfg.model.peft == "none":
        return out
    return {"peft": cfg.model.peft, "lora": dataclasses.asdict(cfg.model.lora), **out}


def data_key(cfg) -> dict:
    """The data config as part of a stage key, without ``format`` (see ``format_key``) and without
    ``synth.rank_k``: ranked labels change only the PM, whose key has it (the base LM and π0 read the
    pairwise data, ``data.pairwise_config``). ``synth.system_instructions`` is there only when true,
    so the keys of data without instructions are those from before the field existed."""
    out = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "format"}
    out["synth"] = {k: v for k, v in out["synth"].items()
                    if k != "rank_k" and not (k == "system_instructions" and not v)}
    return out


def format_key(cfg) -> dict:
    """Part of a stage key: stages built on chat-rendered dialogues (data.format=chat) or with a
    replaced chat template (model.chat_template) are cached apart; raw keys are unchanged, so
    existing caches stay valid."""
    out = {"format": cfg.data.format} if cfg.data.format != "raw" else {}
    if cfg.model.chat_template is not None:
        out["chat_template"] = cfg.model.chat_template
    return out


def build_stage(stage: str, key_material: dict, cache_dir: str | Path,
                build: Callable[[Path], dict]) -> Artifact:
    """Return the stage's artifact, building it with ``build(tmp_dir) -> record fields`` if needed.

    ``build`` writes model files into ``tmp_dir`` and returns a dict (metrics, timings, data
    counts) that goes into the record beside the key material.
    """
    key = stable_hash({"stage": stage, "code": STAGE_CODE_VERSION, **key_material})
    root = Path(cache_dir) / "stages"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{stage}-{key}"
    with FileLock(str(root / f".{stage}-{key}.lock")):
        record = read_record(final)
        files = model_dir(final, record) if record is not None else None
        if files is not None:
            log.info("stage %s: reusing %s", stage, final)
            return _artifact(stage, key, final, record, files, reused=True)
        if record is not None and record.get(POINTER) is None:  # a file missing or of another size
            log.warning("stage %s: %s has a file missing or truncated since it was built; rebuilding it",
                        stage, final)
            shutil.rmtree(final)
        elif record is not None:  # complete, but the stage it points at is gone: the link is rebuilt
            log.warning("stage %s: %s points at %s, which is missing or incomplete; rebuilding it",
                        stage, final, record.get(POINTER))
            shutil.rmtree(final)
        elif final.exists():
            log.warning("stage %s: %s has no complete record; rebuilding it", stage, final)
            shutil.rmtree(final)
        for stale in root.glob(f".tmp-{stage}-{key}-*"):  # left by a builder that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{stage}-{key}-{os.getpid()}"
        tmp.mkdir()
        start = time.time()
        try:
            fields = build(tmp)
            record = {"stage": stage, "key": key, **key_material, **fields, "complete": True,
                      "build_seconds": round(time.time() - start, 3), "built_by": _who(),
                      "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if record.get(POINTER) is None:
                record["files"] = file_sizes(tmp)
            if model_dir(tmp, record) is None:
                raise FileNotFoundError(f"stage {stage}: {POINTER}={record.get(POINTER)} is not a complete stage")
            write_json_atomic(tmp / RECORD, record)
            os.replace(tmp, final)  # atomic: the directory appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("stage %s: built %s in %.1fs", stage, final, record["build_seconds"])
    return _artifact(stage, key, final, record, model_dir(final, record), reused=False)


def _artifact(stage: str, key: str, final: Path, record: dict, files: Path, reused: bool) -> Artifact:
    return Artifact(stage, key, files, record, reused=reused, stage_dir=None if files == final else final)


def _who() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}
