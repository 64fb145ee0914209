"""Train only the top of the network (model.trainable_layers=K), and the one entry point every
trainer calls to make a model trainable (``prepare``: LoRA, the frozen trunk, or everything).

With K set, the input embeddings (and GPT-2's position embeddings) and all but the top K
transformer blocks are frozen; the top K blocks, the final norm above them, the LM head (a PM's
scalar head, PPO's value head) stay trainable. Frozen parameters have ``requires_grad=False``, so:

- the optimiser never sees them (``train.make_optimizer`` takes the trainable ones only), and
  weight decay cannot move them: they are bitwise π0's after training;
- autograd records nothing below the cut: no hidden state there requires grad, so no activation
  is saved for backward and no weight gradient is computed for a frozen tensor.

A model whose LM head is tied to its input embeddings (SmolLM2, the tiny Llama) gets an untied
copy of the head (``config.tie_word_embeddings=False``): the head trains while the embeddings stay
frozen, and the saved model reloads with both tensors.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from alignbench import lora
from alignbench.config import ConfigError, ModelConfig

KEY = "model.trainable_layers"


def enabled(mc: ModelConfig) -> bool:
    return mc.trainable_layers is not None


def check_combination(mc: ModelConfig) -> None:
    """LoRA already trains a small part of every layer; a frozen trunk under it would leave LoRA
    adapters on frozen layers that never train, so the two are refused together."""
    if enabled(mc) and lora.enabled(mc):
        raise ConfigError(f"{KEY}: cannot be combined with model.peft=lora (LoRA already freezes the base "
                          f"weights); set one of them")


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(trunk, name, blocks): the transformers trunk (``model.base_model``: LlamaModel, GPT2Model,
    GPTNeoXModel, ...), the name of its ModuleList of transformer blocks, and that list (the one
    with config.num_hidden_layers entries)."""
    trunk = model.base_model
    n = model.config.get_text_config().num_hidden_layers
    for name, child in trunk.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return trunk, name, child
    raise ConfigError(f"{KEY}: no list of {n} transformer blocks found in this {model.config.model_type} model")


def check_layers(mc: ModelConfig, model: torch.nn.Module) -> None:
    """0 <= K <= the model's number of transformer blocks, checked before any training."""
    if not enabled(mc):
        return
    check_combination(mc)
    n = len(decoder_layers(model)[2])
    if not 0 <= mc.trainable_layers <= n:
        raise ConfigError(f"{KEY}: must be between 0 and the model's {n} layers, got {mc.trainable_layers}")


def untie_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give a tied LM head its own copy of the embedding matrix (same values: the model computes
    the same function) and mark the config untied, so the head can train while the embeddings stay
    frozen and ``save_pretrained`` writes (and ``from_pretrained`` reads) both tensors."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return model
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if model.config.get_text_config() is not model.config:
        model.config.get_text_config().tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5: the mapping tie_weights reads
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    return model


def freeze_below(model: torch.nn.Module, k: int) -> torch.nn.Module:
    """Freeze, in place, the trunk's children registered before its transformer blocks (the
    embeddings: embed_tokens, wte/wpe, embed_in) and the blocks below the top ``k``; the top ``k``
    blocks, the trunk's children after the blocks (the final norm) and everything outside the trunk
    (LM head, score head) train. A tied LM head is untied first (``untie_lm_head``)."""
    untie_lm_head(model)
    trunk, name, blocks = decoder_layers(model)
    model.requires_grad_(True)
    for child_name, child in trunk.named_children():
        if child_name == name:
            break
        child.requires_grad_(False)
    for block in blocks[:len(blocks) - k]:
        block.requires_grad_(False)
    return model


def prepare(model: torch.nn.Module, mc: ModelConfig, task: str = "CAUSAL_LM", seed: int = 0) -> torch.nn.Module:
    """The model a stage or method trains: under model.peft=lora, ``model`` with a fresh adapter
    (``lora.wrap``); with model.trainable_layers=K, ``model`` with its trunk frozen below the top K
    blocks (``freeze_below``); otherwise ``model`` itself, untouched (every weight trains)."""
    check_combination(mc)
    if lora.enabled(mc):
        return lora.wrap(model, mc, task=task, seed=seed)
    if enabled(mc):
        check_layers(mc, model)
        return freeze_below(model, mc.trainable_layers)
    return model


def frozen_names(model: torch.nn.Module) -> set[str]:
    """Names of ``model``'s frozen parameters (requires_grad False)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen (eval, no grad) deep copy of ``model`` that shares its frozen parameter tensors
    instead of copying them: what a teacher or reference built from the untrained policy needs,
    in one copy of the frozen trunk. Only the trainable parameters are duplicated."""
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def share_frozen(policy: Optional[torch.nn.Module], other: Optional[torch.nn.Module]) -> int:
    """Make ``other`` (a frozen reference loaded from disk) read the policy's frozen tensors where
    they are bitwise equal (so only where ``other`` really holds those weights): the storage of
    ``other``'s parameter is replaced by the policy's (``.data``, so a parameter tied inside ``other``
    follows). Returns how many tensors are now shared."""
    if policy is None or other is None:
        return 0
    mine = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    shared = 0
    for n, q in other.named_parameters(remove_duplicate=False):
        p = mine.get(n)
        if p is None or q.data_ptr() == p.data_ptr():
            shared += p is not None
            continue
        if p.shape == q.shape and p.dtype == q.dtype and p.device == q.device and torch.equal(p, q):
            q.data = p.data
            shared += 1
    return shared
