"""Wiring between the shared stages, a method run and the evaluators:

- ``build_context``: the RunContext every method receives (same π0, PM, prompts, judge, budget;
  only the data ``alignbench.stages.access`` lets a method see);
- ``final_evaluation``: the trained policy on the fixed held-out prompts -> samples.jsonl,
  metrics.json and the run's tidy rows in results.csv (PM evaluation rows included, so the sweep
  directory alone reproduces the report).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from alignbench.chain import SourceRun
from alignbench.config import Config
from alignbench.context import EVAL_SEED_OFFSET, RunContext
from alignbench.data import load_data
from alignbench.data.splits import prompt_mix
from alignbench.distributed import Dist
from alignbench.eval import pm_accuracy
from alignbench.eval.safety import safety_rows
from alignbench.eval.stats import bootstrap_ci, make_row, write_rows
from alignbench.policy_measures import (chosen_scores, gatt_rows, method_family, policy_draw, selection,
                                         temperature_rows, win_rate_row)
from alignbench.formats import check_format
from alignbench.cost import Budget
from alignbench.methods import PolicyArtifact
from alignbench.models import load_tokenizer, pick_device
from alignbench.sampling import SampleBatch
from alignbench.stages.access import (chosen_responses, eval_prompts, judge_kind, method_pairs, method_prompts,
                                     selection_prompts)
from alignbench.cache import same_weights
from alignbench.stages.graph import SharedStages, build_shared_stages
from alignbench.stages.preference import PMScorer, SampleScorer, heldout_credits, pm_label, pm_variant
from alignbench.stages.reward import reward_pms, reward_record, reward_scorer
from alignbench.stages.safety_distill import pi0_safety_record
from alignbench.tracking import Tracker

log = logging.getLogger(__name__)


def make_judge(cfg: Config, stages, device, tokenizer):
    """(judge(prompts, responses, samples=None) -> rewards, name). The gold reward reads text;
    the test PM reads a SampleBatch by its sampled ids (``SampleScorer``), texts otherwise."""
    if judge_kind(cfg) == "gold":
        from alignbench.data.synth import GoldReward
        gold = GoldReward()
        return (lambda prompts, responses, samples=None: gold.score_batch(prompts, responses)), "gold"
    pm = PMScorer(stages.judge_pm.path, device, stages.judge_pm.record["max_len"], fmt=cfg.data.format)
    return PMJudge(pm, SampleScorer(pm, tokenizer, cfg.data.format)), "test_pm"


class PMJudge:
    """The test PM as a judge: a SampleBatch by its sampled ids, texts otherwise."""

    def __init__(self, pm: PMScorer, by_ids: SampleScorer):
        self.pm, self.by_ids = pm, by_ids

    def __call__(self, prompts, responses, samples=None) -> list[float]:
        return (self.by_ids(samples) if samples is not None else self.pm.score(prompts, responses)).tolist()

    def trunk_models(self) -> list:
        return self.pm.trunk_models()


def build_context(cfg: Config, method_cfg, run_dir: Path, dist: Optional[Dist] = None,
                  stages: Optional[SharedStages] = None, source: Optional[SourceRun] = None) -> RunContext:
    """``stages``: the shared stages when the caller already has them (the runner times getting them).
    ``source``: the run whose policy this one continues (init.from_run, alignbench.chain): the
    policy starts there and is anchored there (init.reference=start) or to π0."""
    dist = dist or Dist()
    stages = stages or build_shared_stages(cfg)
    data = load_data(cfg.data)
    device = dist.device or pick_device(cfg.train.device)  # each process its own GPU under a launcher
    tokenizer = load_tokenizer(stages.pi0.path)
    check_format(tokenizer, cfg.data.format)
    judge, judge_name = make_judge(cfg, stages, device, tokenizer)
    prompts, meta = eval_prompts(cfg, data)
    b = cfg.budget
    budget = Budget(pm_calls=b.pm_calls, generated_tokens=b.generated_tokens, wall_seconds=b.wall_seconds,
                    flops=b.flops, annotations=b.annotations)
    return RunContext(
        cfg=cfg, method_cfg=method_cfg, stages=stages, tokenizer=tokenizer, device=device,
        train_prompts=method_prompts(cfg, data), eval_prompts=prompts, eval_meta=meta,
        eval_chosen=chosen_responses(cfg, data, prompts), selection_prompts=selection_prompts(cfg, data),
        pairs=method_pairs(cfg, data), judge=judge, judge_name=judge_name, out_dir=run_dir, budget=budget, dist=dist,
        pm=reward_scorer(cfg, stages, device),  # the proxy PM (or objective=lm's LM), or the two reward PMs
        start_path=source.policy if source else None,
        reference_path=source.policy if source and cfg.init.reference == "start" else None,
        tracker=Tracker(run_dir / "tb", cfg.train.report_to, run_dir.name, OmegaConf.to_container(
            OmegaConf.structured(cfg), resolve=True)) if dist.is_main else None)


def final_evaluation(ctx: RunContext, artifact: PolicyArtifact, config_id: Optional[str] = None) -> dict:
    """``config_id``: the run's configuration (``runner.config_id_for``); None: the method name."""
    cfg, prompts = ctx.cfg, ctx.eval_prompts
    config_id = config_id or cfg.method["name"]
    model, kl_info = None, {k: v for k, v in artifact.info.items() if k.startswith("kl")}
    if artifact.path is not None:
        # sampled at eval.temperature, like every other method; weights this run (or, for π0, the
        # sweep) measured before are read back, and the point says which one it repeats
        model = ctx.load(artifact.path).eval()
        point = ctx.log_point(-1, model=model, label="final", **kl_info)
        samples, proxy, judge = ctx.last_measured.samples, ctx.last_measured.proxy, ctx.last_measured.judge
    elif artifact.sampler is not None:
        samples = artifact.sampler(prompts, ctx.seed + EVAL_SEED_OFFSET)  # a SampleBatch, or bare texts
        # per prompt, for samples.jsonl and the rows: a SampleBatch by its ids, a plugin's texts as text
        proxy, judge = ctx.score_free(samples) if isinstance(samples, SampleBatch) else ctx.score_free(prompts, samples)
        point = ctx.log_point(-1, responses=samples, label="final", scores=(proxy, judge), **kl_info)
    else:
        raise ValueError(f"method {cfg.method['name']}: train() returned a PolicyArtifact with neither path nor sampler")
    known = isinstance(samples, SampleBatch)  # ids and finished flags (a plugin's sampler may give texts)
    responses = samples.responses if known else samples
    # a context built by hand may lack the chosen responses: their fields are then left out
    chosen_proxy, chosen_judge = chosen_scores(ctx) if ctx.eval_chosen else ([None] * len(prompts),) * 2
    with open(ctx.out_dir / "samples.jsonl", "w") as f:
        meta = ctx.eval_meta or [{}] * len(prompts)  # a context built without it (by hand) still writes rows
        for i, (p, r, s, j, m) in enumerate(zip(prompts, responses, proxy, judge, meta)):
            row = {"prompt_id": i, "config": config_id, "prompt": p, "response": r, "proxy_reward": s,
                   "judge_reward": j, "judge": ctx.judge_name, **m,
                   "chosen_judge_reward": chosen_judge[i], "chosen_proxy_reward": chosen_proxy[i]}
            if known:
                row["finished"] = samples.finished[i]
            f.write(json.dumps(row) + "\n")
    ident = dict(sweep=Path(cfg.paths.sweep_dir).name, run=ctx.out_dir.name, method=cfg.method["name"],
                 config=config_id, seed=cfg.seed)
    rows = []
    for metric, values in (("proxy_reward", proxy), (f"{ctx.judge_name}_reward", judge)):
        v, lo, hi = bootstrap_ci(values, n_boot=cfg.eval.bootstrap, seed=cfg.seed)
        rows.append(make_row(evaluator="policy", metric=metric, slice="heldout", value=v, ci_low=lo, ci_high=hi,
                             n=len(values), **ident))
    for k in ("kl_k1", "kl_k3", "kl_bound", "kl_estimate", "truncation_rate"):
        if point.get(k) is not None:
            rows.append(make_row(evaluator="policy", metric=k, slice="heldout", value=point[k], n=len(prompts), **ident))
    if ctx.eval_chosen:
        rows.append(win_rate_row(judge, chosen_judge, n_boot=cfg.eval.bootstrap, boot_seed=cfg.seed,
                                 evaluator="policy", slice="vs:chosen", **ident))
        rows += temperature_rows(ctx, artifact, model=model, chosen_judge=chosen_judge, config_id=config_id,
                                 ident=ident)
    if ctx.judge_name == "gold":  # hh_synth: the gold reward's safety and helpfulness parts apart
        rows += safety_rows(prompts, responses, n_boot=cfg.eval.bootstrap, boot_seed=cfg.seed, **ident)
    rows += gatt_rows(ctx, policy_draw(ctx, artifact, model), ident)  # adherence by turn (system instructions)
    rows += pm_rows(ctx)
    rows += nlp_task_rows(ctx, artifact, ident)
    write_rows(ctx.out_dir / "results.csv", rows)
    metrics = {"method": cfg.method["name"], "family": method_family(cfg.method["name"], ctx.method_cfg),
               "config": config_id, "seed": cfg.seed, "run_id": ctx.out_dir.name,
               "final": {k: v for k, v in point.items() if isinstance(v, (int, float)) and k != "seed"},
               "cost": {k: point[k] for k in ("wall_s", "tokens_trained", "tokens_generated", "pm_calls", "flops",
                                              "annotations", "measure_s")},
               "stages": ctx.stages.keys(), "stages_reused": ctx.stages.reused(), "info": artifact.info,
               "pm": pm_record(ctx), "reward": _reward_record(ctx, artifact),
               "pi0_safety": pi0_safety_record(ctx.cfg, ctx.stages.pi0),
               "judge": ctx.judge_name, "judge_pm": judge_record(ctx),
               "eval_prompts": prompt_mix(ctx.eval_meta, cfg.eval.split),
               "hardware": {"processes": ctx.dist.world, "device": str(ctx.device), "precision": cfg.train.precision}}
    picked = selection(ctx, artifact, model)
    if picked is not None:
        metrics["selection"] = picked
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _reward_record(ctx: RunContext, artifact: PolicyArtifact) -> dict:
    """The reward the method optimised (``reward.reward_record``); a method that trained against
    scorers of its own (iterated RLHF's retrained PMs) reports their counts in ``info["reward_counts"]``."""
    counts = artifact.info.get("reward_counts")
    with ctx.cost.measuring():
        record = reward_record(ctx.cfg, ctx.pm, ctx.eval_prompts, ctx.eval_meta or [],
                               counts=tuple(counts) if counts is not None else None)
    return {**record, "pms": reward_pms(ctx.stages)}


def pm_rows(ctx: RunContext) -> list[dict]:
    """The shared PM's held-out evaluation (accuracy by turn, calibration, thresholds, gold)."""
    pm = ctx.stages.pm
    recs = [json.loads(line) for line in (pm.path / "heldout_scores.jsonl").read_text().splitlines()]
    if not recs:
        return []
    sc = np.array([r["score_chosen"] for r in recs])
    sr = np.array([r["score_rejected"] for r in recs])
    ident = dict(sweep=Path(ctx.cfg.paths.sweep_dir).name, run=f"pm-{pm.key}", method="pm", config=pm_label(ctx.cfg),
                 seed=ctx.cfg.stages.seed)
    rows = pm_accuracy.heldout_rows(heldout_credits(recs), n_boot=ctx.cfg.eval.bootstrap,
                                    boot_seed=ctx.cfg.stages.seed, **ident)
    rows += pm_accuracy.accuracy_by_turn(sc, sr, [r["n_turns"] for r in recs], [r["subset"] for r in recs], **ident)
    calib, _ = pm_accuracy.calibration(sc, sr, **ident)
    rows += calib
    both = np.concatenate([sc, sr])
    rows += pm_accuracy.threshold_accuracy(sc, sr, np.quantile(both, [0.0, 0.25, 0.5, 0.75, 0.9]), **ident)
    if recs[0].get("gold_chosen") is not None:
        rows += pm_accuracy.gold_agreement(sc, sr, [r["gold_chosen"] for r in recs],
                                           [r["gold_rejected"] for r in recs], **ident)
    return rows


def judge_record(ctx: RunContext) -> Optional[dict]:
    """The test-PM judge's held-out accuracy against the human labels on the HH test pairs, from its
    stage record (``heldout_accuracy``, ties half right; ``heldout_pairs``), for the report's
    Findings; None when the judge is the gold reward (exact, nothing held out to measure)."""
    pm = ctx.stages.judge_pm
    if ctx.judge_name != "test_pm" or pm is None:
        return None
    return {"key": pm.key, "heldout_accuracy": pm.record.get("metrics", {}).get("heldout_accuracy"),
            "heldout_pairs": pm.record.get("data_counts", {}).get("heldout_pairs")}


def pm_record(ctx: RunContext) -> dict:
    """The proxy PM's identity for the report (``alignbench.report.pm_objectives``): its name in
    the rows, stage key, variant settings and the human judgements it trained on."""
    pm = ctx.stages.pm
    return {"label": pm_label(ctx.cfg), "key": pm.key, **pm_variant(ctx.cfg),
            "judgements_used": _judgements(pm.record)}


def _judgements(record: dict) -> Optional[int]:
    """The human judgements a PM stage trained on; a record cached before they were recorded
    (the same key: the default pairwise PM) trained on one per training pair."""
    counts = record.get("data_counts", {})
    return counts.get("judgements", counts.get("train_pairs"))


def nlp_task_rows(ctx: RunContext, artifact: PolicyArtifact, ident: dict) -> list[dict]:
    """NLP-task regressions through lm-eval: this run's policy, and for the baseline run also the
    base LM, so the report can show base -> π0 -> policy deltas (the alignment tax)."""
    cfg = ctx.cfg
    if not cfg.eval.nlp_tasks or (cfg.eval.nlp_seeds is not None and cfg.seed not in cfg.eval.nlp_seeds):
        return []
    from alignbench.eval.nlp_tasks import check_local_data, nlp_rows, run_nlp_tasks
    check_local_data(list(cfg.eval.nlp_tasks), cfg.eval.nlp_data_dir)
    models = []
    if artifact.path is not None:
        models.append((artifact.path, ident))
    else:  # inference-time policies (best-of-n) share π0's weights: their NLP scores are π0's
        log.info("nlp tasks: %s has no weights of its own; skipped", ident["method"])
    if cfg.method["name"] == "context_distilled" and not same_weights(ctx.stages.base.path, ctx.stages.pi0.path):
        models.append((ctx.stages.base.path, {**ident, "run": f"base-{ctx.stages.base.key}", "method": "base_lm",
                                                 "config": "base_lm"}))
    rows = []
    for path, who in models:
        res = run_nlp_tasks(str(path), list(cfg.eval.nlp_tasks), limit=cfg.eval.nlp_limit,
                            data_dir=cfg.eval.nlp_data_dir, device=str(ctx.device), seed=0,
                            max_length=ctx.max_len)
        run_ident = {k: v for k, v in who.items() if k != "config"}  # nlp_rows knows the run, not its config
        rows += [{**r, "config": who["config"]} for r in nlp_rows(res, **run_ident)]
    return rows
