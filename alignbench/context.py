"""RunContext: what every method receives, and the one place its costs are counted.

Fairness lives here: every method gets the same π0 and reference, tokenizer, PM, prompts, sampler,
precision and optimiser defaults, and is measured by the same ``log_point`` (proxy PM reward,
judge reward, KL(π‖π0) by the k1 and k3 estimators, on the same held-out prompts and seed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from alignbench import freeze, lora, shared_trunk
from alignbench.checkpoint import Checkpointer
from alignbench.config import Config
from alignbench.distributed import Dist, autocast_forward
from alignbench.eval.robustness import pairwise_agreement, rank_correlation
from alignbench.cost import (ANNOTATE_USES, SAMPLE_USES, SCORE_USES, STEP_USES, Budget, BudgetExceeded, Cost,
                             forward_flops, train_flops)
from alignbench.measured import MeasureMemo, Measured, fingerprint
from alignbench.log_points import point_steps
from alignbench.models import count_params, disable_dropout, load_lm
from alignbench.sampling import SampleBatch, sample
from alignbench.stages.graph import SharedStages
from alignbench.stages.preference import PMScorer, SampleScorer
from alignbench.stages.reward import uncounted
from alignbench.tracking import Tracker
from alignbench.encoding import encode_samples, pad_batch
from alignbench.train import response_logprobs

log = logging.getLogger(__name__)
EVAL_SEED_OFFSET = 10_007  # evaluation samples use their own stream, never the training one


@torch.no_grad()
def kl_estimates(policy, reference, samples: SampleBatch, pad_id: int, device, batch_size: int = 64) -> dict:
    """Per-sequence KL(π_T‖π0_T) from samples y ~ π_T, both models tempered by the temperature T
    the samples were drawn at: k1 = Σ_t log π_T/π0_T (unbiased, noisy) and k3 = Σ_t (ρ − 1 − log ρ)
    with ρ = π0_T/π_T (unbiased per token, always ≥ 0; Schulman 2020). The tokens are the sampled
    ids in the sampled prompt window (``encode_samples``): nothing re-tokenised, no EOS added."""
    k1, k3 = [], []
    seqs, temp = encode_samples(samples), samples.temperature
    for i in range(0, len(seqs), batch_size):
        batch = pad_batch(seqs[i:i + batch_size], pad_id, device)
        _, lp = response_logprobs(policy, batch, temperature=temp)
        _, lq = response_logprobs(reference, batch, temperature=temp)
        mask = batch["response_mask"][:, 1:].float()
        log_ratio = (lq - lp) * mask  # log ρ per token
        k1 += (-log_ratio).sum(-1).tolist()
        k3 += ((log_ratio.exp() - 1 - log_ratio) * mask).sum(-1).tolist()
    return {"kl_k1": sum(k1) / len(k1), "kl_k3": sum(k3) / len(k3)}


def _defined(value: float) -> Optional[float]:
    """None (JSON null) for an undefined statistic (NaN: e.g. the judge ties on every prompt), so
    train_log.jsonl stays strict JSON and its numbers finite."""
    return None if math.isnan(value) else value


def _offset(step: float, offset: float) -> float:
    """A sub-run's step on its parent's axis; the final evaluation's step (−1) stays −1."""
    if step < 0 or not offset:
        return step
    total = step + offset
    return int(total) if float(total).is_integer() else round(total, 4)


Responses = Union[SampleBatch, list[str]]  # samples with their ids, or bare texts (inference-time policies)


def _rows(prompts: Responses, responses: Optional[list[str]], start: int, stop: int) -> tuple:
    """Rows [start, stop) of a SampleBatch, or of parallel prompt and response text lists."""
    if isinstance(prompts, SampleBatch):
        return prompts.select(range(start, min(stop, len(prompts)))), None
    return prompts[start:stop], responses[start:stop]


@dataclass
class RunContext:
    cfg: Config
    method_cfg: Any
    stages: SharedStages
    tokenizer: Any
    device: torch.device
    train_prompts: list[str]  # distinct prompts of ``pairs``
    eval_prompts: list[str]
    pairs: list  # the PreferencePairs a method may consume (alignbench.stages.access.method_pairs)
    pm: PMScorer
    judge: Callable[..., list[float]]  # judge(prompts, responses, samples=None): text, or the SampleBatch's ids
    judge_name: str
    out_dir: Path
    budget: Budget
    cost: Cost = field(default_factory=Cost)
    dist: Dist = field(default_factory=Dist)  # this process's rank when launched multi-process
    eval_meta: list = field(default_factory=list)  # {"subset", "n_turns"} per eval prompt
    eval_chosen: list = field(default_factory=list)  # the dataset's chosen response per eval prompt
    selection_prompts: list = field(default_factory=list)  # eval-split prompts (eval.selection_prompts)
    tracker: Optional[Tracker] = None  # train.report_to (alignbench.tracking); the main process's only
    # Where the policy starts and what it is anchored to (a chain's later stage, an iterated-RLHF round):
    # None is π0 for both. Measurement's KL is always against π0 (``pi0``); a point also gets
    # kl_k1_start / kl_k3_start against ``start_path`` when that is set.
    start_path: Optional[Path] = None
    reference_path: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None  # None: out_dir/checkpoint (a sub-run has its own: alignbench.subruns)
    policy_dir: Optional[Path] = None  # where save_policy writes; None: out_dir/policy
    step_offset: float = 0.0  # added to every logged point's step (a sub-run continues its parent's steps)
    point_extra: dict = field(default_factory=dict)  # merged into every log point (e.g. {"round": 2})
    # measurement hooks: hook(ctx, model, samples) -> dict merged into every log point (free, like the point)
    point_hooks: list = field(default_factory=list)
    _reference: Any = None
    _pi0: Any = None  # π0 for measurement when the training reference is another policy
    _start: Any = None  # the start policy for kl_*_start
    _sample_pm: Any = None  # the PM reading SampleBatches by their ids (built on first use)
    _synced: tuple = (0, 0, 0.0)  # (tokens_generated, pm_calls, flops) already merged over processes
    _n_params: Any = field(default_factory=weakref.WeakKeyDictionary)  # model -> N, counted once
    _policy_params: Optional[int] = None  # N of the policy copies ctx.policy() hands out
    _policy_ref: Any = None  # weakref to the last LoRA policy (model.peft=lora): the reference's weights
    _frozen_ref: Any = None  # weakref to the last partly frozen policy (model.trainable_layers): its frozen trunk
    _pi0_scores: Optional[tuple] = None  # (proxy, judge) of π0's eval samples, kept from its "pi0" point
    _measure_memo: Optional[MeasureMemo] = None  # weights measured before (``_memo``)
    _derived: bool = False  # a sub-context (``derive``): its memo stays in memory
    last_measured: Optional[Measured] = None  # what the last point read (the final evaluation's samples)

    # ---- models
    @property
    def max_len(self) -> int:
        return self.stages.pi0.record["max_len"]

    @property
    def fmt(self) -> str:
        """data.format: how prompts and responses are tokenised (alignbench.formats)."""
        return self.cfg.data.format

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def lr(self) -> float:
        return self.method_cfg.lr or self.cfg.train.lr

    @property
    def batch_size(self) -> int:
        return self.method_cfg.batch_size or self.cfg.train.batch_size

    def policy(self) -> torch.nn.Module:
        """A fresh trainable copy of the start policy (π0, or ``start_path``); under model.peft=lora,
        it with a fresh LoRA adapter (only the adapter trains); under model.trainable_layers=K, it
        with its trunk frozen below the top K blocks (``freeze.prepare``), the frozen tensors shared
        with the frozen models this context already loaded where they hold the same weights.
        Gradient checkpointing per train.gradient_checkpointing."""
        torch.manual_seed(self.seed)
        policy = self.load(self.start_path or self.stages.pi0.path)
        # N as loaded: the head copy that freezing unties from the embeddings is not a second N
        n_loaded = count_params(policy)
        policy = freeze.prepare(policy, self.cfg.model, seed=self.seed)
        if lora.is_peft(policy):
            self._reference = None  # from now on π0 is this policy with its adapter disabled: one copy
            self._policy_ref = weakref.ref(policy)
        elif freeze.enabled(self.cfg.model):
            self._frozen_ref = weakref.ref(policy)
            for other in (self._reference, self._pi0, self._start):
                freeze.share_frozen(policy, other)
        policy = lora.set_gradient_checkpointing(policy, self.cfg.train.gradient_checkpointing).train()
        self._policy_params = n_loaded if freeze.enabled(self.cfg.model) else self.n_params(policy)
        return policy

    def _frozen(self, path) -> torch.nn.Module:
        """A frozen (eval, no grad) model loaded from ``path``; under model.trainable_layers, reading
        the last policy's frozen tensors wherever it holds bitwise the same weights (one copy of
        the frozen trunk in memory: ``freeze.share_frozen``)."""
        model = self.load(path).eval().requires_grad_(False)
        freeze.share_frozen(self._frozen_ref() if self._frozen_ref is not None else None, model)
        return model

    def reference(self) -> torch.nn.Module:
        """The frozen training anchor (PPO's KL penalty, DPO's reference): π0, or ``reference_path``.
        Under model.peft=lora, once a policy was handed out and its start is the reference, the last
        policy with its adapter disabled (``lora.AdapterDisabled``: no second copy in memory, and
        exactly the start's weights); otherwise loaded once (under model.trainable_layers reading the
        policy's frozen trunk where it holds the same weights: ``_frozen``)."""
        policy = self._policy_ref() if self._policy_ref is not None else None
        if policy is not None and (self.start_path or None) == (self.reference_path or None):
            return lora.AdapterDisabled(policy)
        if self._reference is None:
            path = self.reference_path or self.stages.pi0.path
            self._reference = self._frozen(path)
        return self._reference

    def pi0(self) -> torch.nn.Module:
        """π0, frozen: what measurement's KL is taken against, whatever the training reference."""
        if self.reference_path is None:  # the reference is π0 (under LoRA: the adapter disabled)
            return self.reference()
        if self._pi0 is None:
            self._pi0 = self._frozen(self.stages.pi0.path)
        return self._pi0

    def start_policy(self) -> torch.nn.Module:
        """The policy this run starts from, frozen: a chain stage's or a continued run's start, else
        π0. What an inference-time method (best-of-n) serves from."""
        return self._start_model() or self.pi0()

    def _start_model(self) -> Optional[torch.nn.Module]:
        """The start policy, frozen, for kl_*_start (None when the run starts at π0)."""
        if self.start_path is None:
            return None
        if (self.reference_path or None) == self.start_path:
            return self.reference()
        if self._start is None:
            self._start = self._frozen(self.start_path)
        return self._start

    def derive(self, **changes) -> "RunContext":
        """A sub-context for a method run inside this one (a chain's stage, an iterated-RLHF round):
        ``changes`` replace fields (method_cfg, pm, start_path, reference_path, checkpoint_dir,
        policy_dir, step_offset, point_extra, point_hooks, ...). It shares this run's cost, budget,
        tracker, judge and train_log.jsonl; its models are loaded afresh."""
        fresh = dict(_reference=None, _pi0=None, _start=None, _sample_pm=None, _policy_ref=None, _frozen_ref=None,
                     _policy_params=None, _n_params=weakref.WeakKeyDictionary(), _measure_memo=None,
                     _derived=True, last_measured=None)
        return dataclasses.replace(self, **{**fresh, **changes})

    def load(self, path) -> torch.nn.Module:
        """An LM on this run's device, under bf16 autocast when train.precision=bf16, with dropout
        off: every method trains in train mode and computes the same function as in eval mode
        (PPO's first-epoch ratios are exactly 1 on the samples it just drew; TRL does the same)."""
        return autocast_forward(disable_dropout(load_lm(path)).to(self.device), self.cfg.train.precision, self.device)

    def for_training(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: DDP-wrapped when launched multi-process
        (see alignbench.distributed), else ``policy`` itself. Parameters are shared."""
        return self.dist.prepare(policy)

    def n_params(self, model) -> int:
        """N of ``model`` (all its parameters), counted once per model object."""
        if model not in self._n_params:
            self._n_params[model] = count_params(model)
        return self._n_params[model]

    def charge_step(self, trained_tokens: int, model=None) -> None:
        """Charge one optimiser step: its training tokens and 6·N FLOPs per token (N: ``model``'s
        parameters, by default the policy's, i.e. π0's architecture). Under a multi-process launch
        this also merges every process's costs since the last merge into the run's totals, so every
        process calls it once per step (it is a collective there). Call ``check_budget()`` before
        the step's forward: this charges what was already spent.

        Under LoRA N stays all the parameters (base and adapter): the forward and the backward
        through the activations still run through the whole model; only the weight-gradient
        matmuls of the frozen layers are skipped, which the 6·N rule does not try to resolve."""
        n = self.n_params(model) if model is not None else self._policy_params or self.n_params(self.reference())
        self._merge_costs(trained_tokens, train_flops(n, trained_tokens))

    def _merge_costs(self, trained_tokens: int = 0, trained_flops: float = 0.0) -> None:
        """Add a step's training cost; under a multi-process launch, sum every process's costs
        since the previous merge (a collective: every process calls it at the same points)."""
        c = self.cost
        if not self.dist.enabled:
            c.tokens_trained += trained_tokens
            c.flops += trained_flops
            return
        gen0, pm0, flops0 = self._synced
        # float64 holds the integer counts exactly (below 2**53) and the FLOPs in one collective
        trained, gen, pm, flops = self.dist.all_sum(torch.tensor(
            [trained_tokens, c.tokens_generated - gen0, c.pm_calls - pm0, c.flops - flops0 + trained_flops],
            dtype=torch.float64)).tolist()
        c.tokens_trained += int(trained)
        c.tokens_generated, c.pm_calls, c.flops = gen0 + int(gen), pm0 + int(pm), flops0 + flops
        self._synced = (c.tokens_generated, c.pm_calls, c.flops)

    def save_policy(self, policy) -> Path:
        """The trained LM (safetensors) and tokenizer under <run>/policy: what final evaluation
        loads. A LoRA policy is saved merged (an ordinary model), its adapter in policy/adapter."""
        path = self.policy_dir or self.out_dir / "policy"
        policy.eval()
        if self.dist.is_main:
            lora.save(policy, path)
            self.tokenizer.save_pretrained(path)
        return path

    def log_steps(self, planned_steps: int) -> set[int]:
        """The optimiser steps (1-based) at which a method of ``planned_steps`` logs a point:
        method.eval_every when set, else train.log_points spread evenly (methods.point_steps)."""
        return point_steps(self.method_cfg, planned_steps, self.cfg.train.log_points)

    # ---- charged operations (each checks the budget first; see check_budget)
    def sample(self, model, prompts: list[str], n: int = 1, temperature: Optional[float] = None,
               max_new_tokens: Optional[int] = None, seed: Optional[int] = None, check: bool = True) -> SampleBatch:
        """Training samples at the method's temperature or train.temperature, charged batch by batch
        (the sampler's batches of 64): the generated tokens, and 2·N FLOPs per prompt token (the
        prefill is compute too) and per generated token. The budget is checked before each batch, so
        a call stops within one batch of the cap. ``check=False``: charge without checking (a planned
        spend that must not stop half-way, such as best-of-n serving the evaluation prompts)."""
        n_model = self.n_params(model)

        def charge(prompt_tokens: int, generated: int) -> None:
            self.cost.tokens_generated += generated
            self.cost.flops += forward_flops(n_model, prompt_tokens + generated)

        before = (lambda: self.check_budget(SAMPLE_USES)) if check else None
        return self._sample(model, prompts, n, temperature, max_new_tokens, seed, before_batch=before,
                            after_batch=charge)

    def score(self, prompts: Responses, responses: Optional[list[str]] = None, check: bool = True) -> torch.Tensor:
        """PM scores, charged: one PM call per response and 2·N_pm FLOPs per token the PM reads; of a
        SampleBatch by its sampled ids, or of dataset-style (prompt, response) texts. Scored in
        batches of the PM's batch size with the budget checked before each (``check=False``: see
        ``sample``)."""
        n_pm, size, out = self.n_params(self.pm.model), self.pm.batch_size, []
        for i in range(0, len(prompts), size):
            if check:
                self.check_budget(SCORE_USES)
            tokens = self.pm.tokens
            out.append(self._pm_scores(*_rows(prompts, responses, i, i + size)))
            self.cost.pm_calls += len(out[-1])
            self.cost.flops += forward_flops(n_pm, self.pm.tokens - tokens)
        return torch.cat(out) if out else torch.empty(0)

    def _pm_scores(self, prompts: Responses, responses: Optional[list[str]]) -> torch.Tensor:
        if not isinstance(prompts, SampleBatch):
            return self.pm.score(prompts, responses)
        if self._sample_pm is None:
            self._sample_pm = SampleScorer(self.pm, self.tokenizer, self.fmt)
        return self._sample_pm(prompts)

    def charge_forward(self, tokens: int, model, check: bool = True) -> None:
        """Charge a no-grad forward a method runs for training (DPO's reference pass, PPO's rollout
        forwards of policy, value and reference): 2·N FLOPs per token of ``model``. Checks the
        budget first, so call it just before the forward it pays for (``check=False``: a forward
        covered by the step's own check, made a different number of times on different processes)."""
        if check:
            self.check_budget()
        self.cost.flops += forward_flops(self.n_params(model), tokens)

    def charge_annotations(self, n: int) -> None:
        """Charge ``n`` preference labels bought from the annotator (iterated online RLHF): checks
        budget.annotations (and the others a labelling spends) first, like every charged operation,
        and, since labels are bought as a batch, never buys past the cap: a batch that would exceed
        it is refused whole."""
        self.check_budget(ANNOTATE_USES)
        cap = self.budget.annotations
        if cap and self.cost.annotations + n > cap:
            raise BudgetExceeded(f"budget.annotations={cap:g} reached ({self.cost.annotations} bought; "
                                 f"{n} more would exceed it)")
        self.cost.annotations += n

    def check_budget(self, uses: tuple = STEP_USES) -> None:
        """Raise BudgetExceeded (the reason as its message) when an operation spending ``uses`` may
        not run (see Budget.exhausted). Every charged operation calls it before it runs; a method
        calls it (as is: an optimiser step) before each optimiser step's forward. Under a
        multi-process launch (with a budget set) it merges every process's costs and the main
        process decides for all: a collective, which every process reaches at the same points."""
        reason = self.budget_hit(uses)
        if reason:
            raise BudgetExceeded(reason)

    def budget_hit(self, uses: tuple = STEP_USES) -> Optional[str]:
        """Why to stop before an operation spending ``uses`` (None: go on); ``check_budget`` without
        raising. The main process decides for all (they must agree)."""
        if not self.budget.caps:  # the same config on every process: all skip the collectives alike
            return None
        self._merge_costs()
        return self.dist.from_main(self.budget.exhausted(self.cost, uses))

    # ---- checkpoints (resume after a kill or pre-emption; train.checkpoint_every steps)
    @property
    def _checkpointer(self) -> Checkpointer:
        return Checkpointer(self.checkpoint_dir or self.out_dir / "checkpoint", self.cfg.train.checkpoint_every)

    def save_checkpoint(self, step: int, modules: dict, optimizer=None, scheduler=None,
                        tensors: Optional[dict] = None, **state) -> None:
        """Call after finishing ``step`` (0-based, counted over the whole run); writes only when a
        checkpoint is due, on the main process. ``state``: the method's own
        JSON-serialisable state; ``tensors``: its tensor state (torch.Generator states)."""
        ckpt = self._checkpointer
        if not ckpt.due(step) or not self.dist.is_main:
            return
        log_file = self.out_dir / "train_log.jsonl"
        cost = self.cost.as_dict()
        ckpt.save(step, modules, optimizer, scheduler,
                  {"cost": cost, "train_log": log_file.read_text() if log_file.exists() else "", **state}, tensors)

    def checkpoint_state(self) -> Optional[dict]:
        """The method state of the last checkpoint, loading nothing (None: starting fresh)."""
        return self._checkpointer.peek()

    def resume(self, modules: dict, optimizer=None, scheduler=None) -> tuple[int, dict]:
        """(first step to run, saved method state): restores weights, optimizer, RNG, costs and
        the train log of the last checkpoint; (0, {}) when starting fresh. The state's "tensors"
        holds what was saved with ``tensors=``."""
        state = self._checkpointer.restore(modules, optimizer, scheduler)
        if state is None:
            return 0, {}
        self.cost.restore(state.pop("cost"))
        self._synced = (self.cost.tokens_generated, self.cost.pm_calls, self.cost.flops)  # saved: run totals
        log_text = state.pop("train_log")
        if self.dist.is_main:
            (self.out_dir / "train_log.jsonl").write_text(log_text)
        return state.pop("step") + 1, state

    # ---- measurement (never charged, never checks the budget; its seconds go to cost.measure_s:
    # log_point, sample_free and score_free time themselves, measure runs inside log_point)
    def _sample(self, model, prompts: list[str], n: int = 1, temperature: Optional[float] = None,
                max_new_tokens: Optional[int] = None, seed: Optional[int] = None, **hooks) -> SampleBatch:
        return sample(model, self.tokenizer, prompts, n=n, seed=self.seed if seed is None else seed,
                      temperature=temperature or self.cfg.train.temperature,
                      max_new_tokens=max_new_tokens or self.cfg.train.max_new_tokens, max_len=self.max_len,
                      fmt=self.fmt, kv_cache=self.cfg.train.kv_cache, **hooks)

    def sample_free(self, model, prompts: list[str], n: int = 1, temperature: Optional[float] = None,
                    max_new_tokens: Optional[int] = None, seed: Optional[int] = None) -> SampleBatch:
        """``sample`` for measurement: the same sampler and defaults, not charged."""
        with self.cost.measuring():
            return self._sample(model, prompts, n, temperature, max_new_tokens, seed)

    def eval_sample(self, model) -> SampleBatch:
        """The held-out samples every policy is measured on: one per eval prompt, at eval.temperature,
        from the evaluation stream (never the training one). Not charged."""
        return self.sample_free(model, self.eval_prompts, temperature=self.cfg.eval.temperature,
                                seed=self.seed + EVAL_SEED_OFFSET)

    def measure(self, model=None, responses: Optional[Responses] = None, label: str = "train",
                scores: Optional[tuple[list[float], list[float]]] = None) -> dict:
        """Proxy and judge reward, truncation rate and KL(π‖π0) (both at the samples' temperature)
        of ``model`` on the fixed held-out prompts; or of given responses (inference-time policies:
        KL then comes from the method). Weights measured before are read back (``measured``); such a
        point carries ``repeats_step``, the step of this run's point it repeats."""
        got, repeats = self._read(model, responses, scores)
        self.last_measured = got
        responses, proxy, judge = got.samples, got.proxy, got.judge
        texts = responses.responses if isinstance(responses, SampleBatch) else responses
        point = {"label": label, "proxy_reward": sum(proxy) / len(proxy), "judge_reward": sum(judge) / len(judge),
                 "judge": self.judge_name, "mean_response_chars": sum(map(len, texts)) / len(texts),
                 "proxy_judge_spearman": _defined(rank_correlation(proxy, judge))}
        if label == "pi0":
            self._pi0_scores = (list(proxy), list(judge))
        elif self._pi0_scores is not None and len(self._pi0_scores[0]) == len(proxy):
            # same prompts, same eval seed: each pair is this policy's sample vs π0's for one prompt
            point["proxy_judge_agreement"] = _defined(pairwise_agreement(proxy, judge, *self._pi0_scores))
        if isinstance(responses, SampleBatch):
            point["truncation_rate"] = responses.truncation_rate
        point.update(got.kl)
        if repeats is not None:
            point["repeats_step"] = repeats
        for hook in self.point_hooks:
            point.update(hook(self, model, responses))
        return point

    def _read(self, model, responses: Optional[Responses], scores) -> tuple[Measured, Optional[float]]:
        """What a point reads: from memory or disk when these weights were measured before (then also
        the step of this run's point that measured them, if any), else sampled, scored and compared
        to π0 (and to the start) now."""
        if model is None:  # an inference-time policy's responses: nothing to key them by
            proxy, judge = scores or self.score_free(responses)
            return Measured(responses, list(proxy), list(judge), {}), None
        memo, weights = self._memo(), fingerprint(model)
        hit, own = memo.get(weights)
        if hit is not None and (responses is None or (isinstance(responses, SampleBatch) and
                                                      responses.response_ids == hit.samples.response_ids)):
            if not own:  # π0's point from another run: this run's own from now on
                memo.put(weights, hit, to_disk=False)
            return hit, (hit.step if own else None)
        if responses is None:
            responses = self.eval_sample(model)
        if not isinstance(responses, SampleBatch):
            raise TypeError("measure: KL needs the sampled ids; pass the model's SampleBatch, not texts")
        pad, pi0, start = self.tokenizer.pad_token_id, self.pi0(), self._start_model()
        # the PMs, the policy, π0 and the start read the same samples in the same batches: one pass
        # over the frozen blocks they share serves all of them (bitwise the same numbers)
        with shared_trunk.sharing(shared_trunk.scoring_models(model, pi0, start, self.pm, self.judge)):
            proxy, judge = scores or self.score_free(responses)
            # π0 against itself: both log-probs are the same numbers, so both estimates are exactly 0
            kl = {"kl_k1": 0.0, "kl_k3": 0.0} if model is pi0 else kl_estimates(model, pi0, responses, pad_id=pad,
                                                                                  device=self.device)
            if start is not None:
                on_start = kl_estimates(model, start, responses, pad_id=pad, device=self.device)
                kl.update(kl_k1_start=on_start["kl_k1"], kl_k3_start=on_start["kl_k3"])
        got = Measured(responses, list(proxy), list(judge), kl)
        memo.put(weights, got, to_disk=model is pi0)
        return got, None

    def score_texts_free(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        """``score_free`` of fixed texts, read back when this sweep's stages scored them before."""
        return self._memo().scores(prompts, responses, lambda: self.score_free(prompts, responses))

    def _memo(self) -> MeasureMemo:
        """This run's memo of measured weights; π0's points go to disk for the other runs of the
        sweep, keyed by all else a point depends on (only in a run's own context: a sub-context may
        score with another PM or start elsewhere)."""
        if self._measure_memo is None:
            c = self.cfg
            built = hasattr(self.stages, "keys")  # a context built by hand (tests) has no stage keys: memory only
            context = {"stages": self.stages.keys() if built else None, "prompts": self.eval_prompts,
                       "seed": self.seed + EVAL_SEED_OFFSET,
                       "temperature": c.eval.temperature, "max_new_tokens": c.train.max_new_tokens,
                       "max_len": self.max_len, "format": self.fmt, "kv_cache": c.train.kv_cache,
                       "judge": self.judge_name, "reward": dataclasses.asdict(c.reward),
                       "precision": c.train.precision, "device": self.device.type}
            shared = built and self.start_path is None and self.reference_path is None and not self._derived
            self._measure_memo = MeasureMemo(context, Path(c.paths.cache_dir) / "measured" if shared else None)
        return self._measure_memo

    def pm_score_free(self, prompts: Responses, responses: Optional[list[str]] = None) -> torch.Tensor:
        """Proxy PM scores for measurement (of a SampleBatch by its ids, or of texts): not charged
        (``score`` charges by the difference in the PM's counters around its own call, so they need no
        restoring here)."""
        with self.cost.measuring(), uncounted(self.pm):
            return self._pm_scores(prompts, responses)

    def score_free(self, prompts: Responses, responses: Optional[list[str]] = None) -> tuple[list[float], list[float]]:
        """Per-response proxy and judge rewards for measurement (of a SampleBatch by its ids, or of
        texts): not charged to the method."""
        with self.cost.measuring():
            proxy = self.pm_score_free(prompts, responses).tolist()
            if isinstance(prompts, SampleBatch):
                judge = self.judge(prompts.prompts, prompts.responses, samples=prompts)
            else:
                judge = self.judge(prompts, responses)
        return proxy, [float(j) for j in judge]

    def log_step(self, step: int, **scalars) -> None:
        """Per-step training scalars (losses, learning rate, ...) to the trackers of
        train.report_to: every method calls it once per optimiser step (main process only)."""
        if self.tracker is not None and self.dist.is_main:
            self.tracker.log_step(step, **scalars)

    def log_point(self, step: int, model=None, responses=None, label: str = "train", scores=None, **extra) -> dict:
        """Append one (step, KL, proxy, judge, cost) point to train_log.jsonl and the trackers
        (main process only; the others get {})."""
        if not self.dist.is_main:
            return {}
        was_training = model.training if model is not None else False
        with self.cost.measuring():
            point = {"method": self.cfg.method["name"], "seed": self.seed, "step": _offset(step, self.step_offset),
                     **self.measure(model, responses, label, scores), **self.cost.as_dict(), **self.point_extra,
                     **extra}
            if model is not None and self.last_measured.step is None:  # a later repeat names this point
                self.last_measured.step = point["step"]
        if model is not None and was_training:
            model.train()
        with open(self.out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")
        if self.tracker is not None:
            self.tracker.log_point(point)
        log.info("step %d %s: proxy %.3f judge %.3f kl_k3 %s", step, label, point["proxy_reward"],
                 point["judge_reward"], f"{point['kl_k3']:.3f}" if "kl_k3" in point else "-")
        return point
