"""Shared statistics and the tidy result row.

Every evaluator returns rows with exactly the columns in ``COLUMNS``; the report concatenates them.
Intervals: ``bootstrap_ci`` is a seeded percentile bootstrap, ``binomial_ci`` is the exact
Clopper-Pearson interval, ``t_interval`` the Student-t interval (``seed_interval`` picks between
the bootstrap and t across seeds).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from scipy import stats as sps

# config: the configuration (method plus its own overrides, the run id without its seed); the
# report's unit, so runs of one sweep over a hyperparameter are never averaged as seeds
COLUMNS = ("sweep", "run", "method", "config", "seed", "evaluator", "metric", "slice", "value", "ci_low", "ci_high", "n")
FLOAT_COLUMNS = ("value", "ci_low", "ci_high")

_STATS: dict[str, Callable[..., np.ndarray]] = {"mean": np.mean, "median": np.median}


@dataclass
class Row:
    """One tidy result. Identity fields left as None are filled in by whoever knows them."""

    sweep: str | None = None
    run: str | None = None
    method: str | None = None
    config: str | None = None
    seed: int | None = None
    evaluator: str | None = None
    metric: str | None = None
    slice: str | None = None
    value: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    n: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def make_row(**kw) -> dict:
    """A row dict with exactly ``COLUMNS``; unknown keys are an error, missing ones default."""
    return Row(**kw).as_dict()


def bootstrap_ci(values, stat: str | Callable = "mean", n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, lo, hi): ``stat`` of the values and its percentile-bootstrap interval.

    NaNs are dropped; an empty input gives NaNs. ``stat`` is "mean", "median" or a function that
    reduces along ``axis``. Resamples are drawn in chunks so memory stays bounded for large inputs.
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    fn = _STATS[stat] if isinstance(stat, str) else stat
    point = float(fn(x))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // x.size))
    boots = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - start), x.size))
        boots.append(fn(x[idx], axis=1))
    lo, hi = np.quantile(np.concatenate(boots), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def t_interval(values, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval mean ± t_{1−α/2, n−1} · s / √n, s the sample standard
    deviation (ddof 1). NaNs are dropped; fewer than two values give NaN bounds."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(sps.t.ppf(1 - alpha / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


# Below this many seeds a percentile bootstrap over the seed values is about their min-max range,
# far too narrow; a t-interval is honest about how little a few seeds say.
MIN_SEEDS_BOOTSTRAP = 5


def seed_interval(values, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float, str]:
    """(mean, lo, hi, label) across the seeds of one configuration: a percentile bootstrap with at
    least ``MIN_SEEDS_BOOTSTRAP`` seeds (label "bootstrap(n=N)"), else a Student-t interval
    (label "t(n=N)")."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size >= MIN_SEEDS_BOOTSTRAP:
        return (*bootstrap_ci(x, n_boot=n_boot, seed=seed, alpha=alpha), f"bootstrap(n={x.size})")
    return (*t_interval(x, alpha), f"t(n={x.size})")


def binomial_ci(k: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Exact Clopper-Pearson interval for k successes in n trials (NaNs when n == 0).

    A fractional k (ties counted as half a success) uses the same beta quantiles, which is the
    continuous extension of the exact interval.
    """
    if n <= 0:
        return float("nan"), float("nan")
    lo = 0.0 if k <= 0 else float(sps.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k >= n else float(sps.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def proportion_row(successes: float, n: int, alpha: float = 0.05, **ident) -> dict:
    """A row for a proportion with its exact binomial interval (value NaN when n == 0)."""
    value = successes / n if n else float("nan")
    lo, hi = binomial_ci(successes, n, alpha)
    return make_row(value=value, ci_low=lo, ci_high=hi, n=int(n), **ident)


def write_rows(path, rows: Iterable[dict] | pd.DataFrame) -> Path:
    """Write rows as CSV with exactly ``COLUMNS``, atomically (temp file + os.replace)."""
    path = Path(path)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(COLUMNS))
    df = df.reindex(columns=list(COLUMNS))
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_rows(path) -> pd.DataFrame:
    """Read a results CSV. Text columns stay strings ("1" stays "1", empty stays ""), numbers
    become floats, seed a nullable integer. A CSV from before the ``config`` column reads as
    config = method."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "config" not in df:
        df["config"] = df["method"] if "method" in df else ""
    df = df.reindex(columns=list(COLUMNS), fill_value="")
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("seed", "n"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df
