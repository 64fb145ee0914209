"""A report directory replaced whole: a build that dies leaves the previous report as it was.

``replacing(out_dir)`` yields a fresh directory beside ``out_dir`` to build into. On success the
files of the old report that the new build did not write (a note kept beside the report, say) are
copied in, then the old directory is renamed aside, the new one renamed into place, the old one
removed: two renames, so at any instant ``out_dir`` holds one whole report or, between the renames,
is absent while ``<out_dir>.old`` holds the previous one, which the next build puts back first
(``recover``). On failure the new directory is removed and ``out_dir`` is untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _aside(out_dir: Path, what: str) -> Path:
    return out_dir.with_name(f".{out_dir.name}.{what}")


def recover(out_dir: Path) -> None:
    """A build killed between its two renames left no ``out_dir`` and the old report aside: put it back."""
    old = _aside(out_dir, "old")
    if old.is_dir() and not out_dir.exists():
        os.replace(old, out_dir)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replacing(out_dir: Path) -> Iterator[Path]:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    new = _aside(out_dir, f"new-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if out_dir.is_dir():
        for entry in out_dir.iterdir():  # what the build does not write stays (copied: the old one is whole)
            if not (new / entry.name).exists():
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, new / entry.name)
        old = _aside(out_dir, "old")
        os.replace(out_dir, old)
        os.replace(new, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out_dir)
