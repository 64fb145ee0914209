"""Stage 3, the preference model (PM): the LM with a scalar head read at the end-of-context token
(EOS appended to every response), trained on comparisons with L = −log σ(r_chosen − r_rejected),
one epoch by default (Bai et al. 2022 §2; more epochs overfit). Optional preference-model
pretraining (PMP) on another comparison set first.

``part`` selects which half of the training comparisons the PM sees: "all", or "a"/"b" for the HH
paper's train-PM / test-PM split, where the test PM judges policies trained against the train PM.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignbench.config import Config
from alignbench.data import load_data
from alignbench.models import load_pm, load_tokenizer, pick_device, pm_from_lm
from alignbench.stages.cache import Artifact, build_stage, precision_key
from alignbench.train import batch_schedule, encode, pad_batch, supervised_loop


def half_of(pairs, part: str) -> list:
    """Deterministic halves by prompt hash, so the two PMs never share a prompt."""
    if part == "all":
        return list(pairs)
    want = 0 if part == "a" else 1
    return [p for p in pairs if hashlib.sha256(p.prompt.encode()).digest()[0] % 2 == want]


def pair_batch(tok, pairs, idx, max_len):
    """Chosen responses in the first half of the batch, rejected in the second."""
    seqs = [encode(tok, pairs[i].prompt, pairs[i].chosen, max_len) for i in idx]
    seqs += [encode(tok, pairs[i].prompt, pairs[i].rejected, max_len) for i in idx]
    return pad_batch(seqs, tok.pad_token_id)


def pm_loss(model, batch) -> torch.Tensor:
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    chosen, rejected = r.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


class PMScorer:
    """Scores (prompt, response) pairs with a trained PM and counts the calls (a cost every method
    is charged for) and the tokens it reads (its FLOPs). Thread-safe counters; batched; no gradients."""

    def __init__(self, path, device="cpu", max_len: int = 256, batch_size: int = 64):
        self.tokenizer = load_tokenizer(path)
        self.model = load_pm(path).to(device).eval().requires_grad_(False)
        self.device, self.max_len, self.batch_size = device, max_len, batch_size
        self.calls = 0
        self.tokens = 0  # prompt + response (+ EOS) tokens read, after truncation to max_len
        self._lock = threading.Lock()

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        with self._lock:
            self.calls += len(prompts)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            seqs = [encode(self.tokenizer, p, r, self.max_len)
                    for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            b = pad_batch(seqs, self.tokenizer.pad_token_id, self.device)
            with self._lock:
                self.tokens += sum(len(s.input_ids) for s in seqs)
            out.append(self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def build_pm(cfg: Config, init: Artifact, part: str = "all") -> Artifact:
    data = load_data(cfg.data)
    sc = cfg.stages.pm
    key = {"upstream": {init.stage: init.key}, "pm": dataclasses.asdict(sc), "part": part,
           "data": dataclasses.asdict(cfg.data), "seed": cfg.stages.seed, **precision_key(cfg)}

    def build(out):
        tok, device, max_len = load_tokenizer(init.path), pick_device(cfg.train.device), init.record["max_len"]
        model = pm_from_lm(init.path, tok, cfg.stages.seed)
        metrics: dict = {}
        if sc.pmp_path:
            from alignbench.data.hh import load_hh_rlhf
            pmp, _ = load_hh_rlhf(sc.pmp_path, _subsets_in(sc.pmp_path), ["train", "test"], "skip")
            metrics["pmp"] = _train(model, tok, pmp, sc.pmp_epochs, sc, cfg, device, max_len, "PM pretraining")
        train = half_of(data.train, part)
        metrics["train"] = _train(model, tok, train, sc.epochs, sc, cfg, device, max_len, f"PM ({part})")
        model.to("cpu").save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        heldout = _score_heldout(out, data.test, device, max_len)
        (out / "heldout_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
        acc = sum((r["score_chosen"] > r["score_rejected"]) + 0.5 * (r["score_chosen"] == r["score_rejected"])
                  for r in heldout) / max(len(heldout), 1)
        metrics["heldout_accuracy"] = acc
        return {"metrics": metrics, "max_len": max_len, "data_counts": {"train_pairs": len(train), "heldout_pairs": len(heldout)}}

    return build_stage(f"pm-{part}" if part != "all" else "pm", key, cfg.paths.cache_dir, build)


def _train(model, tok, pairs, epochs, sc, cfg, device, max_len, desc) -> dict:
    batches = batch_schedule(len(pairs), sc.batch_size, epochs, cfg.stages.seed, sc.max_steps)
    res = supervised_loop(model, batches, lambda idx: pair_batch(tok, pairs, idx, max_len), pm_loss, sc.lr,
                          desc, cfg.train.grad_clip, device=device, precision=cfg.train.precision)
    return {"pairs": len(pairs), "steps": res.steps, "train_tokens": res.tokens, "train_seconds": round(res.seconds, 2),
            "first_loss": res.losses[0], "final_loss": sum(res.losses[-10:]) / len(res.losses[-10:])}


def _score_heldout(path, pairs, device, max_len) -> list[dict]:
    scorer = PMScorer(path, device, max_len)
    rc, rr = [], []
    for i in tqdm(range(0, len(pairs), 256), desc="PM held-out scores", leave=False):
        chunk = pairs[i:i + 256]
        rc += scorer.score([p.prompt for p in chunk], [p.chosen for p in chunk]).tolist()
        rr += scorer.score([p.prompt for p in chunk], [p.rejected for p in chunk]).tolist()
    return [{"score_chosen": c, "score_rejected": r, "n_turns": p.n_turns, "subset": p.subset,
             "gold_chosen": p.meta.get("gold_chosen"), "gold_rejected": p.meta.get("gold_rejected")}
            for p, c, r in zip(pairs, rc, rr)]


def _subsets_in(path) -> list[str]:
    from pathlib import Path
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir())
