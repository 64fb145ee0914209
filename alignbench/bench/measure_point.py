"""`alignbench bench measure`: the forwards of one measured point, with the shared trunk against
separate forwards (``alignbench.shared_trunk``).

A point reads every held-out sample with four models: the proxy PM and the judge PM (a score at the
last token) and the policy and π0 (the response log-probs of KL). Under ``model.trainable_layers=K``
all four hold the bottom blocks of the same base bitwise, as the stages and methods train them:
here π0 is the model, the policy is its copy with the top K blocks moved (seeded noise: what a few
steps of training do to them), and each PM is ``models.pm_from_lm`` of the model with its top K
blocks moved and a fresh scalar head. Each step is one batch of ``--batch-size`` real sequences
(prompt + chosen response, as ``train-loop``), read by the four in the order ``RunContext.measure``
reads them (``stages.preference.pm_scores``, then ``train.response_logprobs``, policy then π0).

    ours  ``shared_trunk.sharing``: one pass over the shared bottom blocks per batch
    peer  four separate forwards (what every consumer does on its own: ``shared_trunk.disabled``)

Tokens are the batch's real tokens (each read by all four models); ``outputs_sha`` digests the
scores and log-probs, so the two rows show that both sides computed bitwise the same numbers.
"""
from __future__ import annotations

import hashlib
import tempfile
import time

import torch

from alignbench import freeze, shared_trunk
from alignbench.bench.core import PeakMemory, Setup, Side, copy_model, model_dir, steps, sync, work
from alignbench.encoding import Encoded, pad_batch
from alignbench.models import pm_from_lm
from alignbench.stages.preference import pm_scores
from alignbench.train import autocast, response_logprobs

DEFAULT_K = 2  # the CPU study's model.trainable_layers when --trainable-layers is not given


def _moved(model: torch.nn.Module, k: int, seed: int) -> torch.nn.Module:
    """``model`` frozen below its top ``k`` blocks, those blocks moved by seeded noise (1e-2 of
    each weight's scale), in eval mode: a trained policy's or PM's shape of difference from π0."""
    freeze.freeze_below(model, k)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        blocks = freeze.decoder_layers(model)[2]
        for block in blocks[len(blocks) - k:]:
            for p in block.parameters():
                p.add_(1e-2 * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model.eval().requires_grad_(False)


def _models(setup: Setup, args, tmp: str) -> dict:
    k = DEFAULT_K if args.trainable_layers is None else args.trainable_layers
    path = args.model or model_dir(setup, tmp)
    dev = setup.device
    return {"proxy_pm": _moved(pm_from_lm(path, setup.tokenizer, args.seed).to(dev), k, args.seed + 1),
            "judge_pm": _moved(pm_from_lm(path, setup.tokenizer, args.seed + 10).to(dev), k, args.seed + 2),
            "policy": _moved(copy_model(setup), k, args.seed + 3),
            "pi0": copy_model(setup).eval().requires_grad_(False)}


def _side(setup: Setup, args, shared: bool) -> Side:
    name = "shared_trunk.sharing (one trunk pass)" if shared else "separate forwards"
    side = Side("measure", "alignbench" if shared else "separate", name)
    pad, dev = setup.tokenizer.pad_token_id, setup.device
    seqs: list[Encoded] = work(setup, args, "sequences").items
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        models = _models(setup, args, tmp)
        side.extra["shared_blocks"] = shared_trunk.shared_depth(list(models.values()))
        for chunk in steps(seqs, args.batch_size):
            batch = pad_batch(chunk, pad, dev)
            t = time.perf_counter()
            block = shared_trunk.sharing(models.values()) if shared else shared_trunk.disabled()
            with torch.no_grad(), autocast(setup.precision, dev), block:
                outs = [pm_scores(models[m], batch["input_ids"], batch["attention_mask"])
                        for m in ("proxy_pm", "judge_pm")]
                outs += [response_logprobs(models[m], batch)[1] for m in ("policy", "pi0")]
            sync(dev)
            side.add_step(time.perf_counter() - t, [e.input_ids for e in chunk])
            for out in outs:
                digest.update(out.float().cpu().numpy().tobytes())
        wall = time.perf_counter() - t0
    side.extra["outputs_sha"] = digest.hexdigest()[:16]
    return side.finish(wall, mem.peak_mb)


def measure_ours(setup: Setup, args) -> Side:
    return _side(setup, args, shared=True)


def measure_apart(setup: Setup, args) -> Side:
    return _side(setup, args, shared=False)
