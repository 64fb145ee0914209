"""Structured configs: one dataclass per concern, registered in Hydra's ConfigStore.

Hydra rejects unknown keys at composition time (struct mode). Ranges and choices are declared on
the fields with ``opt(...)`` and checked by ``check`` before anything trains, so a bad config
fails in seconds with the full key named (``stages.pm.lr: must be > 0, got -1``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf



# A prompt window never shrinks below this, even when the response room is huge (train.prompt_window).
MIN_PROMPT_TOKENS = 8


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the full key."""


def opt(default: Any = dataclasses.MISSING, *, gt=None, ge=None, le=None, lt=None,
        choices=None, factory=None, doc: str = ""):
    """A dataclass field with its valid range declared next to it."""
    meta = {k: v for k, v in dict(gt=gt, ge=ge, le=le, lt=lt, choices=choices, doc=doc).items()
            if v not in (None, "")}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_value(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {list(meta['choices'])}, got {value!r}")
    for name, op, word in (("gt", float.__gt__, ">"), ("ge", float.__ge__, ">="),
                           ("lt", float.__lt__, "<"), ("le", float.__le__, "<=")):
        if name in meta and not op(float(value), float(meta[name])):
            raise ConfigError(f"{key}: must be {word} {meta[name]}, got {value!r}")


def check(obj: Any, prefix: str) -> None:
    """Validate a dataclass instance recursively against the ranges declared with ``opt``."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, key)
        else:
            _check_value(key, value, dict(f.metadata))
    post = getattr(obj, "validate", None)
    if callable(post):  # cross-field rules
        post(prefix)


HH_SUBSETS = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]


# K of a ranked dataset (data.synth.rank_k): InstructGPT's labellers ranked 4 to 9 responses.
RANK_K_MIN, RANK_K_MAX = 4, 9


@dataclass
class SynthConfig:
    """Config of the embedded ``hh_synth`` dataset (Hydra group ``data.synth``)."""

    n_pairs: int = 6000
    # T in the Bradley-Terry label draw; 2.0 makes labels agree with the gold ordering on ~72% of
    # pairs (seed 0: 0.719), about as often as HH labels agree with a strong PM.
    noise_temperature: float = 2.0
    spurious_strength: float = 1.0  # s: label-only bonus per stock-phrase occurrence
    seed: int = 0
    harmless_fraction: float = 0.3  # share of dialogues whose last turn is a harmful request
    max_turns: int = 3
    edgy_fraction: float = 0.2  # share of helpful dialogues whose last turn is an edgy request
    dependent_fraction: float = 0.5  # chance that a turn refers back to the previous one
    # K responses per prompt ranked by the annotator model (InstructGPT's ranking data), or None for
    # pairs; ranked data keeps chosen/rejected = best/worst and the ranking in meta (``_make_ranking``)
    rank_k: int | None = None
    # a share of the multi-turn dialogues open with a checkable system instruction (Ghost Attention's
    # data, alignbench.data.instructions); the first reply follows it, later ones ignore it
    system_instructions: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.system_instructions, bool):
            raise ValueError(f"data.synth.system_instructions must be true or false, got {self.system_instructions!r}")
        if self.system_instructions and self.max_turns < 2:
            raise ValueError("data.synth.system_instructions: needs data.synth.max_turns >= 2 (only multi-turn "
                             "dialogues get an instruction)")
        for key in ("n_pairs", "seed", "max_turns"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"data.synth.{key} must be an integer, got {value!r}")
        for key in ("noise_temperature", "spurious_strength", "harmless_fraction", "edgy_fraction",
                    "dependent_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"data.synth.{key} must be a finite number, got {value!r}")
        if self.n_pairs < 1:
            raise ValueError(f"data.synth.n_pairs must be >= 1, got {self.n_pairs}")
        if not 1 <= self.max_turns <= 4:
            raise ValueError(f"data.synth.max_turns must be in [1, 4] (longer dialogues exceed the "
                             f"~600-character budget), got {self.max_turns}")
        if self.noise_temperature <= 0:
            raise ValueError(f"data.synth.noise_temperature must be > 0, got {self.noise_temperature}")
        if self.spurious_strength < 0:
            raise ValueError(f"data.synth.spurious_strength must be >= 0, got {self.spurious_strength}")
        for key in ("harmless_fraction", "edgy_fraction", "dependent_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.synth.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.rank_k is not None and (isinstance(self.rank_k, bool) or not isinstance(self.rank_k, int)
                                        or not RANK_K_MIN <= self.rank_k <= RANK_K_MAX):
            raise ValueError(f"data.synth.rank_k: must be null (pairs) or an integer in [{RANK_K_MIN}, {RANK_K_MAX}] "
                             f"(InstructGPT's K), got {self.rank_k!r}")


@dataclass
class DataConfig:
    name: str = opt("hh_synth", choices=["hh_synth", "hh_rlhf"])
    path: Optional[str] = None  # hh_rlhf: local dir with the Hub layout; None = the Hub
    subsets: List[str] = opt(factory=lambda: list(HH_SUBSETS))
    source_splits: List[str] = opt(factory=lambda: ["test"])
    bad_rows: str = opt("error", choices=["error", "skip"])
    split: Dict[str, float] = opt(factory=lambda: {"train": 0.8, "eval": 0.1, "test": 0.1})
    seed: int = 0
    max_pairs: Optional[int] = opt(None, gt=0)
    # how dialogues meet the model (alignbench.formats): raw HH transcript text, or the tokenizer's chat template
    format: str = opt("raw", choices=["raw", "chat"])
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self, prefix: str) -> None:
        if self.name == "hh_rlhf":
            bad = [s for s in self.subsets if s not in HH_SUBSETS]
            if bad:
                raise ConfigError(f"{prefix}.subsets: unknown {bad}; valid: {HH_SUBSETS}")
        if set(self.split) != {"train", "eval", "test"}:
            raise ConfigError(f"{prefix}.split: needs exactly train, eval, test; got {sorted(self.split)}")
        if abs(sum(self.split.values()) - 1.0) > 1e-6 or min(self.split.values()) <= 0:
            raise ConfigError(f"{prefix}.split: fractions must be > 0 and sum to 1, got {dict(self.split)}")


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) through the ``peft`` library, used when model.peft=lora."""
    r: int = opt(16, gt=0)  # rank of the update B·A
    alpha: float = opt(32.0, gt=0)  # scale: the update is (alpha / r)·B·A
    dropout: float = opt(0.0, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: Optional[List[str]] = None  # module names; None = the architecture's default list


@dataclass
class ModelConfig:
    kind: str = opt("tiny", choices=["tiny", "hf", "gguf"])
    name_or_path: Optional[str] = None  # Hub id or local dir (hf); dir or file (gguf)
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False  # off unless you trust the repository's code
    # data.format=chat: null keeps the tokenizer's own template; chatml adds ChatML tokens and template
    chat_template: Optional[str] = opt(None, choices=["chatml"])
    # `tiny`: a from-scratch model with a byte-level BPE trained on the stage's own corpus;
    # arch picks the family (transformers' config classes, each with its real quirks: models.tiny_config)
    arch: str = opt("llama", choices=["llama", "gpt2", "gpt_neox", "qwen2", "gemma"])
    vocab_size: int = opt(1024, ge=260)
    hidden_size: int = opt(128, gt=0)
    num_layers: int = opt(4, gt=0)
    num_heads: int = opt(4, gt=0)
    intermediate_size: int = opt(352, gt=0)
    max_seq_len: int = opt(256, ge=16)
    # none: every stage and method trains all weights; lora: π0, the PMs and every method train
    # LoRA adapters (+ the PM's scalar head), saved merged (alignbench.lora)
    peft: str = opt("none", choices=["none", "lora"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    # null: every weight trains (full fine-tuning). K: π0's stages, the PMs and every method's policy
    # train only the top K transformer blocks, the final norm and the LM head / scalar head; the
    # embeddings and the blocks below stay frozen (π0's, bitwise), untied from a tied LM head
    # (alignbench.freeze). 0 <= K <= the model's layers; not with peft=lora.
    trainable_layers: Optional[int] = opt(None, ge=0)

    def validate(self, prefix: str) -> None:
        if self.kind in ("hf", "gguf") and not self.name_or_path:
            raise ConfigError(f"{prefix}.name_or_path: required when {prefix}.kind={self.kind}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_size: must be divisible by {prefix}.num_heads")
        if self.trainable_layers is not None and self.peft == "lora":
            raise ConfigError(f"{prefix}.trainable_layers: cannot be combined with {prefix}.peft=lora (LoRA already "
                              f"freezes the base weights); set one of them")
        if self.kind == "tiny" and (self.trainable_layers or 0) > self.num_layers:
            raise ConfigError(f"{prefix}.trainable_layers: must be between 0 and the model's {self.num_layers} "
                              f"layers ({prefix}.num_layers), got {self.trainable_layers}")
        head_dim = self.hidden_size // self.num_heads
        if self.kind == "tiny" and self.arch != "gpt2" and head_dim % 2:  # rotary embeddings rotate pairs
            raise ConfigError(f"{prefix}.hidden_size: {prefix}.arch={self.arch} rotates pairs of dimensions, so "
                              f"hidden_size / num_heads (head_dim {head_dim}) must be even")
        if self.kind == "tiny" and self.arch == "gpt_neox" and head_dim % 8:
            raise ConfigError(f"{prefix}.hidden_size: {prefix}.arch=gpt_neox rotates 25% of each head, so "
                              f"hidden_size / num_heads (head_dim {head_dim}) must be a multiple of 8")


@dataclass
class OptimConfig:
    """Optimisation settings a stage or method can override; unset fields use `train`."""
    lr: float = opt(1e-3, gt=0)
    batch_size: int = opt(32, gt=0)
    epochs: float = opt(1.0, gt=0)
    max_steps: Optional[int] = opt(None, gt=0)


@dataclass
class BaseStageConfig(OptimConfig):
    finetune_pretrained: bool = False  # hf/gguf: also train on the dialogues (tiny always trains)
    lr: float = opt(3e-3, gt=0)
    epochs: float = opt(2.0, gt=0)


@dataclass
class Pi0StageConfig(OptimConfig):
    mode: str = opt("context_distill", choices=["context_distill", "preferred_ft", "none"])
    top_k: int = opt(50, gt=0)  # teacher log-probs kept per token (Bai et al. App. A.1)
    hhh_prompt: str = "builtin"  # "builtin" or the literal prompt text
    lr: float = opt(1e-3, gt=0)
    # Llama 2 §4.2.4, safety context distillation after the HHH one (alignbench.stages.safety_distill):
    # none | generic (a preprompt saying the assistant avoids harm) | template (plus an answer
    # template per risk category); π0 is fine-tuned on its own answers sampled with the preprompt
    safety_preprompt: str = opt("none", choices=["none", "generic", "template"])
    # keep a distilled answer only where the safety PM scores it above the undistilled one (targeted)
    safety_targeted: bool = False
    # method training prompts the safety distillation samples on (seeded), at most this many
    safety_prompts: int = opt(512, gt=0)
    # where they come from: adversarial (the harmless subsets' prompts only, the harmful requests:
    # Llama 2 §4.2.4 distils the safety context on adversarial prompts) or mixed (up to half from
    # the harmless subsets, the rest from the others: the rule before issue 24)
    safety_prompt_pool: str = opt("adversarial", choices=["adversarial", "mixed"])
    safety_epochs: float = opt(2.0, gt=0)  # passes of supervised fine-tuning over the kept answers
    # Ghost Attention (Llama 2 §3.3, alignbench.stages.gatt) on π0, before any method: needs
    # data.synth.system_instructions=true
    gatt: bool = False


@dataclass
class PMStageConfig(OptimConfig):
    init: str = opt("pi0", choices=["pi0", "base"])
    pmp_path: Optional[str] = None  # optional preference-model pretraining data (HH layout dir)
    pmp_epochs: float = opt(1.0, gt=0)
    lr: float = opt(1e-3, gt=0)
    # the PM's training loss (alignbench.stages.pm_objectives): pairwise −log σ(r_c − r_r); ranking
    # (InstructGPT: all C(K,2) pairs of a prompt in one element); classifier (pointwise good/bad);
    # lm (no training: summed log p of the response under the init LM, π0 by default)
    objective: str = opt("pairwise", choices=["pairwise", "ranking", "classifier", "lm"])
    harmless_weight: float = opt(1.0, ge=0)  # λ in L = L_helpful + λ·L_harmless (1 = unweighted)
    # human judgements the PM trains on (one = one prompt labelled: a pair, or a ranking of K);
    # null = all, N = the first N of a seeded order of its training comparisons
    judgements: Optional[int] = opt(None, gt=0)
    # with model.trainable_layers=K: run the frozen bottom blocks once per training sequence and
    # keep their output (alignbench.frozen_trunk), so a step runs only the top K blocks and the
    # head; a sequence's trunk then runs alone rather than in its batch (the last float bits differ)
    trunk_cache: bool = False


@dataclass
class GattStageConfig(OptimConfig):
    """Ghost Attention's fine-tuning of π0 (stage pi0-gatt, on when stages.pi0.gatt)."""
    dialogues: int = opt(256, gt=0)  # training dialogues (≥ 2 Human turns) sampled with the instruction
    candidates: int = opt(4, gt=0)  # samples per turn; the first that follows the instruction is kept
    lr: float = opt(1e-3, gt=0)
    epochs: float = opt(2.0, gt=0)


@dataclass
class RewardConfig:
    """What PPO, best-of-n, RS fine-tuning, RRHF and iterated RLHF optimise (alignbench.stages.reward)."""
    # single: the one proxy PM (stages.pm); safety_helpful: Llama 2's two PMs, a safety PM on the
    # harmless subsets and a helpfulness PM on the helpful ones, combined per response
    kind: str = opt("single", choices=["single", "safety_helpful"])
    # use the safety score when the prompt is tagged harmful or σ(safety score) < threshold
    # (Llama 2: 0.15); scores are standardised on the PM's held-out comparisons first
    threshold: float = opt(0.15, gt=0, lt=1)
    # where a prompt's harmful tag comes from: subset (the data's label, harmless subsets) or
    # classifier (the safety PM: σ(r_s(x, refusal) − r_s(x, compliance)) ≥ classifier_threshold)
    tag: str = opt("subset", choices=["subset", "classifier"])
    classifier_threshold: float = opt(0.5, gt=0, lt=1)
    # the share of the safety PM's (pm-safety) training comparisons drawn from the helpful subsets,
    # mixed into all the harmless ones: Llama 2 §3.2.2 trains its safety RM on safety data mixed with
    # helpfulness data 90/10, so that it does not learn only "a refusal is better"; 0: harmless only
    safety_helpful_share: float = opt(0.1, ge=0, lt=1)


@dataclass
class StagesConfig:
    seed: int = 0  # shared stages use their own seed so that method seeds reuse them
    base: BaseStageConfig = field(default_factory=BaseStageConfig)
    pi0: Pi0StageConfig = field(default_factory=Pi0StageConfig)
    pm: PMStageConfig = field(default_factory=PMStageConfig)
    gatt: GattStageConfig = field(default_factory=GattStageConfig)


# train.report_to: tracker name -> the package it needs (alignbench.tracking writes to them)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


@dataclass
class TrainConfig:
    """Shared defaults every method starts from (fairness: same optimiser, precision, sampling)."""
    lr: float = opt(1e-4, gt=0)
    batch_size: int = opt(32, gt=0)
    grad_clip: float = opt(1.0, gt=0)
    weight_decay: float = opt(0.0, ge=0)
    warmup_steps: int = opt(0, ge=0)
    max_new_tokens: int = opt(32, gt=0)
    temperature: float = opt(1.0, gt=0)
    # the sampler's KV cache (alignbench.sampling): dynamic drops ended rows from the batch; static
    # preallocates prompt width + max_new_tokens (fixed shapes, for GPUs; ended rows stay, masked)
    kv_cache: str = opt("dynamic", choices=["dynamic", "static"])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bf16: every forward of the run under torch.autocast(bfloat16), fp32 weights (alignbench.precision);
    # only on a device with native bf16 (a CUDA GPU that supports it, a CPU with avx512_bf16/amx_bf16/bf16)
    precision: str = opt("fp32", choices=["fp32", "bf16"])
    checkpoint_every: int = opt(0, ge=0)  # steps; 0 = no mid-training checkpoints
    num_threads: int = opt(0, ge=0)  # torch CPU threads; 0 = torch's default
    # recompute each layer's activations in the backward pass instead of keeping them (every
    # training forward: stages and methods): less memory, about a third more compute
    gradient_checkpointing: bool = False
    # padding-free training forwards (alignbench.packing): each batch's real tokens as one packed
    # row, attention per sequence; false = the right-padded forwards (same numbers to ~1e-6)
    packing: bool = True
    # experiment trackers (alignbench.tracking): tensorboard, wandb, trackio, mlflow; [] = none
    report_to: List[str] = opt(factory=lambda: ["tensorboard"])
    # (KL, reward) points each training method logs, spread evenly over its planned optimiser steps
    # (alignbench.methods.log_steps), besides π0's point and the end; method.eval_every overrides
    log_points: int = opt(8, ge=2)

    def validate(self, prefix: str) -> None:
        for name in self.report_to:
            if name not in TRACKERS:
                raise ConfigError(f"{prefix}.report_to: unknown tracker {name!r}; valid: {list(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise ConfigError(f"{prefix}.report_to: {name} is not installed (pip install {TRACKERS[name]})")


@dataclass
class BudgetConfig:
    """Optional cost cap applied to every method alike, for comparisons at matched cost."""
    pm_calls: Optional[int] = opt(None, gt=0)
    generated_tokens: Optional[int] = opt(None, gt=0)
    wall_seconds: Optional[float] = opt(None, gt=0)  # the method's own seconds, measurement excluded
    flops: Optional[float] = opt(None, gt=0)  # estimated training compute (alignbench.cost)
    # preference labels a method may buy from the (simulated) annotator: iterated online RLHF
    annotations: Optional[int] = opt(None, gt=0)


@dataclass
class EvalConfig:
    n_prompts: int = opt(128, gt=0)  # fixed held-out prompts scored in every run
    split: str = opt("test", choices=["eval", "test"])  # where they come from: eval to tune, test to report
    temperature: float = opt(1.0, gt=0)  # every method is sampled, and its KL measured, at this temperature
    judge: str = opt("auto", choices=["auto", "gold", "test_pm"])
    pm_eval_pairs: Optional[int] = opt(None, gt=0)
    bootstrap: int = opt(1000, ge=100)
    n_samples_shown: int = opt(4, ge=0)
    nlp_tasks: List[str] = opt(factory=list)
    nlp_limit: Optional[int] = opt(None, gt=0)
    nlp_data_dir: Optional[str] = None
    nlp_seeds: Optional[List[int]] = None  # only runs with these seeds run nlp_tasks (null: every run)
    # sampling temperatures of the temperature/diversity evaluation ([] = off; each in (0, 2])
    temperatures: List[float] = opt(factory=list)
    diversity_samples: int = opt(4, ge=2)  # k samples per prompt and temperature (self-BLEU needs 2)
    temperature_prompts: int = opt(64, gt=0)  # the first this many eval prompts (≤ n_prompts)
    # prompts of the eval split on which the final evaluation also measures the policy, so that a
    # report picks a family's best configuration without looking at the test prompts (0 = off)
    selection_prompts: int = opt(0, ge=0)

    def validate(self, prefix: str) -> None:
        bad = [t for t in self.temperatures if not 0 < t <= 2]
        if bad:
            raise ConfigError(f"{prefix}.temperatures: each must be in (0, 2], got {bad}")
        if self.temperatures and self.temperature_prompts > self.n_prompts:
            raise ConfigError(f"{prefix}.temperature_prompts: {self.temperature_prompts} exceeds "
                              f"{prefix}.n_prompts={self.n_prompts} (they are the first eval prompts)")


@dataclass
class InitConfig:
    """Where the run's policy starts (method chaining, alignbench.chain)."""
    # null: π0; "<sweep>/<run_id>": that finished run's policy (sweep: a directory path, or a sweep
    # name under the sweeps root, the parent directory of paths.sweep_dir)
    from_run: Optional[str] = None
    # the training anchor of the continuing method (DPO's reference, PPO's KL penalty): the policy it
    # starts from ("start", the DPO paper's SFT reference) or π0; KL is measured against both either way
    reference: str = opt("start", choices=["start", "pi0"])


@dataclass
class PathsConfig:
    cache_dir: str = ".cache/alignbench"
    sweep_dir: str = "sweeps/default"


@dataclass
class Config:
    seed: int = 0
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = field(default_factory=lambda: {"name": "context_distilled"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    init: InitConfig = field(default_factory=InitConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def validate(self, prefix: str) -> None:
        # The sampler keeps at least MIN_PROMPT_TOKENS of the prompt and the whole response inside
        # the model's window; a model with learned absolute positions (GPT-2) has none beyond it
        # and would fail mid-sampling with an IndexError.
        if self.train.max_new_tokens + MIN_PROMPT_TOKENS > self.model.max_seq_len:
            raise ConfigError(f"train.max_new_tokens: {self.train.max_new_tokens} new tokens plus {MIN_PROMPT_TOKENS} "
                              f"prompt tokens exceed model.max_seq_len={self.model.max_seq_len}")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="alignbench_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into validated dataclasses (method config stays a DictConfig:
    the method's own dataclass validates it, see alignbench.methods.method_config)."""
    # A plain container first: a plugin's typed method node must stay a dict here.
    node = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    plain = OmegaConf.merge(OmegaConf.structured(Config), node)
    try:
        obj: Config = OmegaConf.to_object(plain)  # type: ignore[assignment]
    except Exception as e:  # OmegaConf names the key in its message
        raise ConfigError(str(e)) from e
    check(obj, "")
    return obj
