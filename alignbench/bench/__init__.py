"""`alignbench bench <what>`: our training/generation code against its peer, side by side in one run.

    dpo         one DPO optimiser step of methods/dpo.py vs TRL's DPOTrainer (both with precomputed
                reference log-probs, no gradient checkpointing)
    pm          one PM training step of the PM stage (stages/preference.py pm_loss) vs TRL's
                RewardTrainer
    generate    alignbench.sampling.sample vs HF ``model.generate(do_sample=True)`` (same prompts,
                batch, max_new_tokens, plain multinomial sampling: top_k=0, top_p=1)
    train-loop  alignbench.train.supervised_loop vs a plain PyTorch loop (same LM batches, AdamW)
    all         the four above
    measure     the forwards of one measured point (two PMs, the policy and π0 over the same
                samples) with one pass over their shared frozen trunk vs four separate forwards
                (``alignbench.bench.measure_point``; --trainable-layers K, default 2)
    ppo         PPO update steps on their own (no peer): see alignbench.bench.memory

How the peers are configured: ``alignbench.bench.peers``. What the batches are, how real tokens,
``padding_fraction``, ``batch_sha`` and ``mfu`` are defined: ``alignbench.bench.core``. Both sides
train on the same weights, batches (``--data hh_synth`` or ``hh_rlhf --data-path DIR``: seeded
random items that fit ``--max-len`` untruncated), batch size, max length, steps, learning rate and
precision: ``--precision fp32|bf16`` (default fp32 on CPU, bf16 mixed precision on CUDA); bf16 is
torch.autocast with fp32 weights on both sides (TRL: ``bf16=True``), and every row says which in
``precision``. On a CPU without native bf16 (``alignbench.precision.native_bf16``) bf16 still runs,
emulated, and its rows carry ``precision_note`` saying so.

Why: the framework replaces TRL's trainers and HF's ``generate`` with its own short loops (one code
path for every method, seeded sampling, cost accounting); this shows what that costs or saves.

The model is a tiny Llama built in-process (byte-level BPE trained on the data's first dialogues,
random weights: throughput does not depend on what was learnt), ``--model smollm2`` or ``--model
DIR`` (a local ``save_pretrained`` directory, safetensors only, no remote code). Each side starts
from a copy of the same weights. Reported per side: tokens/s over the steps after the first (the
first pays for lazy initialisation; it is in ``wall_s``), total wall time, and peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (reset per side); on CPU the peak resident set size sampled
every 2 ms during the side minus the RSS when it started (``resource.getrusage``'s ru_maxrss is a
process-lifetime high-water mark and cannot be reset between sides; it is reported as
``process_maxrss_mb``; ``--isolate`` runs each side in a fresh process).

Output (default ``--format jsonl``): per benchmark one JSON line per side, then one summary line
``{"bench", "ours_tok_s", "peer_tok_s", "ratio" (ours/peer), "ours_peak_mb", "peer_peak_mb",
"padding_fraction", ...}``; ``--format markdown`` prints a table; ``--out FILE`` writes the JSON lines.

The arithmetic bound (every summary line): the machine's matmul FLOP/s measured at the bench's
thread count on a decode step's MLP shape (batch × hidden × intermediate, the fastest of 10 calls),
fp32 and bf16 (``matmul_gflops_fp32``/``_bf16``); ``bound_gflops`` is the faster (bf16 on a CPU
with native bf16 FMAs or a GPU, fp32 on an AVX2-only CPU, where bf16 is emulated), and
``ours_bound_fraction``/``peer_bound_fraction`` = k·N · tokens/s / ``bound_gflops`` (k = 2
generate, 6 a training step): how much of the machine's arithmetic each side turns into model FLOPs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import sys
import time
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from transformers import AutoConfig

from alignbench import packing
from alignbench.bench.core import (BenchError, PeakMemory, Setup, Side, arithmetic_bound, build_setup, copy_model,
                                   decode_matmul_shape, hh_files, lm_sequences, mfu, padding_fraction, steps,
                                   sync, work)
from alignbench.bench.measure_point import measure_apart, measure_ours
from alignbench.bench.memory import check_model, freeze_top, pm_ours, ppo_ours, prepare, resolve_model, variant
from alignbench.bench.peers import dpo_trl, generate_hf, loop_plain, pm_trl
from alignbench.memory import maybe_fix_mmap_threshold
from alignbench.models import pick_device
from alignbench.precision import native_bf16
from alignbench.sampling import sample
from alignbench.encoding import pad_batch
from alignbench.train import autocast, lm_loss, make_optimizer, supervised_loop
from alignbench_methods.dpo import EncodedPair, dpo_step, reference_logps

log = logging.getLogger(__name__)
WHAT = ("dpo", "pm", "generate", "train-loop")
DATA = ("hh_synth", "hh_rlhf")


# --------------------------------------------------------------------------- our sides
def dpo_ours(setup: Setup, args) -> Side:
    side = Side("dpo", "alignbench", variant("methods/dpo.py dpo_step", args))
    dev, pad = setup.device, setup.tokenizer.pad_token_id
    encoded = [EncodedPair(w.chosen, w.rejected) for w in work(setup, args, "pairs").items]
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        policy = prepare(copy_model(setup), args).train()
        t_ref = time.perf_counter()
        # the reference is π0 = these very weights before the first step, so the policy serves as it
        with autocast(setup.precision, dev):
            ref = reference_logps(policy, encoded, pad_id=pad, device=dev, batch_size=args.batch_size,
                                  desc="bench: our reference pass")
        sync(dev)
        side.extra["ref_precompute_s"] = round(time.perf_counter() - t_ref, 3)
        policy.train()
        opt, sched = make_optimizer(policy, args.lr, total_steps=args.steps)
        losses = []
        for s in range(args.steps):
            idx = list(range(s * args.batch_size, (s + 1) * args.batch_size))
            t = time.perf_counter()
            with autocast(setup.precision, dev):
                out, _ = dpo_step(policy, opt, sched, encoded=encoded, ref=ref, idx=idx, pad_id=pad, device=dev,
                                  beta=args.beta, loss_type="sigmoid")
            sync(dev)
            # the rows of dpo's pair_batch: chosen first, then rejected
            side.add_step(time.perf_counter() - t, [encoded[i].chosen.input_ids for i in idx]
                          + [encoded[i].rejected.input_ids for i in idx])
            losses.append(out.loss.item())
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb, losses)


def generate_ours(setup: Setup, args) -> Side:
    side = Side("generate", "alignbench", "alignbench.sampling.sample")
    model, dev = copy_model(setup).eval(), setup.device
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        for s, chunk in enumerate(steps(work(setup, args, "prompts").items, args.batch_size)):
            t = time.perf_counter()
            with autocast(setup.precision, dev):
                out = sample(model, setup.tokenizer, [p for p, _ in chunk], max_new_tokens=args.max_new_tokens,
                             temperature=1.0, seed=args.seed + s, batch_size=args.batch_size, max_len=setup.seq_len,
                             fmt=setup.fmt)
            sync(dev)
            # n_tokens: every token sampled (an end token and a cut stop string included), no filler
            side.add_step(time.perf_counter() - t, out.prompt_ids, tokens=out.n_tokens)
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb)


def loop_ours(setup: Setup, args) -> Side:
    impl = "alignbench.train.supervised_loop"
    side = Side("train-loop", "alignbench", impl if args.trainable_layers is None else variant(impl, args))
    # --trainable-layers only: the loop's other variants (LoRA, checkpointing) are the stages' business
    seqs, model, marks = lm_sequences(setup, args), freeze_top(copy_model(setup), args), []
    batches = steps(list(range(len(seqs))), args.batch_size)

    def timed_batch(idx):  # the clock starts when the loop asks for a batch ...
        marks.append((time.perf_counter(), [seqs[i].input_ids for i in idx]))
        return pad_batch([seqs[i] for i in idx], setup.tokenizer.pad_token_id)

    def on_step(step, loss):  # ... and stops when its optimiser step is done
        sync(setup.device)
        side.add_step(time.perf_counter() - marks[step][0], marks[step][1])

    with PeakMemory(setup.device) as mem:
        t0 = time.perf_counter()
        res = supervised_loop(model, batches, make_batch=timed_batch, loss_fn=lm_loss, lr=args.lr,
                              desc="bench: supervised_loop", device=setup.device, on_step=on_step,
                              precision=setup.precision)
        wall = time.perf_counter() - t0
    return side.finish(wall, mem.peak_mb, res.losses)


# each benchmark: (ours, peer), each a function (setup, args) -> Side; SOLO: ours only
BENCHES: dict[str, tuple[Callable[[Setup, argparse.Namespace], Side], ...]] = {
    "dpo": (dpo_ours, dpo_trl), "pm": (pm_ours, pm_trl), "generate": (generate_ours, generate_hf),
    "train-loop": (loop_ours, loop_plain), "measure": (measure_ours, measure_apart)}
SOLO = {"ppo": ppo_ours}
KIND = {"dpo": "pairs", "pm": "pairs", "generate": "prompts", "train-loop": "sequences", "ppo": "sequences",
        "measure": "sequences"}
# per token: 2N forward only; 6N a training step (forward + backward); measure: four forwards' 2N each
FLOPS_PER_PARAM = {"generate": 2, "measure": 8}


# --------------------------------------------------------------------------- output
COLUMNS = ("bench", "side", "impl", "steps", "tokens", "tokens_per_s", "step_ms", "wall_s", "peak_mem_mb")


def markdown(rows: list[dict]) -> str:
    """The side rows as a table, each benchmark's ours/peer ratio on our row."""
    ratios = {r["bench"]: r.get("ratio") for r in rows if "side" not in r}
    lines = ["| " + " | ".join(COLUMNS) + " | ours/peer |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        if "side" not in r:
            continue
        ratio = ratios.get(r["bench"]) if r["side"] == "alignbench" else None
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + f" | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def bound_fraction(side: dict, what: str, bound_gflops: Optional[float]) -> Optional[float]:
    """k·N · tokens/s / the measured matmul bound (``bench.core.arithmetic_bound``; k = 2 generate,
    6 a training step): the share of the machine's arithmetic the side turns into model FLOPs."""
    if not bound_gflops:
        return None
    return round(FLOPS_PER_PARAM.get(what, 6) * side["n_params"] * side["tokens_per_s"] / (bound_gflops * 1e9), 4)


def summary(what: str, sides: list[dict], bound: Optional[dict] = None) -> dict:
    """The benchmark's one summary line from its side rows (peer fields null without a peer);
    ``bound``: the machine's measured matmul FLOP/s (``bench.core.arithmetic_bound``), for the bound fractions."""
    ours, peer = sides[0], (sides[1] if len(sides) > 1 else None)
    get = (lambda k: None) if peer is None else peer.get  # noqa: E731
    ratio = None if peer is None else round(ours["tokens_per_s"] / max(peer["tokens_per_s"], 1e-9), 3)
    out = {"bench": what, "ours_tok_s": ours["tokens_per_s"], "peer_tok_s": get("tokens_per_s"), "ratio": ratio,
           "ours_peak_mb": ours["peak_mem_mb"], "peer_peak_mb": get("peak_mem_mb"),
           "padding_fraction": ours["padding_fraction"], "peer": get("impl"),
           "same_batches": None if peer is None else ours["batch_sha"] == peer["batch_sha"],
           "ours_mfu": ours["mfu"], "peer_mfu": get("mfu")}
    if bound is not None:
        out.update(bound, ours_bound_fraction=bound_fraction(ours, what, bound["bound_gflops"]),
                   peer_bound_fraction=None if peer is None else bound_fraction(peer, what, bound["bound_gflops"]))
    for key in ("mfu_note", "data", "dropped_fraction", "model", "device", "precision", "precision_note", "batch_size",
                "seq_len", "steps"):
        out[key] = ours.get(key)
    return out


# --------------------------------------------------------------------------- command line
def _error(msg: str):
    """A one-line error, exit code 2, no traceback."""
    print(f"alignbench bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="alignbench bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=WHAT + ("all", "measure") + tuple(SOLO), help="which benchmark")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (batches) per side; the first is warm-up")
    ap.add_argument("--batch-size", "--batch-pairs", type=int, default=16,
                    help="pairs (dpo, pm), prompts (generate) or sequences (train-loop, ppo) per step")
    ap.add_argument("--seq-len", "--max-len", type=int, default=256,
                    help="max tokens per sequence (prompt + response); longer items are skipped, never truncated")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens sampled per prompt")
    ap.add_argument("--model", default=None,
                    help="smollm2, or a local save_pretrained causal-LM directory (default: tiny Llama)")
    ap.add_argument("--data", choices=DATA, default=None,
                    help="hh_synth (generated) or hh_rlhf (needs --data-path); default hh_rlhf with --data-path")
    ap.add_argument("--data-path", default=None, help="a local hh-rlhf directory (<subset>/<split>.jsonl.gz)")
    ap.add_argument("--lora", action="store_true", help="dpo, pm, ppo: train LoRA adapters (model.peft=lora)")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    ap.add_argument("--trainable-layers", type=int, default=None, metavar="K",
                    help="dpo, pm, ppo, train-loop: train only the top K blocks, the final norm and the head "
                         "(model.trainable_layers)")
    ap.add_argument("--grad-ckpt", action="store_true", help="dpo, pm, ppo: gradient checkpointing")
    ap.add_argument("--no-peer", action="store_true", help="run our side only")
    ap.add_argument("--no-packing", action="store_true",
                    help="our training sides on right-padded batches (train.packing=false): packing's before/after")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="both sides' precision: fp32, or bf16 autocast with fp32 weights (default: fp32 on CPU, "
                         "bf16 on CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared or small machine more threads than free cores "
                         "make small-op timings erratic; 0: torch's default)")
    ap.add_argument("--pairs", type=int, default=200, help="hh_synth dialogues (and the tiny model's tokenizer corpus)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", type=int, default=352)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1, help="dpo: β")
    ap.add_argument("--seed", type=int, default=0, help="the model's init and which items make the batches")
    ap.add_argument("--isolate", action="store_true",
                    help="run each side in a fresh process (per-side peak memory; slower: re-imports per side)")
    ap.add_argument("--format", choices=("jsonl", "markdown"), default="jsonl")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = ap.parse_args(argv)
    for key in ("steps", "batch_size", "max_new_tokens", "pairs", "seq_len"):
        if getattr(args, key) < 1:
            _error(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(args, key)}")
    if args.seq_len < 16:
        _error(f"--seq-len: must be >= 16, got {args.seq_len}")
    if args.beta <= 0:
        _error(f"--beta: must be > 0, got {args.beta}")
    if args.trainable_layers is not None and args.trainable_layers < 0:
        _error(f"--trainable-layers: must be >= 0, got {args.trainable_layers}")
    if args.trainable_layers is not None and args.lora:
        _error("--trainable-layers: cannot be combined with --lora (LoRA already freezes the base weights)")
    if args.trainable_layers is not None and args.model is None and args.trainable_layers > args.num_layers:
        _error(f"--trainable-layers: must be between 0 and the model's {args.num_layers} layers (--num-layers), "
               f"got {args.trainable_layers}")
    args.data = args.data or ("hh_rlhf" if args.data_path else "hh_synth")
    try:
        check_model(args.model)
        if args.data == "hh_rlhf" and not args.data_path:
            raise BenchError("--data hh_rlhf: needs --data-path DIR (a local hh-rlhf directory)")
        if args.data == "hh_synth" and args.data_path:
            raise BenchError(f"--data-path {args.data_path}: given with --data hh_synth (use --data hh_rlhf)")
        if args.data_path and not hh_files(args.data_path):
            raise BenchError(f"--data-path {args.data_path}: no HH files there (expected <subset>/<split>.jsonl[.gz], "
                             "e.g. helpful-base/test.jsonl.gz)")
    except BenchError as e:
        _error(str(e))
    args.model = resolve_model(args.model)
    maybe_fix_mmap_threshold(args.model is not None)  # a pretrained model fragments the heap
    return args


def _side_row(args: argparse.Namespace, what: str, k: int, setup: Optional[Setup] = None) -> dict:
    """Measure side k of a benchmark (in this process, or in a fresh one with --isolate)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = setup or build_setup(args)
    # trainers print: stdout is for the results
    with contextlib.redirect_stdout(sys.stderr), packing.use(not args.no_packing):
        side = (SOLO[what] if what in SOLO else BENCHES[what][k])(setup, args)
    row = side.row()
    row.setdefault("n_params", setup.n_params)  # pm sides count the PM they built
    sel = work(setup, args, KIND[what])
    flops = FLOPS_PER_PARAM.get(what, 6) * row["n_params"]
    name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else ""
    value = mfu(flops, side.tokens_per_s(), name) if name else None
    row.update(padding_fraction=round(padding_fraction([[len(r) for r in b] for b in side.batches]), 4),
               mfu=None if value is None else round(value, 4), data=args.data,
               dropped_fraction=round(sel.dropped_fraction, 4), model=setup.desc, device=str(setup.device),
               batch_size=args.batch_size, seq_len=args.seq_len, threads=torch.get_num_threads(),
               precision=setup.precision,
               packing=not args.no_packing and (row["side"] == "alignbench" or what == "measure") and what != "generate",
               isolated=args.isolate)
    if setup.precision == "bf16" and not native_bf16(setup.device):
        row["precision_note"] = f"bf16 emulated: {setup.device.type} has no native bf16 (slower than native)"
    if value is None:
        row["mfu_note"] = f"no peak bf16 FLOP/s known for {name!r}" if name else "mfu is measured on CUDA only"
    return row


def measure_bound(args: argparse.Namespace, setup: Optional[Setup]) -> dict:
    """The arithmetic bound of this machine at the bench's thread count: fp32 and bf16 FLOP/s of a
    decode step's MLP matmul at the bench's batch size (``bench.core.decode_matmul_shape``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if setup is not None and setup.model is not None:
        config = setup.model.config
    elif args.model:  # --isolate (no setup in this process) or pm --model: the config alone gives the shape
        config = AutoConfig.from_pretrained(args.model)
    else:  # the tiny Llama of the size flags
        config = SimpleNamespace(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    device = setup.device if setup is not None else pick_device(args.device)
    return arithmetic_bound(decode_matmul_shape(config, args.batch_size), device)


def run(args: argparse.Namespace, emit: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Run the chosen benchmarks: per benchmark its side rows, then its summary line (each also
    passed to ``emit`` as soon as it is measured: a long run shows its results as it goes).

    With ``isolate`` each side runs in its own fresh (spawned) process that rebuilds the same
    setup from the seed: its ru_maxrss is then that side's own peak, and no side inherits another's
    warm caches or allocator state. Without it all sides share one process (faster to run)."""
    setup = None if args.isolate else build_setup(args)
    lines = []
    for what in (WHAT if args.what == "all" else (args.what,)):
        log.info("bench %s (%s)", what, "one process per side" if args.isolate else setup.desc)
        # one side: no peer (ppo), --no-peer, or --lora / --trainable-layers / --grad-ckpt (the peers have none)
        # (measure's peer, separate forwards, runs under --trainable-layers: that is what it compares)
        solo = what in SOLO or args.no_peer or (what != "measure" and (
            args.lora or args.trainable_layers is not None or args.grad_ckpt))
        sides = []
        for k in range(1 if solo else 2):
            if args.isolate:
                with mp.get_context("spawn").Pool(1) as pool:
                    sides.append(pool.apply(_side_row, (args, what, k)))
            else:
                sides.append(_side_row(args, what, k, setup))
        ours = sides[0]
        bound = measure_bound(args, setup)
        print(f"alignbench bench {what}: {args.data} batches: kept {args.batch_size * args.steps} items, "
              f"{100 * ours['dropped_fraction']:.1f}% of those scanned dropped (longer than --max-len "
              f"{args.seq_len} untruncated); padding {100 * ours['padding_fraction']:.1f}% of padded slots",
              file=sys.stderr)
        for line in sides + [summary(what, sides, bound)]:
            lines.append(line)
            if emit:
                emit(line)
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    jsonl = args.format == "jsonl"
    try:
        lines = run(args, emit=(lambda line: print(json.dumps(line), flush=True)) if jsonl else None)
    except BenchError as e:
        _error(str(e))
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
    if not jsonl:
        print(markdown(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
