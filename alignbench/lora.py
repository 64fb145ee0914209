"""LoRA through the ``peft`` library (model.peft=lora), and gradient checkpointing.

Under LoRA every trained model is an ordinary model plus adapters:

- π0's stage trains adapters on the base LM; its teacher (context distillation) is the same model
  with the adapters disabled, so no second copy is held;
- a PM stage trains adapters plus the scalar head (peft's SEQ_CLS task keeps ``score`` trainable);
- every method's policy is π0 plus a fresh adapter (B = 0 at the start: exactly π0), and the
  reference π0 is that policy with its adapter disabled (``AdapterDisabled``): one copy in memory.

What a stage or a method saves is the merged model (W + (alpha/r)·B·A, plain safetensors), which
``load_lm``/``load_pm`` read like any other; the adapter is saved beside it in ``<dir>/adapter/``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Iterator, Optional

import peft
import torch

from alignbench.config import ConfigError, ModelConfig

# Default target modules per architecture (config.model_type): every linear layer of attention and
# MLP, as QLoRA found best (Dettmers et al. 2023) and TRL/torchtune recipes use; never the
# embeddings or the LM head (tied to the embeddings in most small models).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{arch: _LLAMA_LIKE for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                       "olmo", "olmo2", "smollm3")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
KEY = "model.lora.target_modules"


def enabled(mc: ModelConfig) -> bool:
    return mc.peft == "lora"


def target_modules(mc: ModelConfig, model_type: str) -> list[str]:
    """The configured target modules, or the architecture's default list."""
    if mc.lora.target_modules:
        return list(mc.lora.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"{KEY}: no default LoRA target modules for architecture {model_type!r} "
                          f"(known: {sorted(DEFAULT_TARGETS)}); list the module names to adapt")
    return DEFAULT_TARGETS[model_type]


def check_targets(mc: ModelConfig, model: torch.nn.Module) -> None:
    """Every target name must match some module of ``model`` (peft's rule: the last name component),
    checked before any training so a typo fails at once with the key named."""
    if not enabled(mc):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules(mc, model.config.model_type) if t not in names]
    if missing:
        raise ConfigError(f"{KEY}: no module named {missing} in this {model.config.model_type} model")


def wrap(model: torch.nn.Module, mc: ModelConfig, task: str = "CAUSAL_LM", seed: int = 0) -> peft.PeftModel:
    """``model`` with a fresh LoRA adapter (A random with a seeded init, B = 0: the wrapped model
    computes exactly what ``model`` does until it trains); only the adapter (and, for
    task=SEQ_CLS, the scalar head ``score``) requires grad."""
    check_targets(mc, model)
    config = peft.LoraConfig(r=mc.lora.r, lora_alpha=mc.lora.alpha, lora_dropout=mc.lora.dropout,
                             target_modules=target_modules(mc, model.config.model_type), task_type=task,
                             modules_to_save=["score"] if task == "SEQ_CLS" else None)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft itself reads a transformers 5 deprecated alias; not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config)


def is_peft(model) -> bool:
    return isinstance(model, peft.PeftModel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (adapters injected: it computes the adapted
    function), or ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model computing what ``model`` computes: a merged copy of a peft model
    (the training model keeps its adapter), or ``model`` itself."""
    if not is_peft(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


def save(model: torch.nn.Module, path: str | Path) -> None:
    """Merged safetensors in ``path`` (what ``load_lm``/``load_pm`` read), and under LoRA the adapter
    in ``path/adapter``. Written from CPU copies' point of view: the model stays where it is."""
    save_pretrained_here(merged(model), path)
    if is_peft(model):
        model.save_pretrained(Path(path) / "adapter", safe_serialization=True)


def save_pretrained_here(model, path: str | Path) -> None:
    """``model.save_pretrained(path)`` (safetensors) written by this process whatever its rank.

    Once torch.distributed is initialised, transformers 5 writes the weights and config only on rank 0
    (``should_save_on_this_rank``) and silently nothing elsewhere; but a shared stage is built by
    whichever process takes its file lock first, so a stage built on rank 1 had a record and a
    tokenizer but no model."""
    model.should_save_on_this_rank = lambda is_main_process: True  # this instance only, for this call
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        del model.should_save_on_this_rank


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    """Activation checkpointing of every layer (non-reentrant: works with frozen inputs, no_grad
    reference passes and DDP). Under LoRA the embeddings' output must require grad for reentrant
    checkpointing; non-reentrant does not need it, but it is harmless and keeps peft's recipe."""
    if not on:
        return model
    inner = unwrap(model)
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_peft(model):
        inner.enable_input_require_grads()
    return model


class AdapterDisabled(torch.nn.Module):
    """The reference π0 as a view of a LoRA policy: its forward runs the policy with the adapter
    disabled, in eval mode, under no_grad. Holds no weights of its own (the policy is not a
    submodule, so ``.eval()``/``.train()`` on the view never flip the policy's mode, and
    ``parameters()`` yields the base weights only: N for the FLOPs of a reference forward)."""

    def __init__(self, policy: peft.PeftModel):
        super().__init__()
        object.__setattr__(self, "policy", policy)  # bypasses Module registration on purpose

    @property
    def config(self):
        return self.policy.config

    def get_output_embeddings(self):
        head = self.policy.get_output_embeddings()
        return getattr(head, "base_layer", head)  # an adapted LM head without its adapter

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return (p for n, p in self.policy.named_parameters() if "lora_" not in n)

    def forward(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()  # eval: the KV cache works under gradient checkpointing (sampling)
        try:
            with torch.no_grad(), self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def policy_view(policy: Optional[torch.nn.Module]) -> Optional[AdapterDisabled]:
    return AdapterDisabled(policy) if policy is not None and is_peft(policy) else None
