"""Stage 1, the base LM: a pretrained checkpoint as is, or `tiny` pretrained from scratch on the
dialogue corpus of the training split (tokenizer included)."""
from __future__ import annotations

import dataclasses
import math

import torch
from transformers import AutoConfig

from alignbench import freeze, lora
from alignbench.config import Config
from alignbench.data import load_data, pairwise_config
from alignbench.formats import check_format, set_chat_template
from alignbench.models import (PAD_IS_EOS, count_params, gguf_stage, load_pretrained_lm, load_tokenizer, pick_device,
                               tiny_lm, train_tokenizer)
from alignbench.cache import Artifact, build_stage, data_key, format_key, pointer_to, precision_key
from alignbench.stages.prompts import hhh_prompt
from alignbench.tracking import Tracker
from alignbench.encoding import encode_dialogue, pad_batch
from alignbench.train import batch_schedule, lm_loss, supervised_loop


def dialogue_corpus(pairs) -> list[str]:
    """Every distinct transcript (chosen and rejected), in data order."""
    return list(dict.fromkeys(t for p in pairs for t in (p.prompt + p.chosen, p.prompt + p.rejected)))


@torch.no_grad()
def mean_nll(model, tokenizer, texts: list[str], max_len: int, device, batch_size: int = 32,
             fmt: str = "raw") -> float:
    """Per-token negative log-likelihood on held-out dialogues, rendered for ``fmt`` (exp of it is perplexity)."""
    model.to(device).eval()  # a pretrained checkpoint that was not fine-tuned is still on the CPU
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = pad_batch([encode_dialogue(tokenizer, t, max_len, fmt) for t in texts[i:i + batch_size]],
                          tokenizer.pad_token_id, device)
        n = int(batch["response_mask"][:, 1:].sum())
        total += lm_loss(model, batch).item() * n
        count += n
    return total / max(count, 1)


def model_key(mc) -> dict:
    """The model config as part of a stage key. ``arch`` is left out at its default (llama), so
    the keys (and caches) of every Llama run made before the key existed stay valid. ``peft``,
    ``lora`` and ``trainable_layers`` are left out too: they shape the later stages' training only
    (π0 and the PMs add them to their own keys, ``alignbench.cache.lora_key``), so the base LM is the
    same with or without them;
    ``chat_template`` is part of ``alignbench.cache.format_key``."""
    key = {k: v for k, v in dataclasses.asdict(mc).items()
           if k not in ("peft", "lora", "trainable_layers", "chat_template")}
    if key["arch"] == "llama":
        del key["arch"]
    return key


def unchanged_source(cfg: Config, model, tok) -> Artifact | None:
    """The cached GGUF conversion when the base LM is exactly it (not fine-tuned, no chat template
    added, the same pad token), so the base stage can point at it; else None (the base LM is saved).
    A Hub or local checkpoint is outside the cache (not content-addressed): it is always copied."""
    mc = cfg.model
    if mc.kind != "gguf" or cfg.stages.base.finetune_pretrained or mc.chat_template is not None:
        return None
    source = gguf_stage(mc, cfg.paths.cache_dir)
    saved = load_tokenizer(source.path)
    same = (saved.pad_token == tok.pad_token and len(saved) == len(tok)
            and AutoConfig.from_pretrained(source.path).pad_token_id == model.config.pad_token_id)
    return source if same else None


def build_base(cfg: Config) -> Artifact:
    data = load_data(pairwise_config(cfg.data))  # ranked labels change only the PM
    sc, mc = cfg.stages.base, cfg.model
    key = {"model": model_key(mc), "base": dataclasses.asdict(sc), "hhh_prompt": hhh_prompt(cfg),
           "data": data_key(cfg), "seed": cfg.stages.seed, **precision_key(cfg), **format_key(cfg)}
    fmt = cfg.data.format

    def build(out):
        corpus = dialogue_corpus(data.train)
        if mc.kind == "tiny":
            # The HHH prompt joins the tokenizer corpus so that π0's teacher context stays short.
            tok = train_tokenizer(corpus + [hhh_prompt(cfg)] * 8, mc.vocab_size, pad_token=mc.arch not in PAD_IS_EOS)
            set_chat_template(tok, mc.chat_template)
            check_format(tok, fmt)  # before any training
            model = tiny_lm(mc, tok, cfg.stages.seed)
        else:  # a GGUF file is converted once into the cache, beside the stages
            model, tok = load_pretrained_lm(mc, cfg.paths.cache_dir)
            if set_chat_template(tok, mc.chat_template):  # ChatML tokens added: the embeddings grow
                model.resize_token_embeddings(len(tok))
            check_format(tok, fmt)
        lora.check_targets(mc, model)  # a bad model.lora.target_modules fails before any training
        freeze.check_layers(mc, model)  # and so does a model.trainable_layers above the model's layers
        max_len = min(mc.max_seq_len, getattr(model.config, "max_position_embeddings", mc.max_seq_len))
        device = pick_device(cfg.train.device)
        metrics = {"params": count_params(model)}
        if mc.kind == "tiny" or sc.finetune_pretrained:
            encoded = [encode_dialogue(tok, t, max_len, fmt) for t in corpus]
            batches = batch_schedule(len(encoded), sc.batch_size, sc.epochs, cfg.stages.seed, sc.max_steps)
            with Tracker(out / "tb", cfg.train.report_to, "base") as tracker:
                res = supervised_loop(model, batches, lambda idx: pad_batch([encoded[i] for i in idx], tok.pad_token_id),
                                      lm_loss, sc.lr, "base LM", cfg.train.grad_clip, device=device,
                                      warmup=min(50, len(batches) // 10), precision=cfg.train.precision,
                                      gradient_checkpointing=cfg.train.gradient_checkpointing, log_step=tracker.log_step)
            metrics.update(steps=res.steps, train_tokens=res.tokens, train_seconds=round(res.seconds, 2),
                           tokens_per_second=round(res.tokens_per_second, 1), final_loss=res.losses[-1])
        heldout = dialogue_corpus(data.eval)[:512]
        nll = mean_nll(model, tok, heldout, max_len, device, fmt=fmt)
        metrics.update(heldout_nll=nll, heldout_ppl=math.exp(min(nll, 50)))
        fields = {"metrics": metrics, "data_counts": {"train_texts": len(corpus), "heldout_texts": len(heldout)},
                  "data_stats": data.stats, "max_len": max_len}
        source = unchanged_source(cfg, model, tok)
        if source is not None:  # the converted checkpoint as is: point at it, no copy (~40 s for SmolLM2)
            return {**fields, **pointer_to(source)}
        lora.save_pretrained_here(model.to("cpu"), out)
        tok.save_pretrained(out)
        return fields

    return build_stage("base", key, cfg.paths.cache_dir, build)
