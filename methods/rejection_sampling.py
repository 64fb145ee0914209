"""Rejection sampling: best-of-n at inference time, or rejection-sampling fine-tuning (Llama 2 §3.2.3).

Both modes rest on one selection rule, ``select_best``: sample K responses per prompt, score them
with the PM, keep the highest-scored one. Identical response texts are one candidate with one score
(``canonical_scores``): the PM's score of a text can differ in the last bits with the padding width
of the batch it was scored in, and that noise must not split a tie. Ties go to the first sample.

- ``best_of_n`` trains nothing. The policy is a sampler over π0 that draws n responses and returns
  the PM's best; it is charged for its n samples and n PM calls per prompt served (n = 1 needs no
  PM). Under a budget it is planned to fit (``plan_n``). Its KL from π0 is at most
  log n − (n − 1)/n (an upper bound, Beirami et al. 2024, arXiv 2401.01879; equal only for a
  continuous reward), and is estimated from samples by ``bon_kl_plugin``. A reward-vs-KL curve
  over n = 1, 2, 4, ... feeds the sqrt(KL) analysis; it reuses one pool of π0 samples per prompt
  (the first n of the pool for each n).
- ``finetune`` is rejection-sampling fine-tuning: each round draws K samples per prompt from the
  *current* policy at temperature T, keeps the PM's best and fine-tunes on them (cross-entropy on
  the sampled response ids, EOS only where it was sampled), for R rounds. T is a training choice:
  the fine-tuned policy is evaluated at eval.temperature like every other.

Best-of-n is an inference-time policy, so its sampling temperature *is* its evaluation: it
samples π0 at eval.temperature (curve included), and ``method.temperature`` is refused for it.

Why an estimator as well as the bound: the bound is reached only by continuous rewards; a tiny
policy often repeats itself (the empty or the same short response), so the PM's scores tie and the
true KL is lower. The estimator uses the exact best-of-n law of a discrete reward, so it stays
correct under ties and shows how far below the bound the real KL is.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from alignbench.config import ConfigError, opt
from alignbench.context import kl_estimates
from alignbench.cost import forward_flops
from alignbench.methods import BudgetExceeded, Method, MethodConfig, PolicyArtifact
from alignbench.encoding import encode_ids, pad_batch
from alignbench.train import batch_schedule, learning_rate, lm_loss, make_optimizer, optimizer_step

log = logging.getLogger(__name__)

MODES = ["best_of_n", "finetune"]
DEFAULT_N = {"best_of_n": 8, "finetune": 4}  # see RejectionSamplingConfig.k
CURVE_SEED_OFFSET = 20_011  # π0 samples for the reward-vs-KL curve (measurement stream)
POOL_SEED_OFFSET = 30_013  # the independent π0 pool whose reward law gives the plug-in KL


# --------------------------------------------------------------------------- selection and KL
def canonical_scores(scores: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """``scores`` [prompts, K] with every repeat of a response text in a prompt's row given the score
    of its first occurrence (``texts``: the K responses of prompt 0, then of prompt 1, ...), so
    identical responses are one candidate with one score whatever batch they were scored in."""
    if len(texts) != scores.numel():
        raise ValueError(f"canonical_scores: {len(texts)} texts for scores of shape {tuple(scores.shape)}")
    k, out = scores.shape[1], scores.clone()
    for i in range(scores.shape[0]):
        first: dict[str, int] = {}
        for j in range(k):
            out[i, j] = out[i, first.setdefault(texts[i * k + j], j)]
    return out


def select_best(scores: torch.Tensor, texts: Optional[list[str]] = None) -> torch.Tensor:
    """Index of the PM's best response per prompt: ``scores`` is [prompts, K]; with ``texts`` (the
    responses, prompt-major) identical texts share one score (``canonical_scores``); ties -> first."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"select_best: scores must be [prompts, K>=1], got shape {tuple(scores.shape)}")
    if texts is not None:
        scores = canonical_scores(scores, texts)
    best = scores.max(dim=1, keepdim=True).values
    first = torch.arange(scores.shape[1]).expand_as(scores).masked_fill(scores != best, scores.shape[1])
    return first.min(dim=1).values  # the first column that reaches the maximum


def bon_kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n ‖ π0): log n − (n − 1)/n (Beirami et al. 2024, arXiv
    2401.01879). Equality only for a continuous reward (no two responses tie); ties lower the KL."""
    return math.log(n) - (n - 1) / n


def bon_kl_exact(probs_per_level, n: int) -> float:
    """Exact KL(π_bon ‖ π0) of best-of-n when π0's reward takes finitely many levels.

    ``probs_per_level``: π0's probability of each reward level, in increasing reward order (each
    level may hold several responses). With F(r) = P(R ≤ r) and F₋(r) = P(R < r), best-of-n (ties
    to the first sample) puts mass q(r) = F(r)^n − F₋(r)^n on level r, spread over the level's
    responses in proportion to π0, so π_bon(y)/π0(y) = q(r)/p(r) for every y at level r and

        KL = Σ_r q(r) log(q(r) / p(r)).

    It is at most log n − (n − 1)/n, with equality only in the continuous limit."""
    p = torch.as_tensor(probs_per_level, dtype=torch.float64).ravel()
    p = p[p > 0] / p.sum()
    f = p.cumsum(0).clamp(max=1.0)
    q = f ** n - (f - p).clamp(min=0.0) ** n
    keep = q > 0
    return float((q[keep] * (q[keep] / p[keep]).log()).sum())


def bon_kl_plugin(pool_scores: torch.Tensor, n: int) -> float:
    """Plug-in estimate of KL(best-of-n ‖ π0): ``bon_kl_exact`` on the empirical reward distribution
    of each prompt's pool of m independent π0 samples (``pool_scores`` [prompts, m], identical texts
    already sharing one score, see ``canonical_scores``), averaged over prompts.

    It is the exact KL of a discrete distribution, so it never exceeds the bound; it is biased low.
    Bias measured against exact enumeration (``bon_kl_exact`` on the true law), n = 16: continuous
    reward −0.003 (m = 64), −0.0002 (m = 256) (then the estimate depends only on m and n); a 3-level
    reward with probabilities 0.7/0.2/0.1 (KL 1.674) −0.035 (m = 64), −0.009 (m = 256); at n = 4 all
    below 0.01 in size. The sample estimator this replaces (the best-of-n draws' log-ratio against a
    64-sample CDF) was biased by −0.12 at n = 16 on a continuous reward."""
    if pool_scores.dim() != 2 or pool_scores.shape[1] < 1:
        raise ValueError(f"bon_kl_plugin: pool_scores must be [prompts, m>=1], got {tuple(pool_scores.shape)}")
    per_prompt = [bon_kl_exact(torch.unique(row, return_counts=True)[1], n) for row in pool_scores.double()]
    return sum(per_prompt) / len(per_prompt)


def curve_ns(n: int) -> list[int]:
    """The n of the reward-vs-KL curve: 1, 2, 4, ... below n, then n itself."""
    ns, k = [], 1
    while k < n:
        ns.append(k)
        k *= 2
    return ns + [n]


# --------------------------------------------------------------------------- config
@dataclass
class RejectionSamplingConfig(MethodConfig):
    name: str = "rejection_sampling"
    mode: str = opt("best_of_n", choices=MODES)  # best_of_n: inference-time; finetune: Llama 2 RS fine-tuning
    n: Optional[int] = opt(None, ge=1)  # K: samples per prompt, the PM keeps the best; None: DEFAULT_N[mode]
    temperature: Optional[float] = opt(None, gt=0)  # finetune: sampling temperature; None: train.temperature
    kl_pool: int = opt(64, ge=1)  # best_of_n: independent π0 samples per eval prompt for the plug-in KL estimate
    rounds: int = opt(2, ge=1)  # finetune: sample -> select -> fine-tune rounds
    prompts_per_round: int = opt(512, gt=0)  # finetune: training prompts sampled each round
    epochs: float = opt(1.0, gt=0)  # finetune: passes over each round's selected responses
    lr: Optional[float] = opt(5e-4, gt=0)  # finetune: None = train.lr

    def global_batches(self, train) -> dict[str, int]:
        if self.mode == "best_of_n":  # asked only under a multi-process launch
            raise ConfigError("method.mode: best_of_n trains nothing, so it has no multi-process form; "
                              "run it as one process")
        return {"method.prompts_per_round": self.prompts_per_round, **super().global_batches(train)}

    def validate(self, prefix: str) -> None:
        if self.mode == "best_of_n" and self.temperature is not None:
            raise ConfigError(f"{prefix}.temperature: best_of_n is an inference-time policy, sampled at "
                              f"eval.temperature like every method's evaluation; set eval.temperature "
                              f"(for all methods) instead, or use mode=finetune")

    @property
    def k(self) -> int:
        """Samples per prompt. best_of_n: 8, chosen on the eval split (experiment=tune_eval: the gold
        reward of best-of-2/4/8/16 was -0.180 / -0.028 / 0.074 / -0.029, π0 -0.299); finetune: 4, not
        re-chosen there (the demo does not run it)."""
        return self.n if self.n is not None else DEFAULT_N[self.mode]


# --------------------------------------------------------------------------- the method
class RejectionSampling(Method):
    """Best-of-n over π0 with its PM (inference-time), or rejection-sampling fine-tuning (Llama 2)."""

    name = "rejection_sampling"
    config_class = RejectionSamplingConfig
    # finetune: each process samples its share of a round's prompts and trains on its share of each
    # batch; best_of_n trains nothing and is refused on several processes (global_batches)
    supports_distributed = True

    def train(self, ctx) -> PolicyArtifact:
        cfg: RejectionSamplingConfig = ctx.method_cfg
        if cfg.mode == "best_of_n":
            return best_of_n(ctx, cfg)
        return rs_finetune(ctx, cfg)


def best_rows(scores: torch.Tensor, texts: Optional[list[str]] = None) -> list[int]:
    """Row numbers, in a flat [prompts × K] SampleBatch, of the PM's best sample per prompt
    (identical ``texts`` are one candidate, see ``select_best``)."""
    k = scores.shape[1]
    return [i * k + j for i, j in enumerate(select_best(scores, texts).tolist())]


def serving_cost(k: int, n: int, pool: dict) -> dict:
    """The cost of serving best-of-k, estimated from a pool of n samples per prompt over the same
    prompts (``pool``: its measured totals, sampling and PM scoring apart, see ``_bon_pool``):
    samples scale by k/n, and best-of-1 is a π0 sample with no PM call.

        tokens_generated = G·k/n,   pm_calls = P·k (0 at k = 1),
        flops  = (F_sample + F_pm·[k > 1])·k/n,   wall_s = (S_sample + S_pm·[k > 1])·k/n"""
    pm = k > 1
    return {"tokens_generated": pool["tokens_generated"] * k / n, "pm_calls": pool["prompts"] * k if pm else 0,
            "flops": (pool["sample_flops"] + (pool["pm_flops"] if pm else 0.0)) * k / n,
            "wall_s": (pool["sample_s"] + (pool["pm_s"] if pm else 0.0)) * k / n}


def plan_n(n: int, pool: dict, caps: dict, spent: dict) -> tuple[int, str]:
    """The largest k ≤ n whose serving cost fits what the budget has left, for every set cap
    (``caps`` and ``spent`` keyed like ``serving_cost``), and why. At least 1: with no room even for
    best-of-1, the evaluation prompts are still answered (one π0 sample each) and the reason says so."""
    def fits(k: int) -> bool:
        cost = serving_cost(k, n, pool)
        return all(spent.get(key, 0) + cost[key] <= cap for key, cap in caps.items())

    if not caps:
        return n, "no budget"
    k = next((k for k in range(n, 0, -1) if fits(k)), 0)
    if k == n:
        return n, "the configured n fits the budget"
    if k == 0:
        return 1, "the budget is below the cost of best-of-1 (one π0 sample per prompt); served n=1 anyway"
    over = [key for key, cap in caps.items() if spent.get(key, 0) + serving_cost(k + 1, n, pool)[key] > cap]
    return k, f"best-of-{k + 1} would exceed budget {', '.join(over)}"


def best_of_n(ctx, cfg: RejectionSamplingConfig) -> PolicyArtifact:
    """The sampler, plus its reward-vs-KL curve over n on the held-out prompts (measurement).

    Under a budget, best-of-n is planned before it serves, so that it never stops half-way through
    the evaluation prompts (which would leave some unanswered) and never spends past the cap: from the
    curve's pool (n samples per held-out prompt, measured for free) ``plan_n`` takes the largest
    n_effective ≤ n whose estimated serving cost fits every set cap, and the sampler serves
    best-of-n_effective. Comparisons stay honest: the policy evaluated is the one the budget pays for,
    its KL is that of n_effective, and ``n_effective`` and the reason are in the info. PM calls are
    planned exactly; tokens, FLOPs and seconds are estimates, so they can miss by the sampling noise
    of the serving draw (far less than one sampler batch at the sizes here)."""
    # best-of-n of the policy the run starts from (π0, or a chain's previous stage), whatever the
    # training reference; its KL bound and estimate are to that start (``_bon_curve`` adds π0's part)
    pi0, temp = ctx.start_policy(), ctx.cfg.eval.temperature
    pool = _bon_pool(ctx, pi0, cfg, temp)
    n, why = plan_n(cfg.k, pool["cost"], ctx.budget.caps, ctx.cost.as_dict())
    if n != cfg.k:
        log.info("best-of-n: serving n=%d instead of %d (%s)", n, cfg.k, why)

    def sampler(prompts: list[str], seed: int, temperature: Optional[float] = None):
        """Best-of-n of each prompt. ``temperature`` None: serving the evaluation prompts at
        eval.temperature, charged; a value: a measurement draw at that temperature (the
        temperature and selection evaluations), free."""
        if temperature is not None:
            with ctx.cost.measuring():
                out = ctx.sample_free(pi0, prompts, n=n, temperature=temperature, seed=seed)
                return out if n == 1 else out.select(best_rows(ctx.pm_score_free(out).view(len(prompts), n),
                                                                out.responses))
        # the planned spend is charged in full without mid-way checks, even inside the final
        # evaluation's measurement: serving is this policy's cost
        with ctx.cost.charging():
            out = ctx.sample(pi0, prompts, n=n, temperature=temp, seed=seed, check=False)
            if n == 1:  # best-of-1 is the sample itself: no PM call
                return out
            scores = ctx.score(out, check=False).view(len(prompts), n)
        return out.select(best_rows(scores, out.responses))

    curve = _bon_curve(ctx, pool, sorted(set(curve_ns(cfg.k)) | {n}))
    served = next(p for p in curve if p["n"] == n)
    info = {"mode": "best_of_n", "n": cfg.k, "n_effective": n, "n_effective_reason": why, "temperature": temp,
            "kl_bound": served["kl_bound"], "kl_estimate": served["kl_estimate"], "kl_pool_size": cfg.kl_pool,
            "curve": [{k: p[k] for k in ("n", "proxy_reward", "judge_reward", "kl_bound", "kl_estimate")}
                      for p in curve],
            "cost_per_prompt": {"samples": n, "pm_calls": n if n > 1 else 0},
            "planned_cost": serving_cost(n, cfg.k, pool["cost"])}
    return PolicyArtifact(sampler=sampler, info=info)


def _bon_pool(ctx, pi0, cfg: RejectionSamplingConfig, temp: float) -> dict:
    """Measurement, not charged: one pool of n π0 samples per held-out prompt with their PM scores
    (the curve draws best-of-k from its first k), an independent pool whose empirical reward law
    gives the plug-in KL, and the pool's measured cost (what serving best-of-n over these prompts
    costs; see ``serving_cost``). Identical texts share one score (``canonical_scores``)."""
    prompts, n = ctx.eval_prompts, cfg.k
    with ctx.cost.measuring():
        t0 = time.time()
        pool = ctx.sample_free(pi0, prompts, n=n, temperature=temp, seed=ctx.seed + CURVE_SEED_OFFSET)
        t1, pm_tokens = time.time(), ctx.pm.tokens
        scores = canonical_scores(ctx.pm_score_free(pool).view(len(prompts), n), pool.responses)
        t2, pm_tokens = time.time(), ctx.pm.tokens - pm_tokens
        ref = ctx.sample_free(pi0, prompts, n=cfg.kl_pool, temperature=temp, seed=ctx.seed + POOL_SEED_OFFSET)
        ref_scores = canonical_scores(ctx.pm_score_free(ref).view(len(prompts), cfg.kl_pool), ref.responses)
    cost = {"prompts": len(prompts), "tokens_generated": pool.n_tokens,
            "sample_flops": forward_flops(ctx.n_params(pi0), pool.n_prompt_tokens + pool.n_tokens),
            "pm_flops": forward_flops(ctx.n_params(ctx.pm.model), pm_tokens), "sample_s": t1 - t0, "pm_s": t2 - t1}
    return {"pool": pool, "scores": scores, "ref_scores": ref_scores, "cost": cost, "base": pi0}


def _bon_curve(ctx, pool: dict, ns: list[int]) -> list[dict]:
    """Best of the pool's first k samples per prompt, for each k in ``ns``, with the KL bound and
    the plug-in estimate: one (measurement) log point each."""
    samples, scores, ref_scores = pool["pool"], pool["scores"], pool["ref_scores"]
    n = scores.shape[1]
    points = []
    for k in tqdm(ns, desc="best-of-n curve", leave=False):
        idx = select_best(scores[:, :k])  # already canonical: identical texts share a score
        responses = samples.select([i * n + j for i, j in enumerate(idx.tolist())])
        kl = {"kl_bound": bon_kl_bound(k), "kl_estimate": bon_kl_plugin(ref_scores, k)}  # to the start
        if ctx.start_path is not None:  # KL(BoN‖π0) = KL(BoN‖start) + E_BoN[log start/π0], the last from its samples
            with ctx.cost.measuring():
                cross = kl_estimates(pool["base"], ctx.pi0(), responses, pad_id=ctx.tokenizer.pad_token_id,
                                     device=ctx.device)["kl_k1"]
            kl = {"kl_bound_start": kl["kl_bound"], "kl_estimate_start": kl["kl_estimate"],
                  "kl_bound": kl["kl_bound"] + cross, "kl_estimate": kl["kl_estimate"] + cross}
        point = ctx.log_point(step=k, responses=responses, label=f"n={k}", **kl)
        points.append({**point, "n": k})
    return points


def rs_finetune(ctx, cfg: RejectionSamplingConfig) -> PolicyArtifact:
    """R rounds of: K samples per prompt from the current policy -> PM's best -> SFT on them."""
    policy, temp, tok, k = ctx.policy(), cfg.temperature or ctx.cfg.train.temperature, ctx.tokenizer, cfg.k
    order = list(range(len(ctx.train_prompts)))
    random.Random(ctx.seed).shuffle(order)  # each round takes the next slice: fresh prompts
    # Resume after a kill: the checkpoint holds the round, its selected responses and how many of
    # its batches are done; that round's optimizer is rebuilt before its state is loaded into it.
    saved = ctx.checkpoint_state() or {}
    step = saved["step"] + 1 if saved else 0
    last_logged, rounds, stopped = saved.get("last_logged", -1), saved.get("rounds", []), None
    # each round trains on one selected response per prompt: its step count is known before sampling
    round_steps = len(batch_schedule(cfg.prompts_per_round, ctx.batch_size, cfg.epochs, seed=0))
    log_at = ctx.log_steps(cfg.rounds * round_steps)
    for rnd in range(saved.get("round", 0), cfg.rounds):
        start = rnd * cfg.prompts_per_round
        prompts = [ctx.train_prompts[order[(start + i) % len(order)]] for i in range(cfg.prompts_per_round)]
        resuming = saved.get("round") == rnd
        try:  # each sampling and PM batch checks the budget first: a stop here leaves the round untrained
            selected, stats = (saved["selected"], saved["round_stats"]) if resuming else \
                _select_round(ctx, policy, prompts, k, temp, seed=ctx.seed * 1000 + rnd)
        except BudgetExceeded as e:
            stopped = str(e)
            break
        train_model = ctx.for_training(policy)  # DDP under a multi-process launch
        data = [encode_ids(p, r) for p, r in selected]  # the selected samples' ids, as sampled
        batches = batch_schedule(len(data), ctx.batch_size, cfg.epochs, seed=ctx.seed * 1000 + rnd)
        opt, sched = make_optimizer(policy, ctx.lr, ctx.cfg.train.weight_decay, ctx.cfg.train.warmup_steps, len(batches))
        done, losses = 0, []
        if resuming:
            _, state = ctx.resume({"policy": policy}, opt, sched)
            done, losses = state["round_step"], state["losses"]
        policy.train()
        bar = tqdm(total=len(batches), initial=done, desc=f"RS round {rnd + 1}/{cfg.rounds}", leave=False, mininterval=2)
        for b, idx in enumerate(batches[done:], start=done):
            if (stopped := ctx.budget_hit()):  # before each optimiser step
                break
            batch = pad_batch([data[i] for i in ctx.dist.shard(idx)], tok.pad_token_id, ctx.device)
            loss = lm_loss(train_model, batch)
            lr = learning_rate(opt)
            optimizer_step(loss, policy.parameters(), opt, sched, ctx.cfg.train.grad_clip)
            ctx.charge_step(int(batch["attention_mask"].sum()))
            losses.append(loss.item())
            step += 1
            ctx.log_step(step, loss=losses[-1], lr=lr)
            if step in log_at:
                ctx.log_point(step, model=policy, label=f"round {rnd + 1}")
                last_logged = step
            bar.update()
            ctx.save_checkpoint(step - 1, {"policy": policy}, opt, sched, round=rnd, round_step=b + 1, losses=losses,
                                selected=selected, round_stats=stats, rounds=rounds, last_logged=last_logged)
        bar.close()
        rounds.append({"round": rnd + 1, "steps": len(losses), **stats,
                       "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})
        log.info("RS round %d: sample reward mean %.3f, best-of-%d mean %.3f", rnd + 1,
                 stats["sample_reward_mean"], k, stats["best_reward_mean"])
        if stopped:
            break
    if step != last_logged:
        ctx.log_point(step, model=policy, label="end")
    return PolicyArtifact(path=ctx.save_policy(policy), info={"mode": "finetune", "n": k, "temperature": temp,
                                                              "steps": step, "rounds": rounds, "stopped": stopped})


def _select_round(ctx, policy, prompts: list[str], k: int, temp: float, seed: int) -> tuple[list, dict]:
    """K samples per prompt from the current policy, the PM's best of each as [prompt ids,
    response ids] (what the policy was conditioned on and sampled), and their statistics. Under a
    multi-process launch each process takes its share of the prompts, and the selections are
    gathered back in prompt order."""
    mine = ctx.dist.shard(prompts)
    out = ctx.sample(policy, mine, n=k, temperature=temp, seed=ctx.dist.seed(seed))
    scores = ctx.score(out).view(len(mine), k)
    best = out.select(best_rows(scores, out.responses))
    selected = ctx.dist.gather([[p, r] for p, r in zip(best.prompt_ids, best.response_ids)])
    scores = torch.tensor(ctx.dist.gather(scores.tolist()))
    return selected, {"sample_reward_mean": scores.mean().item(), "sample_reward_median": scores.median().item(),
                      "best_reward_mean": scores.max(1).values.mean().item()}
