"""What every `alignbench bench` side shares: the model, the data and the batches drawn from it, how
tokens and padding are counted, peak memory, and model FLOPs utilisation.

Data (``--data``): ``hh_synth`` (generated in-process; the default) or ``hh_rlhf`` (``--data-path
DIR`` in the Hub layout ``<subset>/<split>.jsonl[.gz]``; every subset and split found there). The
pool is shuffled with ``--seed`` and scanned in that order; an item is kept only if it fits
``--max-len`` untruncated (dpo, pm: prompt+chosen and prompt+rejected; train-loop, ppo:
prompt+chosen; generate: prompt + ``--max-new-tokens``), so both sides see identical tokens whatever
truncation rule each would apply. The first batch_size × steps kept items make the batches, in
that order, for both sides (the peers get pre-tokenised rows and a sequential sampler). The share
of the scanned items that did not fit is reported as ``dropped_fraction`` (scanned: until enough
fit; it estimates the share of the whole pool).

Tokens (``tokens``, ``tokens_per_s``): real tokens only, one rule for both sides, counted from the
batches each side actually got: training benchmarks count every non-pad token of the step's
sequences (prompt and response; chosen and rejected both for dpo and pm); generate counts the tokens
sampled up to and including the first EOS (not the filler of rows that had already finished).

``padding_fraction``: over the batches both sides got, the share of the padded batches' token slots
that are padding, 1 − Σ real tokens / Σ (rows × longest row), each batch padded to its longest row
(dpo, pm: the 2·B chosen and rejected rows of a step in one batch; train-loop: the B sequences;
generate: the step's B prompts). It is a property of the data and the batch size: the share of the
work a padded implementation wastes, whatever either side does about it.

``batch_sha``: a digest of the token ids of every step's rows in order, from what each side's step
received (for the peers, what their data collator produced, padding stripped); equal digests prove
that both sides trained (or sampled) on the same batches.

``mfu`` (CUDA only): model FLOPs utilisation, k·N·tokens/s over the device's peak dense bf16 FLOP/s
(``PEAK_BF16_FLOPS``), k = 6 for a training step and 2 for generation, N every parameter (a tied
embedding once). Null on CPU, or on a GPU missing from the table (``mfu_note`` says which).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from alignbench import formats
from alignbench.config import ModelConfig
from alignbench.data.hh import HUB_SPLITS, SUBSETS, load_hh_rlhf
from alignbench.data.synth import SynthConfig, generate_hh_synth
from alignbench.models import count_params, ensure_pad_token, load_lm, load_tokenizer, pick_device, tiny_lm, \
    train_tokenizer
from alignbench.encoding import Encoded, encode, encode_pair

UNTRUNCATED = 10**9  # a max_len no sequence reaches: encode whole, then test the fit


class BenchError(Exception):
    """Bad input to ``alignbench bench``: reported as one line, exit code 2, before anything is built."""


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision(device: torch.device, requested: Optional[str] = None) -> str:
    """Both sides' precision: ``--precision`` when given, else bf16 mixed precision on CUDA and
    fp32 on CPU."""
    return requested or ("bf16" if device.type == "cuda" else "fp32")


@dataclass
class Side:
    """One implementation's measurement."""
    bench: str
    side: str  # "alignbench" or the peer
    impl: str
    steps: int = 0
    tokens: int = 0  # real tokens processed (trained on, or sampled)
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    batches: list[list[list[int]]] = field(default_factory=list)  # each step's rows (token ids, no padding)
    wall_s: float = 0.0  # everything, setup and the first step included
    peak_mem_mb: float = 0.0
    extra: dict = field(default_factory=dict)

    def add_step(self, seconds: float, rows: Sequence[Sequence[int]], tokens: Optional[int] = None) -> None:
        """One timed step on ``rows``; its tokens are the rows' real tokens unless given (generate)."""
        self.step_seconds.append(seconds)
        self.batches.append([list(r) for r in rows])
        self.step_tokens.append(real_tokens(rows) if tokens is None else tokens)

    def finish(self, wall_s: float, peak_mb: float, losses: Optional[Sequence[float]] = None) -> "Side":
        """Close the measurement: totals, wall time, peak memory and the mean of the step losses (if any)."""
        self.steps, self.tokens = len(self.step_seconds), sum(self.step_tokens)
        self.wall_s, self.peak_mem_mb = wall_s, peak_mb
        if losses:
            self.extra["mean_loss"] = round(sum(losses) / len(losses), 4)
        return self

    def tokens_per_s(self) -> float:
        """Over the steps after the first (which pays for lazy initialisation), or the one step."""
        steady_s, steady_tok = sum(self.step_seconds[1:]), sum(self.step_tokens[1:])
        if not steady_s:
            steady_s, steady_tok = sum(self.step_seconds), sum(self.step_tokens)
        return steady_tok / max(steady_s, 1e-9)

    def row(self) -> dict:
        timed = self.step_seconds[1:] or self.step_seconds
        return {"bench": self.bench, "side": self.side, "impl": self.impl, "steps": self.steps,
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s(), 1),
                "step_ms": round(1000 * sum(timed) / max(1, len(timed)), 2),
                "wall_s": round(self.wall_s, 3), "peak_mem_mb": round(self.peak_mem_mb, 1),
                "process_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "batch_sha": batch_digest(self.batches), **self.extra}


# --------------------------------------------------------------------------- counting
def real_tokens(rows: Sequence[Sequence[int]]) -> int:
    """Non-pad tokens of a batch given as its rows without padding."""
    return sum(len(r) for r in rows)


def sampled_tokens(rows: Sequence[Sequence[int]], eos: int, pad: Optional[int] = None) -> int:
    """Tokens sampled per row up to and including the first EOS (end of turn); what follows is filler.
    ``pad``: a row that generate() ended at a stop string is filled with pad after it; that trailing
    run is filler too."""
    def n(r):
        r = list(r)
        k = r.index(eos) + 1 if eos in r else len(r)
        while pad is not None and pad != eos and k > 0 and r[k - 1] == pad:
            k -= 1
        return k
    return sum(n(r) for r in rows)


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """1 − Σ real / Σ (rows × longest row) over batches given as their rows' lengths."""
    slots = sum(len(lengths) * max(lengths) for lengths in batches if lengths)
    return 1.0 - sum(map(sum, batches)) / slots if slots else 0.0


def batch_digest(batches: Sequence[Sequence[Sequence[int]]]) -> str:
    """Short sha256 of every step's rows in order (equal digests: the same batches)."""
    return hashlib.sha256(json.dumps([[list(r) for r in b] for b in batches]).encode()).hexdigest()[:16]


# peak dense bf16 tensor FLOP/s (no sparsity) by a pattern of torch.cuda.get_device_name(), first match wins
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"B200", 2.25e15), (r"H200", 989e12), (r"H100.*PCIe", 756e12), (r"H100|H800", 989e12),
    (r"A100|A800", 312e12), (r"L40S", 362e12), (r"L40\b", 181e12), (r"L4\b", 121e12), (r"A10\b", 125e12),
    (r"RTX 6000 Ada", 364e12), (r"A6000", 155e12))


def peak_bf16_flops(device_name: str) -> Optional[float]:
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str) -> Optional[float]:
    """flops_per_token · tokens/s / the device's peak bf16 FLOP/s (k·N per token: 6N train, 2N generate)."""
    peak = peak_bf16_flops(device_name)
    return None if peak is None else flops_per_token * tokens_per_s / peak


def matmul_flops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """FLOP/s of one ``[m, k] @ [k, n]`` matmul (``shape`` = (m, k, n)) in ``dtype`` on ``device``:
    2·m·k·n / the fastest of ``reps`` timed calls after one warm-up, at torch's current thread count.
    The fastest, not the mean: on a shared machine the slow calls measure the neighbours."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults of the operands
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / max(best, 1e-9)


def decode_matmul_shape(config, batch_size: int) -> tuple[int, int, int]:
    """(m, k, n) of a decode step's MLP up-projection: one token per row of the batch times
    [hidden, intermediate] of the model ``config`` (576 × 1536 for SmolLM2-135M), the matmul shape
    that carries most of a decode step's FLOPs (GPT-2 style configs: n_embd, n_inner or 4·n_embd)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return batch_size, int(hidden), int(inter)


def arithmetic_bound(shape: tuple[int, int, int], device: torch.device, reps: int = 10) -> dict:
    """The machine's measured matmul FLOP/s at ``shape``, fp32 and bf16, and the bound: the faster
    of the two (bf16 where the CPU has native bf16 FMAs, avx512_bf16/AMX, or on a GPU; fp32 on an
    AVX2-only CPU, where bf16 matmuls are emulated and far slower). The bound fractions are
    ``k·N · tokens/s / bound`` (k = 2 generate, 6 a training step)."""
    fp32 = matmul_flops(shape, torch.float32, device, reps) / 1e9
    bf16 = matmul_flops(shape, torch.bfloat16, device, reps) / 1e9
    return {"matmul_shape": list(shape), "matmul_gflops_fp32": round(fp32, 2), "matmul_gflops_bf16": round(bf16, 2),
            "bound_gflops": round(max(fp32, bf16), 2), "bound_dtype": "bf16" if bf16 >= fp32 else "fp32"}


# --------------------------------------------------------------------------- data
def hh_files(path: str) -> list[tuple[str, str]]:
    """(subset, split) of every HH file under ``path`` (Hub layout ``<subset>/<split>.jsonl[.gz]``)."""
    found = []
    for f in sorted(Path(path).glob("*/*.jsonl*")):
        split = f.name.split(".jsonl")[0]
        if f.parent.name in SUBSETS and split in HUB_SPLITS:
            found.append((f.parent.name, split))
    return found


def load_pool(args) -> list:
    """Every comparison of the chosen data: the HH files under --data-path, or hh_synth dialogues."""
    if args.data == "hh_rlhf":
        pool = []
        for subset, split in hh_files(args.data_path):
            pool += load_hh_rlhf(args.data_path, [subset], [split], "skip")[0]
        return pool
    return generate_hh_synth(SynthConfig(n_pairs=max(args.pairs, 4 * args.batch_size * args.steps), seed=args.seed))


@dataclass
class Selection:
    """The items of one benchmark's batches (in order) and how many scanned items did not fit."""
    items: list
    scanned: int
    dropped: int

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(1, self.scanned)


def select(pool: Sequence, fit: Callable[[object], object], need: int, seed: int, what: str) -> Selection:
    """Scan the pool in a seeded random order, keep ``fit(item)`` where it is not None, until ``need``."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    kept, scanned = [], 0
    for i in order:
        if len(kept) == need:
            break
        scanned += 1
        item = fit(pool[i])
        if item is not None:
            kept.append(item)
    if len(kept) < need:
        raise BenchError(f"--max-len: only {len(kept)} of {len(pool)} {what} fit untruncated, {need} needed "
                         "(raise --max-len, lower --batch-size/--steps, or give more data)")
    return Selection(kept, scanned, scanned - len(kept))


@dataclass
class PairWork:
    """A comparison and its two encodings on one shared prompt (``alignbench.encoding.encode_pair``)."""
    pair: object
    chosen: Encoded
    rejected: Encoded


def pair_fit(tok, max_len: int, fmt: str = "raw") -> Callable:
    def fit(p):
        c, r = encode_pair(tok, p.prompt, p.chosen, p.rejected, UNTRUNCATED, fmt=fmt)
        return PairWork(p, c, r) if max(len(c.input_ids), len(r.input_ids)) <= max_len else None
    return fit


def sequence_fit(tok, max_len: int, fmt: str = "raw") -> Callable:
    """prompt + chosen as one sequence (response_start marks the chosen response)."""
    def fit(p):
        e = encode(tok, p.prompt, p.chosen, UNTRUNCATED, fmt=fmt)
        return e if len(e.input_ids) <= max_len else None
    return fit


def prompt_fit(tok, max_len: int, max_new_tokens: int, fmt: str = "raw") -> Callable:
    """(prompt, its ids as the sampler renders them) when prompt + max_new_tokens fits."""
    def fit(p):
        ids = formats.prompt_ids(tok, p.prompt, fmt)
        return (p.prompt, ids) if len(ids) + max_new_tokens <= max_len else None
    return fit


# --------------------------------------------------------------------------- setup
@dataclass
class Setup:
    model: Optional[torch.nn.Module]  # the initial weights (every side works on a deep copy); None: pm --model
    tokenizer: object
    pool: list  # the comparisons batches are drawn from
    device: torch.device
    seq_len: int
    desc: str
    n_params: int
    # data.format the model is used in: chat when its tokenizer has a chat template (SmolLM2-Instruct, as in
    # experiment=hh_smollm2), raw otherwise; a response then ends at the end-of-turn token, or EOS / "\n\nHuman:"
    fmt: str = "raw"
    work: dict = field(default_factory=dict)  # benchmark kind -> Selection, drawn once, shared by both sides
    precision: str = "fp32"  # fp32 | bf16 (torch.autocast, fp32 weights), every side's forwards and backwards


def build_setup(args) -> Setup:
    """The shared model, tokenizer and data of one bench run."""
    device = pick_device(args.device)
    pool = load_pool(args)
    if args.model:
        tok = ensure_pad_token(load_tokenizer(args.model))
        # bench pm builds its PM from the directory: no LM copy held beside it
        model = load_lm(args.model) if args.what != "pm" else None
        if model is not None:
            model.config.pad_token_id = tok.pad_token_id
        desc = f"{args.model}"
    else:
        corpus = [p.prompt + p.chosen for p in pool[: args.pairs]] + [p.prompt + p.rejected for p in pool[: args.pairs]]
        tok = train_tokenizer(corpus, args.vocab_size)
        mc = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         num_heads=args.num_heads, intermediate_size=args.intermediate_size, max_seq_len=args.seq_len)
        model = tiny_lm(mc, tok, args.seed)
        desc = (f"tiny Llama (vocab {len(tok)}, hidden {args.hidden_size}, {args.num_layers} layers, "
                f"{count_params(model) / 1e6:.2f}M params)")
    tok.padding_side = "right"
    n_params = count_params(model) if model is not None else 0
    return Setup(model=model.to(device) if model is not None else None, tokenizer=tok, pool=pool, device=device,
                 seq_len=args.seq_len, desc=desc, n_params=n_params, fmt="chat" if tok.chat_template else "raw",
                 precision=precision(device, getattr(args, "precision", None)))


def work(setup: Setup, args, kind: str) -> Selection:
    """The batches' items of one kind (pairs | sequences | prompts), drawn once and shared by both sides."""
    if kind not in setup.work:
        tok, n = setup.tokenizer, args.batch_size * args.steps
        fmt = setup.fmt
        fit = {"pairs": lambda: pair_fit(tok, setup.seq_len, fmt),
               "sequences": lambda: sequence_fit(tok, setup.seq_len, fmt),
               "prompts": lambda: prompt_fit(tok, setup.seq_len, args.max_new_tokens, fmt)}[kind]()
        setup.work[kind] = select(setup.pool, fit, need=n, seed=args.seed, what=f"{args.data} {kind}")
    return setup.work[kind]


def steps(items: list, batch_size: int) -> list[list]:
    """Consecutive batches of ``batch_size`` items."""
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]


def copy_model(setup: Setup) -> torch.nn.Module:
    """A fresh copy of the initial weights: every side starts from the same ones."""
    return copy.deepcopy(setup.model).to(setup.device)


def model_dir(setup: Setup, tmp: str) -> str:
    """A save_pretrained directory of the setup's LM (a PM is built from one, as in the stage)."""
    setup.model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def lm_sequences(setup: Setup, args) -> list[Encoded]:
    """train-loop's sequences: prompt + chosen, every token trained on (response_start 0), as in a plain loop."""
    return [Encoded(e.input_ids, 0) for e in work(setup, args, "sequences").items]
