"""The final evaluation's views beyond one sample per test prompt (issue 12):

- the dataset's chosen response to each eval prompt, scored by the judge and the proxy: the win
  rate against it (the DPO paper's HH metric);
- k samples per prompt at each of ``eval.temperatures`` on the first ``eval.temperature_prompts``
  eval prompts: reward and win rate against the chosen response per temperature (sample 0) and
  diversity (distinct-n, self-BLEU over all k) -> samples_by_temperature.jsonl and results rows;
- the selection split: one sample per prompt on ``eval.selection_prompts`` prompts of the EVAL
  split, so that a report picks a family's best configuration without looking at the test prompts.

All of it is measurement: free, never charged to the method (best-of-n's sampler is asked for a
measurement draw by passing ``temperature``).
"""
from __future__ import annotations

import inspect
import json
import logging
from typing import Callable, Optional

import numpy as np

from alignbench.context import RunContext, kl_estimates
from alignbench.data import load_data
from alignbench.data.instructions import HUMAN_TAG, check_instruction, heldout_instruction
from alignbench.eval.diversity import distinct_n, self_bleu
from alignbench.eval.gatt import adherence_by_turn
from alignbench.eval.stats import bootstrap_ci, make_row
from alignbench.eval.win_rate import outcomes as win_outcomes  # 1 win, 0.5 tie, 0 loss per prompt
from alignbench.methods import PolicyArtifact
from alignbench.sampling import SampleBatch
from alignbench.stages.gatt import has_instructions, training_transcript, user_turns

log = logging.getLogger(__name__)
TEMPERATURE_SEED_OFFSET = 30_011  # one stream for every temperature: common random numbers across T
SELECTION_SEED_OFFSET = 40_009


def method_family(method: str, method_cfg) -> str:
    """The frontier's family of a run: the method name, except rejection sampling, which is two
    families by its mode (best_of_n: inference-time; finetune: "rs_finetune")."""
    if method == "rejection_sampling":
        return "best_of_n" if getattr(method_cfg, "mode", "best_of_n") == "best_of_n" else "rs_finetune"
    return method


def win_rate_row(judge: list[float], judge_ref: list[float], n_boot: int, boot_seed: int, **ident) -> dict:
    """Win rate of the samples against reference responses of the same prompts by the judge:
    mean over prompts of [j > j_ref] + ½[j = j_ref], with a percentile-bootstrap CI over prompts."""
    wins = win_outcomes(np.asarray(judge, float), np.asarray(judge_ref, float), 0.0)
    v, lo, hi = bootstrap_ci(wins, n_boot=n_boot, seed=boot_seed)
    return make_row(metric="win_rate_vs_chosen", value=v, ci_low=lo, ci_high=hi, n=len(wins), **ident)


def takes_temperature(sampler) -> bool:
    """Whether an inference-time policy's sampler accepts ``temperature=`` (plugins written for the
    older ``sampler(prompts, seed)`` protocol do not)."""
    try:
        params = inspect.signature(sampler).parameters
    except (TypeError, ValueError):
        return False
    return "temperature" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def draw(ctx: RunContext, artifact: PolicyArtifact, model, prompts: list[str], n: int, temperature: float,
         seed: int) -> Optional[SampleBatch | list[str]]:
    """n samples per prompt (prompt-major) at ``temperature``, for measurement: from the trained
    weights, or the artifact's sampler asked once per prompt copy (None: it takes no temperature)."""
    if model is not None:
        return ctx.sample_free(model, prompts, n=n, temperature=temperature, seed=seed)
    if not takes_temperature(artifact.sampler):
        return None
    return artifact.sampler([p for p in prompts for _ in range(n)], seed, temperature=temperature)


def policy_draw(ctx: RunContext, artifact: PolicyArtifact, model) -> Callable:
    """The run's policy as one ``draw(prompts, n, temperature, seed)`` (``draw``), for evaluators that
    must not know whether it is weights or a sampler."""
    return lambda prompts, n, temperature, seed: draw(ctx, artifact, model, prompts=prompts, n=n,
                                                      temperature=temperature, seed=seed)


def chosen_scores(ctx: RunContext) -> tuple[list[float], list[float]]:
    """(proxy, judge) rewards of the dataset's chosen response to each eval prompt (the same texts
    for every run of a sweep: scored once, ``RunContext.score_texts_free``)."""
    return ctx.score_texts_free(ctx.eval_prompts, ctx.eval_chosen)


def temperature_rows(ctx: RunContext, artifact: PolicyArtifact, model, chosen_judge: list[float], config_id: str,
                     ident: dict) -> list[dict]:
    """Sample, score and write samples_by_temperature.jsonl; return the temperature and diversity rows."""
    cfg = ctx.cfg
    temps, k = list(cfg.eval.temperatures), cfg.eval.diversity_samples
    if not temps:
        return []
    n_p = min(cfg.eval.temperature_prompts, len(ctx.eval_prompts))
    prompts, rows = ctx.eval_prompts[:n_p], []
    with open(ctx.out_dir / "samples_by_temperature.jsonl", "w") as f:
        for t in temps:
            out = draw(ctx, artifact, model, prompts=prompts, n=k, temperature=t,
                       seed=ctx.seed + TEMPERATURE_SEED_OFFSET)
            if out is None:
                log.info("temperature evaluation: %s's sampler takes no temperature; skipped", config_id)
                return []
            known = isinstance(out, SampleBatch)
            texts = out.responses if known else list(out)
            repeated = [p for p in prompts for _ in range(k)]  # prompt-major, like the samples
            proxy, judge = ctx.score_free(out) if known else ctx.score_free(repeated, texts)
            for r, (text, s, j) in enumerate(zip(texts, proxy, judge)):
                i = r // k
                f.write(json.dumps({"prompt_id": i, "config": config_id, "seed": cfg.seed, "temperature": t,
                                    "sample": r % k, "response": text, "proxy_reward": s, "judge_reward": j,
                                    "finished": out.finished[r] if known else None,
                                    "chosen_judge_reward": chosen_judge[i]}) + "\n")
            first = slice(0, None, k)  # sample 0 of each prompt: one response per prompt, like samples.jsonl
            at = dict(slice=f"T={t:g}", **ident)
            for metric, values in (("judge_reward", judge[first]), ("proxy_reward", proxy[first])):
                v, lo, hi = bootstrap_ci(values, n_boot=cfg.eval.bootstrap, seed=cfg.seed)
                rows.append(make_row(evaluator="temperature", metric=metric, value=v, ci_low=lo, ci_high=hi,
                                     n=n_p, **at))
            rows.append(win_rate_row(judge[first], chosen_judge[:n_p], n_boot=cfg.eval.bootstrap, boot_seed=cfg.seed,
                                     evaluator="temperature", **at))
            groups = [texts[i * k:(i + 1) * k] for i in range(n_p)]
            for n in (1, 2):
                rows.append(make_row(evaluator="diversity", metric=f"distinct_{n}", value=distinct_n(texts, n),
                                     n=len(texts), **at))
            v, lo, hi = bootstrap_ci([self_bleu([g]) for g in groups], n_boot=cfg.eval.bootstrap, seed=cfg.seed)
            rows.append(make_row(evaluator="diversity", metric="self_bleu", value=v, ci_low=lo, ci_high=hi, n=n_p,
                                 **at))
    return rows


def selection(ctx: RunContext, artifact: PolicyArtifact, model) -> Optional[dict]:
    """metrics.json "selection": one sample per prompt at eval.temperature on the selection prompts
    (EVAL split), its mean judge and proxy reward, KL(π‖π0) (k3; best-of-n: its plug-in estimate)
    and the per-prompt judge rewards. None when eval.selection_prompts is 0."""
    prompts = ctx.selection_prompts
    if not prompts:
        return None
    seed = ctx.seed + SELECTION_SEED_OFFSET
    if model is not None:
        out = ctx.sample_free(model, prompts, temperature=ctx.cfg.eval.temperature, seed=seed)
        # KL(π‖π0), as every point: the training reference may be another policy (a chain's start)
        kl = kl_estimates(model, ctx.pi0(), out, ctx.tokenizer.pad_token_id, ctx.device)["kl_k3"]
    else:
        out = (artifact.sampler(prompts, seed, temperature=ctx.cfg.eval.temperature)
               if takes_temperature(artifact.sampler) else artifact.sampler(prompts, seed))
        kl = artifact.info.get("kl_estimate")  # best-of-n's plug-in estimate; a plugin's own, if any
    proxy, judge = ctx.score_free(out) if isinstance(out, SampleBatch) else ctx.score_free(prompts, list(out))
    return {"split": "eval", "n": len(prompts), "judge_reward": float(np.mean(judge)),
            "proxy_reward": float(np.mean(proxy)), "kl": kl, "judge_rewards": judge}


GATT_EVAL_SEED_OFFSET = 60_013  # the GAtt adherence samples' stream (turn k adds k)


def eval_dialogues(cfg) -> list[tuple[str, list[str]]]:
    """(HELD-OUT instruction, user turns) of the eval-split dialogues with max_turns Human turns."""
    prompts = dict.fromkeys(p.prompt for p in load_data(cfg.data).splits["eval"]
                            if p.prompt.count(HUMAN_TAG) == cfg.data.synth.max_turns)
    picked = list(prompts)[: cfg.eval.n_prompts]
    return [(heldout_instruction(cfg.data.seed, i), user_turns(p)) for i, p in enumerate(picked)]


def gatt_rows(ctx: RunContext, draw: Callable, ident: dict) -> list[dict]:
    """Adherence rows of the run's policy, written with its replies to gatt_samples.jsonl; [] without
    system instructions in the data or when the policy cannot be drawn from at a temperature.
    ``draw(prompts, n, temperature, seed)``: the policy's samples (a SampleBatch or texts), or None
    (``policy_measures.policy_draw``)."""
    cfg = ctx.cfg
    if not has_instructions(cfg):
        return []
    dialogues = eval_dialogues(cfg)
    replies: list[list[str]] = [[] for _ in dialogues]
    for t in range(cfg.data.synth.max_turns):
        prompts = [training_transcript(inst, users[: t + 1], replies[i] + [""])[0]
                   for i, (inst, users) in enumerate(dialogues)]
        out = draw(prompts, 1, cfg.eval.temperature, ctx.seed + GATT_EVAL_SEED_OFFSET + t)
        if out is None:
            log.info("gatt adherence: %s's sampler takes no temperature; skipped", ident.get("config"))
            return []
        texts = out.responses if isinstance(out, SampleBatch) else list(out)
        for i, text in enumerate(texts):
            replies[i].append(" " + text.strip())
    follows = [[check_instruction(inst, r) for r in rs] for (inst, _), rs in zip(dialogues, replies)]
    with open(ctx.out_dir / "gatt_samples.jsonl", "w") as f:
        for i, ((inst, users), rs, ok) in enumerate(zip(dialogues, replies, follows)):
            f.write(json.dumps({"dialogue": i, "instruction": inst, "users": users, "replies": rs,
                                "follows": ok}) + "\n")
    rows = []
    for k, values in adherence_by_turn(follows).items():
        v, lo, hi = bootstrap_ci(values, n_boot=cfg.eval.bootstrap, seed=cfg.seed)
        rows.append(make_row(evaluator="gatt", metric="adherence", slice=f"turn:{k}", value=v, ci_low=lo,
                             ci_high=hi, n=len(values), **ident))
    return rows
