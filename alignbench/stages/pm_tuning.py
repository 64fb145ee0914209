"""Tune the PM recipe on the eval split: ``alignbench tune-pm``.

Each point of a grid of config overrides (``stages.pm.lr``, ``model.trainable_layers``,
``stages.pm.epochs``, ...) trains a PM from the PM stage's init on exactly the comparisons the
proxy PM stage would train on (``pm_training_pairs``), then scores the eval split's comparisons
(``data.eval``, conversation-disjoint from the PM halves and from the test split, which this never
reads). What a study then fixes for both of its PMs is the point with the best eval accuracy.

All points read one frozen-trunk cache (``frozen_trunk``) at the deepest cut they share (the
smallest frozen depth of the grid): a point runs only its top blocks, the trunk below runs once per
sequence for the whole grid. Each finished point is appended to ``out`` (JSON lines) at once; a rerun
skips the points already there, so a killed tuning loses at most the point it was on.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from alignbench import freeze, frozen_trunk
from alignbench.config import Config, ConfigError
from alignbench.data import load_data, pairwise_config
from alignbench.data.types import harm_group
from alignbench.encoding import encode_pair, pad_batch
from alignbench.eval.pm_accuracy import heldout_credit
from alignbench.eval.stats import bootstrap_ci
from alignbench.models import load_tokenizer, pick_device, pm_from_lm
from alignbench.stages.access import pm_parts
from alignbench.stages.base import build_base
from alignbench.stages.distill import build_pi0
from alignbench.stages.preference import pm_scores, pm_training_pairs, stage_pm_settings, train_pm

log = logging.getLogger(__name__)
TUNABLE = ("stages.pm.", "model.trainable_layers")  # what a point may change: the PM's recipe only
SCORE_BATCH = 32  # eval comparisons per scoring forward (64 sequences)


def grid_points(grid: list[str]) -> list[dict[str, str]]:
    """``["stages.pm.lr=1e-4,3e-4", "model.trainable_layers=2,4"]`` -> the product, in order, as
    {key: value} dicts; a key outside the PM's recipe is a ConfigError naming it."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"tune-pm --grid: expected key=v1,v2,..., got {item!r}")
        if not key.startswith(TUNABLE):
            raise ConfigError(f"{key}: tune-pm tunes the PM's recipe only ({', '.join(TUNABLE)})")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def done_points(out: Path) -> dict[str, dict]:
    """The rows already in ``out``, by their point's overrides (a torn last line is dropped)."""
    rows = {}
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[json.dumps(row["point"], sort_keys=True)] = row
    return rows


def eval_accuracy(model, tok, pairs: list, *, max_len: int, fmt: str, device) -> dict:
    """Accuracy of ``model`` on ``pairs`` (the eval split's comparisons), overall and per harm group,
    each with a seeded 95% bootstrap interval over comparisons."""
    chosen, rejected = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), SCORE_BATCH):
            encoded = [encode_pair(tok, p.prompt, p.chosen, p.rejected, max_len, fmt=fmt) for p in pairs[i:i + SCORE_BATCH]]
            batch = pad_batch([c for c, _ in encoded] + [r for _, r in encoded], tok.pad_token_id, device)
            c, r = pm_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    out = {}
    for (_, group), credit in heldout_credit(chosen, rejected, [harm_group(p.subset) for p in pairs]).items():
        value, lo, hi = bootstrap_ci(credit, n_boot=1000, seed=0)
        out[group] = {"accuracy": round(value, 4), "ci": [round(lo, 4), round(hi, 4)], "n": int(credit.size)}
    return out


def tune(cfg_of, overrides: list[str], grid: list[str], out: Path) -> list[dict]:
    """Train and score every point of ``grid`` (``grid_points``) on top of ``overrides``;
    ``cfg_of(overrides)`` composes a Config. Returns every row of ``out``, old and new."""
    points = grid_points(grid)
    cfgs = [cfg_of([*overrides, *(f"{k}={v}" for k, v in p.items())]) for p in points]  # all checked first
    cfg: Config = cfgs[0]
    if any(c.stages.pm.objective == "lm" for c in cfgs):
        raise ConfigError("stages.pm.objective: lm has nothing to tune")
    init = build_pi0(cfg, build_base(cfg)) if cfg.stages.pm.init == "pi0" else build_base(cfg)
    tok, device, max_len = load_tokenizer(init.path), pick_device(cfg.train.device), init.record["max_len"]
    data = load_data(cfg.data)
    eval_pairs = load_data(pairwise_config(cfg.data)).eval
    part = pm_parts(cfg)[0]
    done = done_points(out)
    features = None
    depth = None
    for point, pcfg in zip(points, cfgs):
        name = json.dumps(point, sort_keys=True)
        if name in done:
            log.info("tune-pm: %s already in %s", name, out)
            continue
        sc = stage_pm_settings(pcfg, part)
        train = pm_training_pairs(pcfg, data, part)
        model = freeze.prepare(pm_from_lm(init.path, tok, pcfg.stages.seed), pcfg.model, task="SEQ_CLS",
                               seed=pcfg.stages.seed).to(device)
        if depth is None:  # the deepest cut every point keeps frozen
            depth = min(_frozen_blocks(model, c) for c in cfgs)
        if depth and features is None:
            features = frozen_trunk.TrunkFeatures(model, depth)
        start = time.perf_counter()
        bound = features.bound(model) if features else None
        res = train_pm(model, tok, train, epochs=sc.epochs, cfg=pcfg, device=device, max_len=max_len,
                       desc=f"PM {name}", log_step=None, settings=sc, features=bound)
        with frozen_trunk.reading(model, bound) if bound else contextlib.nullcontext():
            accuracy = eval_accuracy(model, tok, eval_pairs, max_len=max_len, fmt=pcfg.data.format, device=device)
        row = {"point": point, "part": part, "train_pairs": len(train), "eval_pairs": len(eval_pairs),
               "eval": accuracy, "steps": res["steps"], "first_loss": res["first_loss"],
               "final_loss": res["final_loss"], "seconds": round(time.perf_counter() - start, 1),
               "trunk_cache_depth": depth or 0}
        with out.open("a") as f:  # one line per finished point: a kill loses only the point running
            f.write(json.dumps(row) + "\n")
        done[name] = row
        log.info("tune-pm: %s eval accuracy %s", name, accuracy["all"])
    return list(done.values())


def _frozen_blocks(model, cfg: Config) -> int:
    """Blocks a point keeps frozen: all but its top ``model.trainable_layers`` (0 without it)."""
    if not freeze.enabled(cfg.model):
        return 0
    return len(freeze.decoder_layers(model)[2]) - cfg.model.trainable_layers


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, best eval accuracy first."""
    keys = sorted({k for r in rows for k in r["point"]})
    head = "| " + " | ".join([*keys, "eval accuracy [95% CI]", "harmless", "helpful", "final loss", "min"]) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 5)]
    for r in sorted(rows, key=lambda r: -r["eval"]["all"]["accuracy"]):
        a = r["eval"]["all"]
        cells = [str(r["point"].get(k, "")) for k in keys] + [
            f"{a['accuracy']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]",
            *(f"{r['eval'][g]['accuracy']:.3f}" if g in r["eval"] else "" for g in ("harmless", "helpful")),
            f"{r['final_loss']:.3f}", f"{r['seconds'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
