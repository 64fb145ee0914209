"""`alignbench bench <what>`: our training/generation code against its peer, side by side in one run.

    dpo         one DPO optimiser step of methods/dpo.py vs TRL's DPOTrainer (same model, pairs,
                batch size, steps, sequence length; both with precomputed reference log-probs,
                fp32, no gradient checkpointing)
    generate    alignbench.sampling.sample vs HF ``model.generate(do_sample=True)`` (same prompts,
                batch, max_new_tokens, plain multinomial sampling: top_k=0, top_p=1)
    train-loop  alignbench.train.supervised_loop vs a plain PyTorch loop (same LM batches, AdamW)
    all         the three above
    pm, ppo     PM / PPO training steps on their own (no peer): see alignbench.bench_memory

``--model smollm2`` (or a directory), ``--lora``, ``--grad-ckpt`` and ``--data-path`` (real HH pairs)
measure a real model the way the stages and methods train it (``bench dpo`` with --lora or
--grad-ckpt then runs our side only).

Why: the framework replaces TRL's trainer and HF's ``generate`` with its own short loops (one code
path for every method, seeded sampling, cost accounting); this shows what that costs or saves.

The model is a tiny Llama built in-process (byte-level BPE trained on a few hh_synth dialogues,
random weights: throughput does not depend on what was learnt) or ``--model DIR`` (a local
``save_pretrained`` directory, safetensors only, no remote code). Each side starts from a copy of
the same weights. Reported per side: tokens/s over the steps after the first (the first pays for
lazy initialisation; it is in ``wall_s``), total wall time, and peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (reset per side); on CPU the peak resident set size sampled
every 2 ms during the side minus the RSS when it started (``resource.getrusage``'s ru_maxrss is a
process-lifetime high-water mark and cannot be reset between sides; it is reported as
``process_maxrss_mb``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from alignbench.bench_memory import SOLO, prepare, resolve_model, variant
from alignbench.memory import maybe_fix_mmap_threshold

log = logging.getLogger(__name__)
WHAT = ("dpo", "generate", "train-loop")


# --------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark (an upper bound)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS above the block's starting RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mb = (self._peak - self._base) / 2**20
        return False


@dataclass
class Side:
    """One implementation's measurement."""
    bench: str
    side: str  # "alignbench" or the peer
    impl: str
    steps: int = 0
    tokens: int = 0  # all tokens processed (trained, or generated)
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # everything, setup and the first step included
    peak_mem_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        steady_s, steady_tok = sum(self.step_seconds[1:]), sum(self.step_tokens[1:])
        if not steady_s:  # one step only: no steady state to separate
            steady_s, steady_tok = sum(self.step_seconds), sum(self.step_tokens)
        return {"bench": self.bench, "side": self.side, "impl": self.impl, "steps": self.steps,
                "tokens": self.tokens, "tokens_per_s": round(steady_tok / max(steady_s, 1e-9), 1),
                "step_ms": round(1000 * steady_s / max(1, len(self.step_seconds[1:]) or len(self.step_seconds)), 2),
                "wall_s": round(self.wall_s, 3), "peak_mem_mb": round(self.peak_mem_mb, 1),
                "process_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                **self.extra}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- model and data
@dataclass
class Setup:
    model: Optional[torch.nn.Module]  # the initial weights (every side works on a deep copy); None: bench pm --model
    tokenizer: object
    pairs: list  # hh_synth PreferencePairs
    device: torch.device
    seq_len: int
    desc: str


def build_setup(args) -> Setup:
    """The shared model, tokenizer and dialogues of one bench run."""
    from alignbench.config import ModelConfig
    from alignbench.data.synth import SynthConfig, generate_hh_synth
    from alignbench.models import ensure_pad_token, load_lm, load_tokenizer, pick_device, tiny_lm, train_tokenizer

    device = pick_device(args.device)
    # twice what the batches need: dpo skips pairs too long for --seq-len
    pairs = generate_hh_synth(SynthConfig(n_pairs=max(args.pairs, 2 * args.batch_size * args.steps), seed=args.seed))
    if args.model:
        tok = ensure_pad_token(load_tokenizer(args.model))
        # bench pm builds its PM from the directory: no LM copy held beside it
        model = load_lm(args.model) if args.what != "pm" else None
        if model is not None:
            model.config.pad_token_id = tok.pad_token_id
        desc = f"{args.model}"
    else:
        corpus = [p.prompt + p.chosen for p in pairs[: args.pairs]] + [p.prompt + p.rejected for p in pairs[: args.pairs]]
        tok = train_tokenizer(corpus, args.vocab_size)
        mc = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         num_heads=args.num_heads, intermediate_size=args.intermediate_size, max_seq_len=args.seq_len)
        model = tiny_lm(mc, tok, args.seed)
        desc = (f"tiny Llama (vocab {len(tok)}, hidden {args.hidden_size}, {args.num_layers} layers, "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    tok.padding_side = "right"
    return Setup(model.to(device) if model is not None else None, tok, pairs, device, args.seq_len, desc)


def _copy(setup: Setup) -> torch.nn.Module:
    return copy.deepcopy(setup.model).to(setup.device)


# --------------------------------------------------------------------------- dpo
def _dpo_pairs(setup: Setup, args) -> list:
    """The first batch_size * steps pairs that fit in seq_len untruncated: the two sides truncate
    differently (TRL keeps the start, we keep the end of the prompt), so only whole pairs make the
    batches identical token for token."""
    from alignbench.train import encode

    need, tok = args.batch_size * args.steps, setup.tokenizer
    fits = [p for p in setup.pairs
            if all(len(encode(tok, p.prompt, r, 10**6).input_ids) <= setup.seq_len for r in (p.chosen, p.rejected))]
    if len(fits) < need:
        raise SystemExit(f"alignbench bench: --seq-len {setup.seq_len}: only {len(fits)} of {len(setup.pairs)} "
                         f"pairs fit untruncated, {need} needed (raise --seq-len or --pairs)")
    return fits[:need]


def _dpo_ours(setup: Setup, args) -> Side:
    from alignbench.train import make_optimizer
    from alignbench_methods.dpo import dpo_step, encode_pairs, reference_logps

    side = Side("dpo", "alignbench", variant("methods/dpo.py dpo_step", args))
    pairs, dev, pad = _dpo_pairs(setup, args), setup.device, setup.tokenizer.pad_token_id
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        policy = prepare(_copy(setup), args).train()
        encoded = encode_pairs(setup.tokenizer, pairs, setup.seq_len)
        t_ref = time.perf_counter()
        # the reference is π0 = these very weights before the first step, so the policy serves as it
        ref = reference_logps(policy, encoded, pad, dev, args.batch_size, desc="bench: our reference pass")
        _sync(dev)
        side.extra["ref_precompute_s"] = round(time.perf_counter() - t_ref, 3)
        policy.train()
        opt, sched = make_optimizer(policy, args.lr, total_steps=args.steps)
        losses = []
        for s in range(args.steps):
            idx = list(range(s * args.batch_size, (s + 1) * args.batch_size))
            t = time.perf_counter()
            out, n_tok = dpo_step(policy, opt, sched, encoded, ref, idx, pad, dev, args.beta, "sigmoid")
            _sync(dev)
            side.step_seconds.append(time.perf_counter() - t)
            side.step_tokens.append(n_tok)
            losses.append(out.loss.item())
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = args.steps, sum(side.step_tokens), mem.peak_mb
    side.extra["mean_loss"] = round(sum(losses) / len(losses), 4)
    return side


def _dpo_trl(setup: Setup, args) -> Side:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the Hub
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    side = Side("dpo", "trl", "trl.DPOTrainer")
    dev = setup.device
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _dpo_pairs(setup, args)]

    class StepTimer(TrainerCallback):
        trainer = None

        def on_step_begin(self, a, state, control, **kw):
            _sync(dev)
            self.t, self.tok = time.perf_counter(), self.trainer._total_train_tokens

        def on_step_end(self, a, state, control, **kw):
            _sync(dev)
            side.step_seconds.append(time.perf_counter() - self.t)
            side.step_tokens.append(int(self.trainer._total_train_tokens - self.tok))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings(), PeakMemory(dev) as mem:
        warnings.simplefilter("ignore", FutureWarning)  # TRL's own deprecation notices, not ours to fix
        t0 = time.perf_counter()
        cfg = DPOConfig(
            output_dir=out_dir, report_to="none", use_cpu=dev.type == "cpu", seed=args.seed,
            per_device_train_batch_size=args.batch_size, max_steps=args.steps, num_train_epochs=1,
            learning_rate=args.lr, lr_scheduler_type="cosine", max_grad_norm=1.0, beta=args.beta,
            loss_type="sigmoid", max_length=setup.seq_len,
            precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
            activation_checkpointing=False, bf16=False, fp16=False,  # TRL defaults True: match our fp32, no recompute
            save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            remove_unused_columns=False)
        trainer = DPOTrainer(model=_copy(setup), args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=setup.tokenizer, callbacks=[timer])
        timer.trainer = trainer
        result = trainer.train()
        _sync(dev)
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = len(side.step_seconds), sum(side.step_tokens), mem.peak_mb
    side.extra["mean_loss"] = round(float(result.training_loss), 4)  # TRL reports the mean over the run
    return side


# --------------------------------------------------------------------------- generate
def _prompts(setup: Setup, args) -> list[str]:
    return list(dict.fromkeys(p.prompt for p in setup.pairs))[: args.batch_size * args.steps]


def _generate_ours(setup: Setup, args) -> Side:
    from alignbench.sampling import sample

    side = Side("generate", "alignbench", "alignbench.sampling.sample")
    model, prompts = _copy(setup).eval(), _prompts(setup, args)
    with PeakMemory(setup.device) as mem:
        t0 = time.perf_counter()
        for s in range(args.steps):
            chunk = prompts[s * args.batch_size:(s + 1) * args.batch_size]
            t = time.perf_counter()
            out = sample(model, setup.tokenizer, chunk, max_new_tokens=args.max_new_tokens, temperature=1.0,
                         seed=args.seed + s, batch_size=args.batch_size, max_len=setup.seq_len)
            _sync(setup.device)
            side.step_seconds.append(time.perf_counter() - t)
            side.step_tokens.append(out.n_tokens)
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = args.steps, sum(side.step_tokens), mem.peak_mb
    return side


@torch.no_grad()
def _generate_hf(setup: Setup, args) -> Side:
    side = Side("generate", "hf", "transformers generate(do_sample=True)")
    model, tok, dev, prompts = _copy(setup).eval(), setup.tokenizer, setup.device, _prompts(setup, args)
    room = max(8, setup.seq_len - args.max_new_tokens)  # the same prompt truncation as ours
    eos = tok.eos_token_id
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        for s in range(args.steps):
            chunk = prompts[s * args.batch_size:(s + 1) * args.batch_size]
            ids = [tok(p, add_special_tokens=False)["input_ids"][-room:] for p in chunk]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for r, seq in enumerate(ids):  # left padding, as generate() expects for decoder-only models
                input_ids[r, width - len(seq):] = torch.tensor(seq)
                attn[r, width - len(seq):] = 1
            torch.manual_seed(args.seed + s)
            t = time.perf_counter()
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), do_sample=True,
                                 max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
            _sync(dev)
            side.step_seconds.append(time.perf_counter() - t)
            new = out[:, width:].tolist()
            side.step_tokens.append(sum(row.index(eos) if eos in row else len(row) for row in new))
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = args.steps, sum(side.step_tokens), mem.peak_mb
    return side


# --------------------------------------------------------------------------- train loop
def _lm_batches(setup: Setup, args):
    """Whole dialogues as LM batches (response_start 0: every token is trained on)."""
    from alignbench.train import encode, pad_batch

    enc = [encode(setup.tokenizer, "", p.prompt + p.chosen, setup.seq_len) for p in setup.pairs]
    batches = [list(range(s * args.batch_size, (s + 1) * args.batch_size)) for s in range(args.steps)]

    def make_batch(idx):
        return pad_batch([enc[i] for i in idx], setup.tokenizer.pad_token_id)

    return batches, make_batch


def _loop_ours(setup: Setup, args) -> Side:
    from alignbench.train import lm_loss, supervised_loop

    batches, make_batch = _lm_batches(setup, args)
    side = Side("train-loop", "alignbench", "alignbench.train.supervised_loop")
    model = _copy(setup)
    marks = []

    def timed_batch(idx):  # the clock starts when the loop asks for a batch ...
        marks.append(time.perf_counter())
        b = make_batch(idx)
        side.step_tokens.append(int(b["attention_mask"].sum()))
        return b

    def on_step(step, loss):  # ... and stops when its optimiser step is done
        _sync(setup.device)
        side.step_seconds.append(time.perf_counter() - marks[step])

    with PeakMemory(setup.device) as mem:
        t0 = time.perf_counter()
        res = supervised_loop(model, batches, timed_batch, lm_loss, args.lr, "bench: supervised_loop",
                              device=setup.device, on_step=on_step)
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = res.steps, res.tokens, mem.peak_mb
    side.extra["mean_loss"] = round(sum(res.losses) / len(res.losses), 4)
    return side


def _loop_plain(setup: Setup, args) -> Side:
    side = Side("train-loop", "torch", "plain torch loop (HF labels loss)")
    batches, make_batch = _lm_batches(setup, args)
    model, dev = _copy(setup).train(), setup.device
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
        losses = []
        for idx in batches:
            t = time.perf_counter()
            b = {k: v.to(dev) for k, v in make_batch(idx).items()}
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            side.step_seconds.append(time.perf_counter() - t)
            side.step_tokens.append(int(b["attention_mask"].sum()))
            losses.append(loss.item())
        side.wall_s = time.perf_counter() - t0
    side.steps, side.tokens, side.peak_mem_mb = len(batches), sum(side.step_tokens), mem.peak_mb
    side.extra["mean_loss"] = round(sum(losses) / len(losses), 4)
    return side


# each benchmark: (ours, peer), each a function (setup, args) -> Side
BENCHES: dict[str, tuple[Callable[[Setup, argparse.Namespace], Side], ...]] = {
    "dpo": (_dpo_ours, _dpo_trl), "generate": (_generate_ours, _generate_hf), "train-loop": (_loop_ours, _loop_plain)}


# --------------------------------------------------------------------------- output
COLUMNS = ("bench", "side", "impl", "steps", "tokens", "tokens_per_s", "step_ms", "wall_s", "peak_mem_mb")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | ours/peer |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        ratio = r.get("speedup_vs_peer")
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + f" | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="alignbench bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=WHAT + ("all",) + tuple(SOLO), help="which benchmark")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (batches) per side; the first is warm-up")
    ap.add_argument("--batch-size", "--batch-pairs", type=int, default=16,
                    help="pairs (dpo, pm), prompts (generate) or sequences (train-loop, ppo) per step")
    ap.add_argument("--seq-len", "--max-len", type=int, default=256, help="max tokens per sequence (prompt + response)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens sampled per prompt")
    ap.add_argument("--model", default=None,
                    help="smollm2, or a local save_pretrained causal-LM directory (default: tiny Llama)")
    ap.add_argument("--lora", action="store_true", help="dpo, pm, ppo: train LoRA adapters (model.peft=lora)")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    ap.add_argument("--grad-ckpt", action="store_true", help="dpo, pm, ppo: gradient checkpointing")
    ap.add_argument("--no-peer", action="store_true", help="dpo, generate, train-loop: run our side only")
    ap.add_argument("--data-path", default=None, help="pm, ppo: a local hh-rlhf directory (its test split)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared or small machine more threads than free cores "
                         "make small-op timings erratic; 0: torch's default)")
    ap.add_argument("--pairs", type=int, default=200, help="hh_synth dialogues for the tokenizer and the batches")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=352)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1, help="dpo: β")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isolate", action="store_true",
                    help="run each side in a fresh process (per-side peak memory; slower: re-imports per side)")
    ap.add_argument("--format", choices=("markdown", "json"), default="markdown")
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    for key in ("steps", "batch_size", "max_new_tokens", "pairs", "seq_len"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    if args.seq_len < 16:
        ap.error(f"--seq-len: must be >= 16, got {args.seq_len}")
    if args.beta <= 0:
        ap.error(f"--beta: must be > 0, got {args.beta}")
    args.model = resolve_model(args.model)
    maybe_fix_mmap_threshold(args.model is not None)  # a pretrained model fragments the heap
    return args


def _side_row(args: argparse.Namespace, what: str, k: int, setup: Optional[Setup] = None) -> dict:
    """Measure side k of a benchmark (in this process, or in a fresh one with --isolate)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = setup or build_setup(args)
    with contextlib.redirect_stdout(sys.stderr):  # trainers print; stdout is for the table
        row = (SOLO[what] if what in SOLO else BENCHES[what][k])(setup, args).row()
    row.update(model=setup.desc, device=str(setup.device), batch_size=args.batch_size, seq_len=args.seq_len,
               threads=torch.get_num_threads(), isolated=args.isolate)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    """Run the chosen benchmarks; one row per side, with the ours/peer tokens-per-second ratio.

    With ``isolate`` each side runs in its own fresh (spawned) process that rebuilds the same
    setup from the seed: its ru_maxrss is then that side's own peak, and no side inherits another's
    warm caches or allocator state. Without it all sides share one process (faster to run)."""
    import multiprocessing as mp

    setup = None if args.isolate else build_setup(args)
    rows = []
    for what in (WHAT if args.what == "all" else (args.what,)):
        log.info("bench %s (%s)", what, "one process per side" if args.isolate else setup.desc)
        sides = []
        # one side: no peer (pm, ppo), --no-peer, or dpo under --lora / --grad-ckpt (the TRL side has neither)
        solo = what in SOLO or args.lora or args.grad_ckpt or args.no_peer
        for k in range(1 if solo else len(BENCHES[what])):
            if args.isolate:
                with mp.get_context("spawn").Pool(1) as pool:
                    sides.append(pool.apply(_side_row, (args, what, k)))
            else:
                sides.append(_side_row(args, what, k, setup))
        if not solo:
            ours, peer = sides
            ours["speedup_vs_peer"] = round(ours["tokens_per_s"] / max(peer["tokens_per_s"], 1e-9), 3)
        rows += sides
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps(rows, indent=2) if args.format == "json" else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
