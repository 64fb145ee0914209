"""NLP-task regressions ("alignment tax") through EleutherAI's lm-evaluation-harness (lm_eval 0.4.x).

Tasks
-----
* Local tasks (``local_*``) read the real sets under ``<data_dir>`` (default
  ``<repo root>/../shared/data/nlp``, or ``$ALIGNBENCH_NLP_DATA``): ``local_arc_easy`` (ARC-Easy
  test, 2376), ``local_arc_challenge`` (1172), ``local_boolq`` (val, 3270), ``local_copa`` (val, 100),
  ``local_piqa`` (valid, 1838), ``local_openbookqa`` (test, 500), ``local_sst2`` (dev, 872): zero-shot
  multiple-choice loglikelihood tasks with lm-eval's own prompts, metric ``acc`` (plus ``acc_norm``
  for ARC, PIQA and OpenBookQA, as lm-eval reports them). ``local_gsm8k`` (generative, zero-shot,
  exact match; slow) exists but is not in :data:`DEFAULT_TASKS`.
* Synthetic tasks in the HH dialogue format, so tiny from-scratch models show a signal:
  ``local_synth_facts`` (``alignbench.data.synth.world_facts()`` or the ``synth_facts`` argument)
  and ``local_synth_arith`` (200 seeded additions/subtractions). Context
  ``"\\n\\nHuman: <question>\\n\\nAssistant:"``, scored continuations ``" <choice>"``.
* Any task name registered in lm-eval (e.g. ``"arc_easy"``) when the Hub is reachable.

Task definitions are lm-eval YAMLs in ``alignbench/eval/lm_eval_tasks`` (usable from the lm-eval CLI
too: ``lm_eval --include_path alignbench/eval/lm_eval_tasks --tasks local_copa
--metadata '{"data_dir": "..."}' ...``).

Items: the first ``limit`` documents in file order (``subset="first"``, default), or a sorted random
subset drawn with ``seed`` (``subset="seeded"``). Synthetic items never depend on ``seed``. For paired
deltas, evaluate the policy and pi0 with the same tasks, limit, subset and seed.

Intervals: :func:`nlp_rows` gives exact (Clopper-Pearson) 95% binomial intervals for 0/1 per-item
scores (a percentile bootstrap for any non-binary metric of a Hub task); :func:`nlp_delta_rows`
gives a paired percentile bootstrap over items of mean(policy) - mean(pi0).
"""
from __future__ import annotations

import logging
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from alignbench.eval.lm_eval_tasks import utils as _task_utils
from alignbench.eval.stats import binomial_ci, bootstrap_ci, make_row
from alignbench.eval.lm_eval_tasks.utils import (  # re-exported
    DEFAULT_DATA_DIR,
    ENV_DATA_DIR,
    NLPDataError,
    arithmetic_items,
    local_docs,
    required_files,
    resolve_data_dir,
)

log = logging.getLogger(__name__)


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns once per custom_dataset task that kwargs can be passed via --metadata; our
    loaders get theirs from the TaskManager, so the hint is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


_task_logger = logging.getLogger("lm_eval.api.task")
if not any(isinstance(f, _DropCustomDatasetHint) for f in _task_logger.filters):
    _task_logger.addFilter(_DropCustomDatasetHint())

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_PREFIX = "local_"
LOCAL_TASKS: tuple[str, ...] = tuple(
    LOCAL_PREFIX + n for n in (*_task_utils.FILE_TASKS, *_task_utils.SYNTH_TASKS)
)
DEFAULT_TASKS: tuple[str, ...] = (
    "local_arc_easy", "local_arc_challenge", "local_boolq", "local_copa",
    "local_piqa", "local_openbookqa", "local_sst2",
)
SYNTH_TASKS: tuple[str, ...] = ("local_synth_facts", "local_synth_arith")
# tasks with acc_norm (length-normalised accuracy) as lm-eval reports it
NORM_TASKS: tuple[str, ...] = ("local_arc_easy", "local_arc_challenge", "local_piqa", "local_openbookqa")
# (metric, filter) reported as primary; everything else: "acc" if present, filter "none" if present
PRIMARY: dict[str, tuple[str, str]] = {"local_gsm8k": ("exact_match", "flexible-extract")}

EVALUATOR = "nlp_tasks"

__all__ = [
    "DEFAULT_DATA_DIR", "DEFAULT_TASKS", "ENV_DATA_DIR", "LOCAL_TASKS", "NLPDataError",
    "SYNTH_TASKS", "TASK_DIR", "arithmetic_items", "check_local_data", "local_docs",
    "make_task_manager", "nlp_delta_rows", "nlp_rows", "paired_bootstrap_delta", "required_files",
    "resolve_data_dir", "run_nlp_tasks", "seeded_subset",
]


# ---------------------------------------------------------------- task management

def is_local(name: str) -> bool:
    return name.startswith(LOCAL_PREFIX)


def check_local_data(tasks: Sequence[str], data_dir: str | os.PathLike | None = None) -> None:
    """Fail early, naming the path, if a local task's data file is absent."""
    for t in tasks:
        if not is_local(t):
            continue
        if t not in LOCAL_TASKS:
            raise KeyError(f"unknown local task {t!r}; local tasks: {list(LOCAL_TASKS)}")
        for p in required_files(t[len(LOCAL_PREFIX):], data_dir):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{t}: data file not found: {p} (pass data_dir=..., or set ${ENV_DATA_DIR}; "
                    f"default is {DEFAULT_DATA_DIR})"
                )


def make_task_manager(data_dir: str | os.PathLike | None = None, synth_facts: Sequence | None = None,
                      include_defaults: bool = True):
    """An lm-eval TaskManager that knows our local tasks. ``include_defaults`` adds lm-eval's own
    task registry (needed for Hub task names; indexing it takes several seconds)."""
    from lm_eval.tasks import TaskManager

    meta: dict[str, Any] = {"data_dir": str(resolve_data_dir(data_dir))}
    if synth_facts is not None:
        meta["synth_facts"] = [(str(q), str(a), [str(d) for d in ds]) for q, a, ds in synth_facts]
    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults, metadata=meta)


def _primary(task: str, res: Mapping[str, Any], samples: list[dict]) -> tuple[str, str]:
    if task in PRIMARY:
        return PRIMARY[task]
    keys = [k for k in res if "," in k and "_stderr," not in k]
    filters = sorted({k.split(",", 1)[1] for k in keys})
    filt = "none" if "none" in filters else (filters[0] if filters else "none")
    metrics = [k.split(",", 1)[0] for k in keys if k.split(",", 1)[1] == filt]
    if "acc" in metrics:
        return "acc", filt
    if not metrics:
        raise RuntimeError(f"{task}: lm-eval returned no metric (got {sorted(res)})")
    return metrics[0], filt


def _per_item(samples: list[dict], metric: str, filt: str) -> tuple[list[int], list]:
    rows = sorted((s for s in samples if s.get("filter", "none") == filt), key=lambda s: s["doc_id"])
    vals = []
    for s in rows:
        v = s[metric]
        v = float(v[0] if isinstance(v, (list, tuple)) else v)
        vals.append(int(v) if v in (0.0, 1.0) else v)
    return [s["doc_id"] for s in rows], vals


def seeded_subset(task: str, n_docs: int, limit: int, seed: int) -> list[int]:
    """Sorted doc indices of a task's seeded subset; depends only on (task, n_docs, limit, seed),
    not on which other tasks are evaluated alongside, so policy and pi0 runs stay paired."""
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    return sorted(int(i) for i in rng.choice(n_docs, size=min(limit, n_docs), replace=False))


def _stderr(vals: Sequence[float]) -> float:
    n = len(vals)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(vals, dtype=float), ddof=1) / math.sqrt(n))


def run_nlp_tasks(
    model_dir: str,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int | str = 16,
    device: str = "cpu",
    seed: int = 0,
    *,
    subset: str = "first",
    synth_facts: Sequence | None = None,
    dtype: str = "auto",
    max_length: int | None = None,
    num_threads: int | None = None,
    lm: Any = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate the HF causal LM in ``model_dir`` on ``tasks`` with ``lm_eval.simple_evaluate``.

    ``tasks``: local names (``local_*``, see :data:`LOCAL_TASKS`) and/or any lm-eval task name.
    ``limit``: number of documents per task (None: all). ``subset``: "first" (first ``limit`` in file
    order) or "seeded" (sorted random subset of size ``limit``, see :func:`seeded_subset`).
    ``synth_facts``: (question, answer, distractors) items for ``local_synth_facts`` (default:
    ``alignbench.data.synth.world_facts()``). ``lm``: an already built lm-eval LM (then
    ``model_dir``, ``device``, ``dtype``, ``batch_size`` are ignored). ``num_threads``: torch CPU
    threads for this call (restored afterwards); 1 is much faster for tiny models on a busy CPU.

    Returns ``{task: {"acc", "acc_stderr", "n", "per_item", "doc_ids", "metric", "filter", "n_total",
    "wall_s"}}`` (``n_total``: documents in the full task; ``wall_s``: seconds for the whole call,
    all tasks together, model loading included) plus ``"acc_norm", "acc_norm_stderr",
    "per_item_norm"`` where the task reports acc_norm. ``"acc"`` holds the task's primary metric (named in ``"metric"``: "acc", or e.g.
    "exact_match" for gsm8k); ``per_item`` is its per-document score (0/1) in doc-id order.
    """
    if num_threads is not None:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return run_nlp_tasks(model_dir, tasks, limit, data_dir, batch_size, device, seed,
                                 subset=subset, synth_facts=synth_facts, dtype=dtype,
                                 max_length=max_length, lm=lm)
        finally:
            torch.set_num_threads(before)
    import lm_eval

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if subset not in ("first", "seeded"):
        raise ValueError(f"subset must be 'first' or 'seeded', got {subset!r}")
    check_local_data(tasks, data_dir)
    t0 = time.time()
    tm = make_task_manager(data_dir, synth_facts, include_defaults=not all(map(is_local, tasks)))
    loaded = tm.load(tasks)
    task_objs = loaded["tasks"]
    n_total = {name: len(t.eval_docs) for name, t in task_objs.items()}

    samples = None
    if subset == "seeded" and limit is not None:
        samples = {name: seeded_subset(name, n, int(limit), seed) for name, n in n_total.items()}

    if lm is None:
        from lm_eval.models.huggingface import HFLM

        kw: dict[str, Any] = {"pretrained": str(model_dir), "device": device,
                              "batch_size": batch_size, "dtype": dtype}
        if max_length is not None:
            kw["max_length"] = max_length
        lm = HFLM(**kw)

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task_objs.values()),
        limit=None if samples is not None else limit,
        samples=samples,
        task_manager=tm,
        log_samples=True,
        bootstrap_iters=1000,  # lm-eval needs >0 to report stderr; acc's stderr is closed-form
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    wall = time.time() - t0
    if out is None:  # non-zero rank in a distributed run
        return {}

    results: dict[str, dict[str, Any]] = {}
    for name in task_objs:
        res = out["results"][name]
        smp = out["samples"][name]
        metric, filt = _primary(name, res, smp)
        doc_ids, per_item = _per_item(smp, metric, filt)
        n = len(per_item)
        agg = float(res[f"{metric},{filt}"])
        if n and abs(agg - float(np.mean(per_item))) > 1e-9:
            raise RuntimeError(f"{name}: lm-eval's {metric}={agg} != mean of per-item scores")
        se = res.get(f"{metric}_stderr,{filt}")
        entry: dict[str, Any] = {
            "acc": agg, "acc_stderr": float(se) if isinstance(se, (int, float)) else _stderr(per_item),
            "n": n, "per_item": per_item, "doc_ids": doc_ids, "metric": metric, "filter": filt,
            "n_total": n_total[name], "wall_s": wall,
        }
        if metric == "acc" and f"acc_norm,{filt}" in res:
            _, norm = _per_item(smp, "acc_norm", filt)
            se_n = res.get(f"acc_norm_stderr,{filt}")
            entry.update(acc_norm=float(res[f"acc_norm,{filt}"]), per_item_norm=norm,
                         acc_norm_stderr=float(se_n) if isinstance(se_n, (int, float)) else _stderr(norm))
        results[name] = entry
    return results


# ---------------------------------------------------------------- intervals and rows

def _is_binary(vals: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in vals)


def _row(sweep, run, method, seed, metric, slice_, value, lo, hi, n) -> dict:
    return make_row(sweep=sweep, run=run, method=method, seed=seed, evaluator=EVALUATOR,
                    metric=metric, slice=slice_, value=float(value), ci_low=float(lo),
                    ci_high=float(hi), n=int(n))


def nlp_rows(results: Mapping[str, Mapping[str, Any]], sweep: str, run: str, method: str, seed: int,
             *, alpha: float = 0.05, include_norm: bool = True, n_boot: int = 10000) -> list[dict]:
    """results.csv rows (columns ``stats.COLUMNS``) for :func:`run_nlp_tasks` output: one row per
    task with metric "acc" (or the task's primary metric name, e.g. "exact_match"), and an
    "acc_norm" row where available; slice = task name. CI: exact Clopper-Pearson (1 - alpha) for 0/1
    per-item scores, else a seeded percentile bootstrap over items."""
    rows = []
    for task in sorted(results):
        r = results[task]
        pairs = [(r.get("metric", "acc"), r["per_item"])]
        if include_norm and "per_item_norm" in r:
            pairs.append(("acc_norm", r["per_item_norm"]))
        for metric, per_item in pairs:
            n = len(per_item)
            if n == 0:
                value, lo, hi = (float("nan"),) * 3
            elif _is_binary(per_item):
                value = float(np.mean(per_item))
                lo, hi = binomial_ci(int(sum(per_item)), n, alpha)
            else:
                value, lo, hi = bootstrap_ci(per_item, "mean", n_boot=n_boot, seed=0, alpha=alpha)
            rows.append(_row(sweep, run, method, seed, metric, task, value, lo, hi, n))
    return rows


def paired_bootstrap_delta(policy: Sequence[float], pi0: Sequence[float], n_boot: int = 10000,
                           alpha: float = 0.05, boot_seed: int = 0) -> tuple[float, float, float]:
    """(delta, lo, hi): mean(policy) - mean(pi0) over the same items, with a paired
    percentile-bootstrap interval (items resampled jointly, i.e. a bootstrap of the differences)."""
    a, b = np.asarray(policy, float), np.asarray(pi0, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired delta needs equal-length 1-d sequences, got {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, "mean", n_boot=n_boot, seed=boot_seed, alpha=alpha)


def _items(x: Any, key: str) -> tuple[list | None, list | None]:
    """(per-item scores, doc ids or None) from a run_nlp_tasks entry or a bare list."""
    if isinstance(x, Mapping):
        return (list(x[key]) if key in x else None), (list(x["doc_ids"]) if "doc_ids" in x else None)
    return list(x), None


def nlp_delta_rows(per_item_policy: Mapping[str, Any], per_item_pi0: Mapping[str, Any], sweep: str,
                   run: str, method: str, seed: int, *, n_boot: int = 10000, alpha: float = 0.05,
                   boot_seed: int = 0, include_norm: bool = True) -> list[dict]:
    """Paired deltas vs pi0, one row per task present in both inputs: metric "acc_delta_vs_pi0"
    (and "acc_norm_delta_vs_pi0"), value = mean(policy) - mean(pi0) on the same items, CI = paired
    percentile bootstrap. Inputs: ``{task: run_nlp_tasks entry}`` or ``{task: per-item list}``;
    both must cover the same documents (checked via doc_ids when given, and by length)."""
    rows = []
    for task in sorted(set(per_item_policy) & set(per_item_pi0)):
        keys = [("per_item", "acc")]
        if include_norm:
            keys.append(("per_item_norm", "acc_norm"))
        for key, metric in keys:
            a, ids_a = _items(per_item_policy[task], key)
            b, ids_b = _items(per_item_pi0[task], key)
            if a is None or b is None:
                continue
            if ids_a is not None and ids_b is not None and ids_a != ids_b:
                raise ValueError(f"{task}: policy and pi0 were scored on different documents")
            if len(a) != len(b):
                raise ValueError(f"{task}: {len(a)} policy items vs {len(b)} pi0 items")
            if key == "per_item" and isinstance(per_item_policy[task], Mapping):
                metric = per_item_policy[task].get("metric", "acc")
            value, lo, hi = paired_bootstrap_delta(a, b, n_boot, alpha, boot_seed)
            rows.append(_row(sweep, run, method, seed, f"{metric}_delta_vs_pi0", task,
                             value, lo, hi, len(a)))
    return rows
