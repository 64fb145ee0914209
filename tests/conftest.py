"""Shared fixtures: a tiny end-to-end config whose shared stages build in seconds and are cached
once per test session (so every method test starts from the same π0 and PM)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

# A run of a pretrained model fixes glibc's mmap threshold at 1 MiB (alignbench.memory): a SmolLM2 PM step then
# peaks at 1.7 GB instead of 6.1 GB, but runs ~1.6x slower (every large block is a fresh mmap). The
# tests run SmolLM2 in-process for minutes and assert behaviour, not memory: they
# (and their subprocesses, read by glibc at start) keep a 32 MiB static threshold, glibc's own cap.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
# Under pytest-xdist (the README's test command: two workers on two cores) each worker and the processes
# its tests start compute on one thread: two workers at two threads each would oversubscribe the cores.
# Set before torch is imported, which reads it once; tiny models run fastest on one thread anyway.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# The offline data sits in ../shared beside the repo; a git worktree elsewhere uses the nearest
# shared/ folder among its parents.
SHARED = next((d / "shared" for d in REPO.parents if (d / "shared" / "data").is_dir()), REPO.parent / "shared")

# Small enough for seconds on 2 CPU cores, large enough that training visibly moves the metrics.
TINY = [
    "model.vocab_size=512", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=96", "model.max_seq_len=256",
    "data.synth.n_pairs=1200", "stages.base.epochs=2", "stages.base.batch_size=64",
    "stages.pi0.epochs=0.25", "stages.pm.epochs=1", "stages.pm.lr=2e-3",
    "eval.n_prompts=24", "eval.bootstrap=200", "train.max_new_tokens=16", "train.batch_size=16",
]


class FailOnDeprecatedUse(logging.Handler):
    """transformers reports some deprecations (reading ``output.past_key_values``, ...) through its
    logger rather than the warnings module, where pytest's filterwarnings cannot see them. Raise
    when such a record comes from a call in alignbench's own code: the first frame outside
    logging, transformers, torch and functools belongs to alignbench or alignbench_methods."""

    LIBRARIES = ("logging", "transformers", "torch", "functools")

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecated" not in record.getMessage().lower():
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in self.LIBRARIES:
            frame = frame.f_back
        caller = frame.f_globals.get("__name__", "") if frame is not None else ""
        if caller.split(".")[0] in ("alignbench", "alignbench_methods"):
            raise DeprecationWarning(f"{caller}: {record.getMessage()}")


logging.getLogger("transformers").addHandler(FailOnDeprecatedUse())


def shared_data(*parts: str) -> Path:
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"needs the offline data at {path} (the ../shared folder beside the repo)")
    return path


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory of this test session that every xdist worker shares (one per worker would build
    each stage once per worker). Stage caches are safe to share: a stage is built under its lock by
    whichever process comes first and read by the others (``alignbench.cache.build_stage``)."""
    root = tmp_path_factory.getbasetemp()
    path = (root.parent if XDIST_WORKER else root) / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory, "stage-cache")


def xdist_scope(nodeid: str) -> str:
    """The unit pytest-xdist's ``loadscope`` gives one worker: the module, or the class of a method."""
    return nodeid.rsplit("::", 1)[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The longest units run first (stable order otherwise), each unit's tests kept together and in
    order (module fixtures are set up once): units holding tests marked ``slow``, by the largest
    ``slow(minutes=...)`` among them (default 1). Under xdist's ``loadscope`` scheduling (whole units
    to a worker; ``--no-loadscope-reorder`` keeps this order) the long units are dealt out at the
    start, instead of one worker starting a several-minute unit while the other has run out."""
    minutes: dict[str, float] = {}
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow is not None:
            scope = xdist_scope(item.nodeid)
            minutes[scope] = max(minutes.get(scope, 0.0), float(slow.kwargs.get("minutes", 1)))
    items.sort(key=lambda item: -minutes.get(xdist_scope(item.nodeid), 0.0))


@pytest.fixture
def tiny_overrides(stage_cache, tmp_path) -> list[str]:
    """Overrides for a tiny run: shared stage cache for the session, a fresh sweep dir per test."""
    return TINY + [f"paths.cache_dir={stage_cache}", f"paths.sweep_dir={tmp_path / 'sweep'}"]


@pytest.fixture
def tiny_config(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.config import to_config
    return to_config(compose(tiny_overrides))
