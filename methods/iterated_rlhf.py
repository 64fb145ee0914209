"""Online iterated RLHF (Bai et al. 2022 §4.5): R rounds of

    1. the current policy samples two responses for each of M fresh training prompts (charged);
    2. the simulated annotator labels each pair (``alignbench.data.annotator``); the M labels are
       bought (``ctx.charge_annotations``, capped by budget.annotations) before they are used;
    3. the PM is retrained from its init on every comparison so far (exactly the round-0 PM's
       comparisons, ``stages.pm.judgements`` of them when set, + every bought one), or continues
       training on the new round's ones (``pm_update``), always with the round-0 PM's settings
       (``stages.pm``: lr, batch size, epochs, objective, λ; ``pm_fit_settings``); its FLOPs and
       tokens are charged to this method;
    4. the inner method (PPO, or RS fine-tuning) trains against the new PM in a sub-run, starting
       from π0 or from the last round's policy (``restart``); its KL penalty stays anchored to π0.

With ``reward.kind=safety_helpful`` (Llama 2's two reward models) step 3 retrains BOTH PMs, the
safety PM from the ``pm-safety`` stage's comparisons and the helpfulness PM from ``pm-helpful``'s,
each new comparison routed by its prompt's harm group (``data.types.harm_group`` of its subset), with
those stages' settings (the standard pairwise PM on all its group's comparisons); each
retrained PM's whitening statistics are recomputed on the eval split's comparisons of its group (as
``build_pm`` does; charged), and the inner method and the own-samples check use the combined reward
(``reward.SafetyHelpfulScorer``). ``reward.kind=single`` is unchanged.

Static RLHF with the same labels is this method with ``rounds=1`` (``static_equivalent``): all R·M
labels bought once on π0's samples, the inner method's steps multiplied by R.

Every log point (π0's included, through ``point_hooks``) carries ``round`` and the PM-on-own-samples
check (``OwnSampleCheck``): on ``own_check_samples`` samples per eval prompt of the measured policy,
how often the PM the policy trains against orders two samples of one prompt like the judge, overall
and where both PM scores are above the check's ``high_score_quantile`` (the region Bai found
unreliable). Measurement: free, its own sampling seed.

Resume: each round is two sub-runs (``alignbench.subruns``), ``NN-labels`` (its samples, labels,
comparisons.jsonl and trained PM under pm/) and ``NN-round`` (the inner method, with its own
checkpoints); a killed run skips finished ones and resumes the unfinished inner method.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from alignbench import freeze, lora
from alignbench.config import ConfigError, PMStageConfig, opt
from alignbench.cost import forward_flops
from alignbench.data.annotator import PMAnnotator, SynthAnnotator
from alignbench.data.types import PreferencePair, harm_group
from alignbench.eval.pm_accuracy import gold_agreement
from alignbench.methods import BudgetExceeded, Method, MethodConfig, PolicyArtifact, nested_method_config
from alignbench.models import load_pm, load_tokenizer, pm_from_lm
from alignbench.stages.access import iterated_comparisons, iterated_parts, whitening_pairs
from alignbench.stages.preference import (REWARD_PM_STAGES, PMScorer, SampleScorer, _score_heldout, build_pm,
                                          pm_training_pairs, score_stats, stage_pm_settings, train_pm)
from alignbench.stages.reward import combined_scorer, uncounted
from alignbench.subruns import SubRun, resume_subruns
from alignbench_methods.ppo import PPO
from alignbench_methods.rejection_sampling import RejectionSampling

log = logging.getLogger(__name__)

INNER = {"ppo": PPO, "rs_finetune": RejectionSampling}
# Small inner runs per round for the tiny model on 2 CPU cores (a round well under a minute):
# overridden key by key by method.inner_config.
INNER_DEFAULTS = {"ppo": {"steps": 2, "rollout_batch_size": 64},
                  "rs_finetune": {"mode": "finetune", "rounds": 1, "prompts_per_round": 64}}
STEP_KEY = {"ppo": "steps", "rs_finetune": "rounds"}  # what static_equivalent multiplies by R
LABEL_SEED_OFFSET = 50_021  # the labelled pairs' prompts and samples (training stream, per round)
OWN_CHECK_SEED_OFFSET = 40_009  # the own-samples check's samples (measurement stream)
HELDOUT_PAIRS = 512  # test-split comparisons each round's PM is scored on (record only)


@dataclass
class IteratedRLHFConfig(MethodConfig):
    name: str = "iterated_rlhf"
    rounds: int = opt(3, ge=1)  # R; 1 = static RLHF (static_equivalent)
    prompts_per_round: int = opt(64, gt=0)  # M: fresh training prompts, 2 samples and 1 bought label each
    inner: str = opt("ppo", choices=list(INNER))
    inner_config: Dict[str, Any] = opt(factory=dict)  # the inner method's settings over INNER_DEFAULTS
    restart: str = opt("last", choices=["pi0", "last"])  # each round's policy starts from π0 or the last round's
    pm_update: str = opt("retrain", choices=["retrain", "continue"])
    own_check_samples: int = opt(4, ge=2)  # samples per eval prompt of the PM-on-own-samples check
    high_score_quantile: float = opt(0.5, ge=0, lt=1)  # the check's high-score region: both PM scores above it

    def validate(self, prefix: str) -> None:
        inner_method_config(self, prefix)


def inner_method_config(cfg: IteratedRLHFConfig, prefix: str = "method") -> Any:
    """The inner method's config: INNER_DEFAULTS[inner] updated by ``inner_config``, validated by
    that method's own dataclass; errors name ``<prefix>.inner_config.<key>``."""
    cls = INNER[cfg.inner]
    settable = {f.name for f in dataclasses.fields(cls.config_class)} - {"name", "mode"}
    return nested_method_config(cls, dict(cfg.inner_config), f"{prefix}.inner_config", INNER_DEFAULTS[cfg.inner],
                                settable=settable)


def static_equivalent(cfg: IteratedRLHFConfig) -> IteratedRLHFConfig:
    """Static RLHF given the same labels: one round of R·M prompts (every label bought on π0's
    samples) and the inner method's steps (PPO ``steps``, RS ``rounds``) multiplied by R."""
    inner = inner_method_config(cfg)
    key = STEP_KEY[cfg.inner]
    return dataclasses.replace(cfg, rounds=1, prompts_per_round=cfg.rounds * cfg.prompts_per_round,
                               inner_config={**cfg.inner_config, key: getattr(inner, key) * cfg.rounds})


def regime(cfg: IteratedRLHFConfig) -> str:
    """How the report labels a configuration: "static" (one round) or "iterated"."""
    return "static" if cfg.rounds == 1 else "iterated"


# --------------------------------------------------------------------------- the own-samples check
def own_sample_accuracy(pm_scores, judge_scores, group: int, quantile: float) -> dict:
    """The PM's accuracy on a policy's own samples, ``group`` consecutive samples per prompt.

    Over all pairs (i, j) of one prompt with judge_i ≠ judge_j, credit 1 when
    sign(pm_i − pm_j) = sign(judge_i − judge_j), ½ on a PM tie, else 0:
    pm_accuracy_own = Σ credit / pm_own_pairs. The same over the pairs with both PM scores > t,
    t the ``quantile`` of all the check's PM scores: pm_accuracy_own_high / pm_own_pairs_high.
    An accuracy over no pair is None."""
    pm, judge = np.asarray(pm_scores, float), np.asarray(judge_scores, float)
    if len(pm) != len(judge) or len(pm) % group:
        raise ValueError(f"own_sample_accuracy: {len(pm)} PM and {len(judge)} judge scores in groups of {group}")
    t = float(np.quantile(pm, quantile)) if len(pm) else 0.0
    i, j = np.triu_indices(group, k=1)
    base = np.arange(0, len(pm), group)[:, None]
    a, b = (base + i).ravel(), (base + j).ravel()
    dj, dp = judge[a] - judge[b], pm[a] - pm[b]
    ordered = dj != 0
    credit = np.where(dp == 0, 0.5, (np.sign(dp) == np.sign(dj)).astype(float))
    high = ordered & (pm[a] > t) & (pm[b] > t)
    n, n_high = int(ordered.sum()), int(high.sum())
    return {"pm_accuracy_own": float(credit[ordered].mean()) if n else None, "pm_own_pairs": n,
            "pm_accuracy_own_high": float(credit[high].mean()) if n_high else None, "pm_own_pairs_high": n_high}


@dataclass
class OwnSampleCheck:
    """Point hook: ``own_sample_accuracy`` of the measured policy's samples under ``pm`` (the PM the
    policy trains against, updated each round) and the run's judge, plus the current ``round``."""
    pm: PMScorer
    samples: int
    quantile: float
    round: int = 0

    def __call__(self, ctx, model, responses) -> dict:
        if model is None:  # an inference-time policy has no model to sample
            return {"round": self.round}
        torch_state, py_state = torch.get_rng_state(), random.getstate()  # the training streams stay untouched
        with ctx.cost.measuring(), uncounted(self.pm):
            batch = ctx.sample_free(model, ctx.eval_prompts, n=self.samples, temperature=ctx.cfg.eval.temperature,
                                    seed=ctx.seed + OWN_CHECK_SEED_OFFSET)
            pm = SampleScorer(self.pm, ctx.tokenizer, ctx.fmt)(batch).tolist()
            judge = ctx.judge(batch.prompts, batch.responses, samples=batch)
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        return {"round": self.round, **own_sample_accuracy(pm, judge, self.samples, self.quantile)}


# --------------------------------------------------------------------------- PM training
def pm_init_stage(ctx):
    """The artifact every PM here starts from (stages.pm.init: π0 or the base LM)."""
    return ctx.stages.pm_init_lm if ctx.cfg.stages.pm.init == "pi0" else ctx.stages.base


def start_pm_path(ctx) -> Path:
    """The PM round 1 starts from: the shared proxy PM on hh_synth, a PM on part "a1" on real HH
    (``iterated_parts``: the annotator PM has "a2")."""
    part = iterated_parts(ctx.cfg)[0]
    return ctx.stages.pm.path if part in ("all", "a") else build_pm(ctx.cfg, pm_init_stage(ctx), part).path


def two_pms(ctx) -> bool:
    """Llama 2's safety and helpfulness PMs (reward.kind=safety_helpful) instead of one PM."""
    return ctx.cfg.reward.kind == "safety_helpful"


def start_reward_pms(ctx) -> dict:
    """harm group -> (the PM stage round 1 starts from, its whitening statistics): the shared
    ``pm-safety`` / ``pm-helpful`` stages on hh_synth, the same PMs on part "a1" on real HH."""
    part = iterated_parts(ctx.cfg)[0]
    shared = {"harmless": ctx.stages.safety_pm, "helpful": ctx.stages.helpful_pm}
    stages = {g: shared[g] if part in ("all", "a") else build_pm(ctx.cfg, pm_init_stage(ctx), part, harm=g)
              for g in REWARD_PM_STAGES}
    return {g: (a.path, a.record["score_stats"]) for g, a in stages.items()}


def reward_from(ctx, paths: dict, stats: dict):
    """The combined reward of the two PMs at ``paths`` (harm group -> dir) whitened with ``stats``."""
    safety, helpful = (PMScorer(paths[g], ctx.device, ctx.max_len, fmt=ctx.fmt) for g in ("harmless", "helpful"))
    return combined_scorer(ctx.cfg, safety, helpful, (stats["harmless"], stats["helpful"]))


def round_scorer(ctx, labels: SubRun, done: dict):
    """The reward round ``labels`` trained: its PM, or its two PMs combined (``done``: the labels
    sub-run's record, which holds the whitening statistics)."""
    if not two_pms(ctx):
        return PMScorer(labels.dir / "pm", ctx.device, ctx.max_len, fmt=ctx.fmt)
    return reward_from(ctx, {g: labels.dir / name for g, name in REWARD_PM_STAGES.items()}, done["score_stats"])


def whitening_stats(ctx, scorer: PMScorer, group: str) -> dict:
    """A retrained PM's ``score_stats`` on the eval split's comparisons of its harm group, as
    ``build_pm`` computes them for the shared PMs; charged (2·N FLOPs per token read): the reward
    the policy then trains on needs them."""
    tokens = scorer.tokens
    stats = score_stats(_score_heldout(scorer, whitening_pairs(ctx.cfg, group)))
    ctx.cost.flops += forward_flops(ctx.n_params(scorer.model), scorer.tokens - tokens)
    return stats


def pm_fit_settings(cfg, harm: Optional[str] = None) -> PMStageConfig:
    """The settings of every PM fit of the run, round 0's and each retrain's: those of the PM stage
    round 1 starts from (``start_pm_path`` / ``start_reward_pms``), ``preference.stage_pm_settings``
    of the ``iterated_parts`` part (``harm``: the safety or helpfulness PM's)."""
    return stage_pm_settings(cfg, iterated_parts(cfg)[0], harm)


def start_comparisons(cfg, data=None, harm: Optional[str] = None) -> list:
    """The comparisons the round-0 PM (``harm``: that reward PM) trained on, exactly: every pool
    starts from them (``preference.pm_training_pairs`` of the ``iterated_parts`` part; with
    ``stages.pm.judgements`` = N the first N of them, not the whole part). ``data``: the run's data
    (None: the stage reads it, as every stage does)."""
    return pm_training_pairs(cfg, data, iterated_parts(cfg)[0], harm)


def round_pool(start: list, bought: list, pm_update: str) -> list:
    """Round r's PM training comparisons, ``bought`` the labels of rounds 1..r (a list per round):
    retrain = ``start`` + every bought label in order (|pool| = N + Σ M_i); continue = round r's."""
    return start + [p for labels in bought for p in labels] if pm_update == "retrain" else list(bought[-1])


def check_pm_settings(cfg, mcfg: IteratedRLHFConfig) -> None:
    """What the retrained PMs cannot share with the round-0 PM fails before anything is bought."""
    if cfg.stages.pm.objective == "lm":
        raise ConfigError("stages.pm.objective: lm has nothing to retrain; iterated_rlhf needs a trained PM "
                          "(pairwise, ranking or classifier)")
    if cfg.stages.pm.pmp_path and mcfg.pm_update == "retrain":  # the round-0 PM pretrained, a retrain would not
        raise ConfigError("stages.pm.pmp_path: iterated_rlhf's retrained PMs start from stages.pm.init without "
                          "preference-model pretraining; use method.pm_update=continue or no pmp_path")


def train_pm_on(ctx, model, tok, comparisons: list, settings: PMStageConfig, desc: str) -> dict:
    """The one call into the PM trainer, with ``settings`` (``pm_fit_settings``: objective, λ, batch
    size, lr, epochs, max_steps), so the trainer can change in one place."""
    return train_pm(model, tok, comparisons, epochs=settings.epochs, cfg=ctx.cfg, device=ctx.device,
                    max_len=ctx.max_len, desc=desc, log_step=None, settings=settings)


def fit_pm(ctx, comparisons: list, *, settings: PMStageConfig, init: Optional[Path], out: Path, seed: int) -> dict:
    """Train a PM on ``comparisons`` with ``settings`` (from the PM init when ``init`` is None, else
    continuing the PM at ``init``), charge its tokens and 6·N FLOPs per token, save it to ``out``."""
    ctx.check_budget()
    if not comparisons:  # continue with no new comparison of this PM's group: the PM stays as it was
        shutil.copytree(init, out, dirs_exist_ok=True)
        return {"pairs": 0, "steps": 0, "train_tokens": 0, "first_loss": None, "final_loss": None}
    tok = load_tokenizer(pm_init_stage(ctx).path)
    torch.manual_seed(seed)
    model = pm_from_lm(pm_init_stage(ctx).path, tok, seed) if init is None else load_pm(init)
    # LoRA: adapters + the scalar head train, saved merged; trainable_layers: the top + the head
    model = freeze.prepare(model, ctx.cfg.model, task="SEQ_CLS", seed=seed)
    metrics = train_pm_on(ctx, model, tok, comparisons, settings=settings, desc=f"PM round {out.parent.name}")
    ctx.charge_step(metrics["train_tokens"], model=model)
    if ctx.dist.is_main:
        lora.save(model.to("cpu"), out)
        tok.save_pretrained(out)
    return {k: metrics[k] for k in ("pairs", "steps", "train_tokens", "first_loss", "final_loss")}


def heldout_accuracy(ctx, scorer: PMScorer, test: list) -> dict:
    """The PM on the first HELDOUT_PAIRS test comparisons (measurement): gold accuracy on hh_synth
    (pairs tied on gold left out, PM ties half), accuracy against the labels elsewhere."""
    pairs = test[:HELDOUT_PAIRS]
    with ctx.cost.measuring():
        chosen, rejected = scorer.score_pairs(pairs)
    if all("gold_chosen" in p.meta for p in pairs):
        rows = gold_agreement(chosen.tolist(), rejected.tolist(), [p.meta["gold_chosen"] for p in pairs],
                              [p.meta["gold_rejected"] for p in pairs])
        row = next(r for r in rows if r["metric"] == "gold_accuracy")
        return {"pm_heldout_gold_accuracy": row["value"], "pm_heldout_pairs": row["n"]}
    delta = (chosen - rejected).numpy()
    return {"pm_heldout_label_accuracy": float(np.where(delta == 0, 0.5, delta > 0).mean()),
            "pm_heldout_pairs": len(pairs)}


def write_comparisons(path: Path, pairs: list) -> None:
    path.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))


def read_comparisons(path: Path) -> list:
    return [PreferencePair(**json.loads(line)) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- the method
class IteratedRLHF(Method):
    """Online iterated RLHF: rounds of sample -> simulated labels -> PM update -> PPO/RS (Bai et al. §4.5)."""

    name = "iterated_rlhf"
    config_class = IteratedRLHFConfig

    def point_hooks(self, ctx) -> list:
        """The own-samples check, on every point from π0's on (the runner installs it)."""
        cfg: IteratedRLHFConfig = ctx.method_cfg
        if two_pms(ctx):
            start = start_reward_pms(ctx)
            pm = reward_from(ctx, {g: p for g, (p, _) in start.items()}, {g: st for g, (_, st) in start.items()})
        else:
            path = start_pm_path(ctx)
            pm = ctx.pm if path == ctx.stages.pm.path else PMScorer(path, ctx.device, ctx.max_len, fmt=ctx.fmt)
        return [OwnSampleCheck(pm, cfg.own_check_samples, cfg.high_score_quantile)]

    def train(self, ctx) -> PolicyArtifact:
        cfg: IteratedRLHFConfig = ctx.method_cfg
        check_pm_settings(ctx.cfg, cfg)  # before anything is bought or trained
        inner_cls, inner_cfg = INNER[cfg.inner], inner_method_config(cfg)
        hook = next((h for h in ctx.point_hooks if isinstance(h, OwnSampleCheck)), None)
        if hook is None:  # called without the runner (a test): install it here
            hook = self.point_hooks(ctx)[0]
            ctx.point_hooks = [*ctx.point_hooks, hook]
        base_pairs, self.test_pairs = iterated_comparisons(ctx.cfg)
        # each PM's pool starts from exactly its round-0 PM's comparisons (harm group -> them with two PMs)
        start = ({g: start_comparisons(ctx.cfg, harm=g) for g in REWARD_PM_STAGES} if two_pms(ctx)
                 else start_comparisons(ctx.cfg))
        annotator_part = iterated_parts(ctx.cfg)[1]
        subsets = {p.prompt: p.subset for p in base_pairs}
        # the inner method rolls out on the prompts of the comparisons the PM starts from (on real HH
        # not the annotator's), rotated each round so that its seeded draws differ
        inner_prompts = list(dict.fromkeys(p.prompt for p in base_pairs))
        prompts = list(inner_prompts)
        random.Random(ctx.seed + LABEL_SEED_OFFSET).shuffle(prompts)  # round r takes the r-th slice: fresh prompts
        annotator = self._annotator(ctx, annotator_part)
        subs = [s for r in range(1, cfg.rounds + 1) for s in (SubRun(ctx, r, "labels"), SubRun(ctx, r, "round"))]
        first = resume_subruns(subs)
        records = [s.done()["record"] for s in subs[1:first:2]]
        steps = records[-1]["steps_total"] if records else 0
        policy_path = Path(records[-1]["policy"]) if records else None  # None: π0
        hook.round = len(records)
        if records:  # the check's PM is the last finished round's
            last = subs[2 * len(records) - 2]
            hook.pm = round_scorer(ctx, last, last.done())
        stopped = None
        for r in range(len(records) + 1, cfg.rounds + 1):
            labels, rnd = subs[2 * r - 2], subs[2 * r - 1]
            try:
                bought = labels.done() or self._label_and_fit(
                    ctx, cfg, labels=labels, r=r, start=start, prompts=prompts, subsets=subsets,
                    annotator=annotator, policy_path=policy_path, subs=subs)
            except BudgetExceeded as e:  # no labels this round: the current policy is the run's
                stopped = str(e)
                policy = ctx.load(policy_path or ctx.stages.pi0.path)
                ctx.log_point(steps, model=policy, label="end")
                policy_path = ctx.save_policy(policy)
                break
            scorer = round_scorer(ctx, labels, bought)
            hook.pm, hook.round = scorer, r
            shift = (r - 1) * len(inner_prompts) // cfg.rounds
            sub = rnd.ctx(method_cfg=inner_cfg, pm=scorer, start_path=policy_path if cfg.restart == "last" else None,
                          step_offset=steps, point_extra={"round": r},
                          train_prompts=inner_prompts[shift:] + inner_prompts[:shift])
            artifact = inner_cls().train(sub)
            inner_steps = artifact.info.get("steps_done", artifact.info.get("steps", 0))
            steps += inner_steps
            policy_path = artifact.path
            end = _last_point(ctx.out_dir)
            record = {"round": r, "annotations": bought["annotations"], "annotations_total": ctx.cost.annotations,
                      "pm_train_pairs": bought["pm_train"]["pairs"], **bought["heldout"],
                      "pm_train": bought["pm_train"],
                      **{k: end.get(k) for k in ("pm_accuracy_own", "pm_accuracy_own_high", "pm_own_pairs",
                                                 "pm_own_pairs_high", "judge_reward", "proxy_reward", "kl_k3")},
                      "steps": inner_steps, "steps_total": steps, "policy": str(policy_path), "inner": artifact.info}
            if two_pms(ctx):  # what the combined reward scored while the inner method trained
                record["reward_counts"] = [scorer.used_safety, scorer.scored]
            records.append(record)
            log.info("iterated RLHF round %d: %d labels, PM on own samples %s, judge %.3f", r, record["annotations_total"],
                     record["pm_accuracy_own"], record["judge_reward"] or float("nan"))
            rnd.mark_done(record=record)
            inner_stop = artifact.info.get("stopped")
            if inner_stop and inner_stop != "steps done":
                stopped = inner_stop
                break
        info = {"inner": cfg.inner, "regime": regime(cfg), "restart": cfg.restart, "pm_update": cfg.pm_update,
                "labels_planned": cfg.rounds * cfg.prompts_per_round,
                "annotations": ctx.cost.annotations, "stopped": stopped, "rounds": records}
        if two_pms(ctx):  # metrics.json's reward.used_safety_share is of the rounds' rewards, not ctx.pm
            info["reward_counts"] = [sum(r["reward_counts"][i] for r in records) for i in (0, 1)]
        return PolicyArtifact(path=policy_path, info=info)

    def _annotator(self, ctx, part: Optional[str]):
        """The gold reward's Bradley–Terry labeller on hh_synth; an annotator PM on part ``part`` else."""
        if part is None:
            synth = ctx.cfg.data.synth
            return SynthAnnotator(synth.noise_temperature, synth.spurious_strength)
        stage = build_pm(ctx.cfg, pm_init_stage(ctx), part)
        scorer = PMScorer(stage.path, ctx.device, stage.record["max_len"], fmt=ctx.fmt)
        return PMAnnotator(lambda prompts, responses: scorer.score(prompts, responses).tolist())

    def _label_and_fit(self, ctx, cfg: IteratedRLHFConfig, labels: SubRun, r: int, start,
                       prompts: list, subsets: dict, annotator, policy_path: Optional[Path], subs: list) -> dict:
        """Steps 1-3 of round ``r``: 2 samples per fresh prompt from the current policy (charged), M
        labels bought then drawn, the PM retrained or continued; saved under the labels sub-run."""
        m = cfg.prompts_per_round
        batch = [prompts[((r - 1) * m + i) % len(prompts)] for i in range(m)]
        policy = ctx.load(policy_path or ctx.stages.pi0.path).eval()
        ctx.charge_annotations(m)  # bought before anything is sampled or labelled: a refused round spends nothing
        samples = ctx.sample(policy, batch, n=2, seed=ctx.seed * 1000 + r + LABEL_SEED_OFFSET)
        del policy
        with ctx.cost.measuring():  # the annotator's work is what the annotations pay for
            new = annotator(batch, samples.responses[0::2], samples.responses[1::2], [subsets[p] for p in batch],
                            seed=f"annotator:{ctx.seed}:{r}")
        labels.dir.mkdir(parents=True, exist_ok=True)
        write_comparisons(labels.dir / "comparisons.jsonl", new)
        if two_pms(ctx):
            return labels.mark_done(annotations=m, **self._fit_two(ctx, cfg, labels=labels, r=r, start=start,
                                                                   subs=subs))
        # retrain: from the PM's init on the round-0 PM's comparisons + every label bought so far (each
        # round's charged above); continue: the current PM on this round's
        train = round_pool(start, bought_labels(subs, r), cfg.pm_update)
        init = None if cfg.pm_update == "retrain" else (subs[2 * r - 4].dir / "pm" if r > 1 else start_pm_path(ctx))
        pm_train = fit_pm(ctx, train, settings=pm_fit_settings(ctx.cfg), init=init, out=labels.dir / "pm",
                          seed=ctx.cfg.stages.seed * 1000 + r)
        heldout = heldout_accuracy(ctx, PMScorer(labels.dir / "pm", ctx.device, ctx.max_len, fmt=ctx.fmt),
                                   self.test_pairs)
        return labels.mark_done(annotations=m, pm_train=pm_train, heldout=heldout)


    def _fit_two(self, ctx, cfg: IteratedRLHFConfig, labels: SubRun, r: int, start: dict, subs: list) -> dict:
        """Step 3 with two PMs: the safety and the helpfulness PM each retrained (or continued) on
        the comparisons of its harm group (``start[g]``, its round-0 stage's, + the bought ones of
        its group) with that stage's settings, whitening statistics recomputed; held-out accuracy of
        each PM on its group's test comparisons and of the combined reward on all of them (measurement)."""
        start_paths = start_reward_pms(ctx)
        bought = bought_labels(subs, r)
        pm_train, stats, heldout = {}, {}, {}
        for g, name in REWARD_PM_STAGES.items():
            own = [[p for p in labels_r if harm_group(p.subset) == g] for labels_r in bought]
            train = round_pool(start[g], own, cfg.pm_update)
            init = None if cfg.pm_update == "retrain" else (subs[2 * r - 4].dir / name if r > 1 else start_paths[g][0])
            pm_train[g] = fit_pm(ctx, train, settings=pm_fit_settings(ctx.cfg, g), init=init, out=labels.dir / name,
                                 seed=ctx.cfg.stages.seed * 1000 + r)
            scorer = PMScorer(labels.dir / name, ctx.device, ctx.max_len, fmt=ctx.fmt)
            stats[g] = whitening_stats(ctx, scorer, g)
            group_test = [p for p in self.test_pairs if harm_group(p.subset) == g]
            heldout.update({f"{k}_{g}": v for k, v in heldout_accuracy(ctx, scorer, group_test).items()})
        combined = reward_from(ctx, {g: labels.dir / name for g, name in REWARD_PM_STAGES.items()}, stats)
        with uncounted(combined):
            heldout.update(heldout_accuracy(ctx, combined, self.test_pairs))
        totals = {k: sum(t[k] for t in pm_train.values()) for k in ("pairs", "steps", "train_tokens")}
        return {"pm_train": {**totals, **{g: pm_train[g] for g in pm_train}}, "heldout": heldout, "score_stats": stats}


def bought_labels(subs: list, r: int) -> list:
    """The labels bought in rounds 1..r, one list per round (each labels sub-run's comparisons.jsonl)."""
    return [read_comparisons(s.dir / "comparisons.jsonl") for s in subs[0:2 * r - 1:2]]


def _last_point(run_dir: Path) -> dict:
    """The last point of the run's train_log.jsonl (the inner method's end point)."""
    lines = (Path(run_dir) / "train_log.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}
