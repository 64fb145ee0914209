"""RunContext: what every method receives, and the one place its costs are counted.

Fairness lives here: every method gets the same π0 and reference, tokenizer, PM, prompts, sampler,
precision and optimiser defaults, and is measured by the same ``log_point`` (proxy PM reward,
judge reward, KL(π‖π0) by the k1 and k3 estimators, on the same held-out prompts and seed).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from alignbench.checkpoint import Checkpointer
from alignbench.config import Config
from alignbench.distributed import Dist, autocast_forward
from alignbench.methods import Budget, Cost
from alignbench.models import disable_dropout, load_lm
from alignbench.sampling import SampleBatch, sample
from alignbench.stages.graph import SharedStages
from alignbench.stages.preference import PMScorer, SampleScorer
from alignbench.train import encode_samples, pad_batch, response_logprobs

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


Responses = Union[SampleBatch, list[str]]  # samples with their ids, or bare texts (inference-time policies)


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
    _reference: Any = None
    _sample_pm: Any = None  # the PM reading SampleBatches by their ids (built on first use)
    _synced: tuple = (0, 0)  # (tokens_generated, pm_calls) already merged over processes

    # ---- models
    @property
    def max_len(self) -> int:
        return self.stages.pi0.record["max_len"]

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
        """A fresh trainable copy of π0 (every method starts here)."""
        torch.manual_seed(self.seed)
        return self.load(self.stages.pi0.path).train()

    def reference(self) -> torch.nn.Module:
        """π0, frozen (the KL anchor and DPO's reference); loaded once."""
        if self._reference is None:
            self._reference = self.load(self.stages.pi0.path).eval().requires_grad_(False)
        return self._reference

    def load(self, path) -> torch.nn.Module:
        """An LM on this run's device, under bf16 autocast when train.precision=bf16, with dropout
        off: every method trains in train mode and computes the same function as in eval mode
        (PPO's first-epoch ratios are exactly 1 on the samples it just drew; TRL does the same)."""
        return autocast_forward(disable_dropout(load_lm(path)).to(self.device), self.cfg.train.precision, self.device)

    def for_training(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: DDP-wrapped when launched multi-process
        (see alignbench.distributed), else ``policy`` itself. Parameters are shared."""
        return self.dist.prepare(policy)

    def charge_step(self, trained_tokens: int) -> None:
        """Charge one optimiser step's training tokens. Under a multi-process launch this also merges
        every process's sampling and PM costs since the previous step into the run's totals, so
        every process calls it once per step (it is a collective there)."""
        if not self.dist.enabled:
            self.cost.tokens_trained += trained_tokens
            return
        gen0, pm0 = self._synced
        trained, gen, pm = self.dist.sum([trained_tokens, self.cost.tokens_generated - gen0, self.cost.pm_calls - pm0])
        self.cost.tokens_trained += trained
        self.cost.tokens_generated, self.cost.pm_calls = gen0 + gen, pm0 + pm
        self._synced = (self.cost.tokens_generated, self.cost.pm_calls)

    def save_policy(self, policy) -> Path:
        """The trained LM (safetensors) and tokenizer under <run>/policy: what final evaluation loads."""
        path = self.out_dir / "policy"
        policy.eval()
        if self.dist.is_main:
            policy.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        return path

    # ---- charged operations
    def sample(self, model, prompts: list[str], n: int = 1, temperature: Optional[float] = None,
               max_new_tokens: Optional[int] = None, seed: Optional[int] = None) -> SampleBatch:
        """Training samples (charged), at the method's temperature or train.temperature."""
        out = sample(model, self.tokenizer, prompts, n=n, seed=self.seed if seed is None else seed,
                     temperature=temperature or self.cfg.train.temperature,
                     max_new_tokens=max_new_tokens or self.cfg.train.max_new_tokens, max_len=self.max_len)
        self.cost.tokens_generated += out.n_tokens
        return out

    def score(self, prompts: Union[SampleBatch, list[str]], responses: Optional[list[str]] = None) -> torch.Tensor:
        """PM scores, one PM call charged per response: of a SampleBatch by its sampled ids, or of
        dataset-style (prompt, response) texts."""
        self.cost.pm_calls += len(prompts)
        return self._pm_scores(prompts, responses)

    def _pm_scores(self, prompts: Responses, responses: Optional[list[str]]) -> torch.Tensor:
        if not isinstance(prompts, SampleBatch):
            return self.pm.score(prompts, responses)
        if self._sample_pm is None:
            self._sample_pm = SampleScorer(self.pm, self.tokenizer)
        return self._sample_pm(prompts)

    def budget_hit(self) -> Optional[str]:
        """Why to stop (None: go on); the main process decides for all (they must agree)."""
        return self.dist.from_main(self.budget.exhausted(self.cost))

    # ---- checkpoints (resume after a kill or pre-emption; train.checkpoint_every steps)
    @property
    def _checkpointer(self) -> Checkpointer:
        return Checkpointer(self.out_dir / "checkpoint", self.cfg.train.checkpoint_every)

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
        cost = state.pop("cost")
        self.cost.tokens_trained, self.cost.tokens_generated = cost["tokens_trained"], cost["tokens_generated"]
        self.cost.pm_calls = cost["pm_calls"]
        self.cost.started = time.time() - cost["wall_s"]
        self._synced = (self.cost.tokens_generated, self.cost.pm_calls)  # the saved costs are run totals
        log_text = state.pop("train_log")
        if self.dist.is_main:
            (self.out_dir / "train_log.jsonl").write_text(log_text)
        return state.pop("step") + 1, state

    # ---- measurement (not charged)
    def eval_sample(self, model) -> SampleBatch:
        """The held-out samples every policy is measured on: one per eval prompt, at eval.temperature,
        from the evaluation stream (never the training one)."""
        return sample(model, self.tokenizer, self.eval_prompts, seed=self.seed + EVAL_SEED_OFFSET,
                      temperature=self.cfg.eval.temperature, max_new_tokens=self.cfg.train.max_new_tokens,
                      max_len=self.max_len)

    def measure(self, model=None, responses: Optional[Responses] = None, label: str = "train",
                scores: Optional[tuple[list[float], list[float]]] = None) -> dict:
        """Proxy and judge reward, truncation rate and KL(π‖π0) (both at the samples' temperature)
        of ``model`` on the fixed held-out prompts; or of given responses (inference-time policies:
        KL then comes from the method)."""
        if responses is None:
            responses = self.eval_sample(model)
        proxy, judge = scores or self.score_free(responses)
        texts = responses.responses if isinstance(responses, SampleBatch) else responses
        point = {"label": label, "proxy_reward": sum(proxy) / len(proxy), "judge_reward": sum(judge) / len(judge),
                 "judge": self.judge_name, "mean_response_chars": sum(map(len, texts)) / len(texts)}
        if isinstance(responses, SampleBatch):
            point["truncation_rate"] = responses.truncation_rate
        if model is not None:
            if not isinstance(responses, SampleBatch):
                raise TypeError("measure: KL needs the sampled ids; pass the model's SampleBatch, not texts")
            point.update(kl_estimates(model, self.reference(), responses, self.tokenizer.pad_token_id, self.device))
        return point

    def score_free(self, prompts: Responses, responses: Optional[list[str]] = None) -> tuple[list[float], list[float]]:
        """Per-response proxy and judge rewards for measurement (of a SampleBatch by its ids, or of
        texts): not charged to the method."""
        calls = self.pm.calls
        proxy = self._pm_scores(prompts, responses).tolist()
        self.pm.calls = calls
        if isinstance(prompts, SampleBatch):
            judge = self.judge(prompts.prompts, prompts.responses, samples=prompts)
        else:
            judge = self.judge(prompts, responses)
        return proxy, [float(j) for j in judge]

    def log_point(self, step: int, model=None, responses=None, label: str = "train", scores=None, **extra) -> dict:
        """Append one (step, KL, proxy, judge, cost) point to train_log.jsonl (main process only;
        the others get {})."""
        if not self.dist.is_main:
            return {}
        was_training = model.training if model is not None else False
        point = {"method": self.cfg.method["name"], "seed": self.seed, "step": step,
                 **self.measure(model, responses, label, scores), **self.cost.as_dict(), **extra}
        if model is not None and was_training:
            model.train()
        with open(self.out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")
        log.info("step %d %s: proxy %.3f judge %.3f kl_k3 %s", step, label, point["proxy_reward"],
                 point["judge_reward"], f"{point['kl_k3']:.3f}" if "kl_k3" in point else "-")
        return point
