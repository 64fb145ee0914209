"""Stage 2, the context-distilled baseline π0 (Askell et al. 2021; Bai et al. 2022, App. A.1).

The base LM *with* an HHH prompt in front is the teacher; the same LM *without* it is the student.
At every position of a training dialogue the student is trained to match the teacher's next-token
distribution, stored as its top-k log-probs plus one bucket for the remaining mass (k = 50 as in
the HH paper): L = KL(p_teacher(· | HHH prompt, x_<t) ‖ p_student(· | x_<t)) over k + 1 outcomes.

Option ``mode=preferred_ft``: supervised fine-tuning on the chosen responses instead (the DPO
paper's "Preferred-FT"), of the comparisons a method may consume (``access.method_pairs``: never
the judge's half); ``mode=none``: π0 is the base LM itself.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from alignbench import freeze, lora
from alignbench.config import Config
from alignbench.data import load_data, pairwise_config
from alignbench.models import load_lm, load_tokenizer, pick_device
from alignbench.stages.access import ACCESS_RULES, judge_kind, method_pairs
from alignbench.stages.base import dialogue_corpus, mean_nll
from alignbench.formats import dialogue_ids, strip_prefix, system_prefixes
from alignbench.cache import Artifact, build_stage, data_key, format_key, lora_key, pointer_to, precision_key
from alignbench.stages.prompts import HHH_PROMPT, hhh_prompt  # noqa: F401 - HHH_PROMPT re-exported
from alignbench.tracking import Tracker
from alignbench.encoding import Encoded, encode_chosen, pad_batch
from alignbench.train import batch_schedule, lm_loss, selected_logits, supervised_loop

def topk_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      k: int) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest, averaged
    over masked positions. Logits are [B, T, V], aligned so position t predicts token t+1 in both."""
    t_logp = torch.log_softmax(teacher_logits.float(), -1)
    top_logp, top_idx = t_logp.topk(k, dim=-1)
    s_logp = torch.log_softmax(student_logits.float(), -1).gather(-1, top_idx)

    def with_rest(logp):  # append log(1 - Σ p_topk), clamped: the top-k can hold ~all the mass
        rest = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))
        return torch.cat([logp, rest[..., None]], -1)

    t, s = with_rest(top_logp), with_rest(s_logp)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def distill_batch_loss(student, teacher, batch: dict, prefix: torch.Tensor, s0: int, top_k: int) -> torch.Tensor:
    """``topk_distill_loss`` of a right-padded batch of s_pre + X rows (the dialogue X from
    position ``s0``): the student reads s_pre + X, the teacher (no gradient) ``prefix`` + X. Both
    run packed (``final_hidden``) and their LM heads run only at the dialogue's real tokens
    (``selected_logits``): no [B, T, V] logits over pads or prefixes."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    x, x_attn = ids[:, s0:], attn[:, s0:]  # the dialogue, after the student's own prefix
    with torch.no_grad():  # teacher sees the HHH prompt, then the same dialogue
        t_pre = torch.ones(len(ids), len(prefix), dtype=attn.dtype, device=ids.device)
        t_ids = torch.cat([prefix.to(ids.device).expand(len(ids), -1), x], 1)
        t_logits = selected_logits(teacher, t_ids, torch.cat([t_pre, x_attn], 1),
                                   torch.cat([torch.zeros_like(t_pre), x_attn], 1))
    s_logits = selected_logits(student, ids, attn, torch.cat([torch.zeros_like(attn[:, :s0]), x_attn], 1))
    mask = torch.ones(1, len(s_logits), device=s_logits.device)  # every row is a real dialogue position
    return topk_distill_loss(s_logits[None], t_logits[None], mask, min(top_k, s_logits.shape[-1]))


# stages.pi0 keys of the stages after the HHH distillation (safety context distillation, GAtt):
# they have their own stages, so they stay out of this one's key
LATER_STAGE_KEYS = ("safety_preprompt", "safety_targeted", "safety_prompts", "safety_epochs", "gatt")


def hhh_settings(sc) -> dict:
    return {k: v for k, v in dataclasses.asdict(sc).items() if k not in LATER_STAGE_KEYS}


def build_pi0(cfg: Config, base: Artifact) -> Artifact:
    data = load_data(pairwise_config(cfg.data))  # ranked labels change only the PM
    sc = cfg.stages.pi0
    prompt = hhh_prompt(cfg)
    key = {"upstream": {"base": base.key}, "pi0": hhh_settings(sc), "hhh_prompt": prompt,
           "data": data_key(cfg), "seed": cfg.stages.seed, **precision_key(cfg), **format_key(cfg), **lora_key(cfg)}
    if sc.mode == "preferred_ft":  # which comparisons it fits depends on the judge (access rules)
        key["sft_pairs"] = {"access": ACCESS_RULES, "judge": judge_kind(cfg)}

    def build(out):
        if sc.mode == "none" and not lora.enabled(cfg.model):
            # π0 is the base LM itself: point at it (no copy, no load). Its held-out NLL is the base
            # LM's, computed on the same dialogues with the same weights.
            metrics = {"mode": sc.mode, "heldout_nll": base.record["metrics"]["heldout_nll"]}
            return {"metrics": metrics, "max_len": base.record["max_len"], **pointer_to(base)}
        tok, model = load_tokenizer(base.path), load_lm(base.path)
        # π0 = the base LM + a trained adapter (saved merged) under LoRA; its top layers under trainable_layers
        model = freeze.prepare(model, cfg.model, seed=cfg.stages.seed)
        device, max_len = pick_device(cfg.train.device), base.record["max_len"]
        metrics: dict = {"mode": sc.mode}
        tracker = Tracker(out / "tb", cfg.train.report_to if sc.mode != "none" else [], "pi0")
        if sc.mode == "context_distill":
            metrics.update(_distill(model, tok, prompt, dialogue_corpus(data.train), max_len, sc, cfg, device,
                                    tracker))
        elif sc.mode == "preferred_ft":
            enc = encode_chosen(tok, method_pairs(cfg, data), max_len, fmt=cfg.data.format)
            batches = batch_schedule(len(enc), sc.batch_size, sc.epochs, cfg.stages.seed, sc.max_steps)
            res = supervised_loop(model, batches, lambda idx: pad_batch([enc[i] for i in idx], tok.pad_token_id),
                                  lm_loss, sc.lr, "π0 preferred-FT", cfg.train.grad_clip, device=device,
                                  precision=cfg.train.precision, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                  log_step=tracker.log_step)
            metrics.update(steps=res.steps, train_tokens=res.tokens, train_seconds=round(res.seconds, 2),
                           final_loss=res.losses[-1])
        tracker.close()
        metrics["heldout_nll"] = mean_nll(model, tok, dialogue_corpus(data.eval)[:512], max_len, device,
                                          fmt=cfg.data.format)
        lora.save(model.to("cpu"), out)
        tok.save_pretrained(out)
        return {"metrics": metrics, "max_len": max_len}

    return build_stage("pi0", key, cfg.paths.cache_dir, build)


def _distill(student, tok, prompt: str, texts: list[str], max_len: int, sc, cfg: Config, device,
             tracker: Optional[Tracker] = None) -> dict:
    # Under LoRA the teacher is the student with its adapter disabled (the base LM, no second copy);
    # otherwise a frozen copy taken before training, sharing the student's frozen trunk (trainable_layers)
    teacher = (lora.AdapterDisabled(student) if lora.is_peft(student)
               else freeze.frozen_copy(student).to(device))
    # Every dialogue X is s_pre + X for the student and h + X for the teacher: raw, s_pre is empty
    # and h the prompt's text; chat, h renders the prompt as a system message and s_pre is what the
    # template writes without it (e.g. a default system message), seen but not distilled.
    fmt = cfg.data.format
    s_pre, h = system_prefixes(tok, fmt, prompt, texts[0])
    room = max_len - max(len(h), len(s_pre))
    if room < 16:
        raise ValueError(f"stages.pi0.hhh_prompt: {len(h)} tokens leaves no room in model.max_seq_len={max_len}")
    enc = [Encoded(s_pre + strip_prefix(dialogue_ids(tok, t, fmt), s_pre, "stages.pi0")[:room], len(s_pre))
           for t in texts]
    prefix, s0 = torch.tensor(h), len(s_pre)

    def make_batch(idx):
        return pad_batch([enc[i] for i in idx], tok.pad_token_id)

    def loss_fn(model, batch):
        return distill_batch_loss(model, teacher, batch, prefix=prefix, s0=s0, top_k=sc.top_k)

    batches = batch_schedule(len(enc), sc.batch_size, sc.epochs, cfg.stages.seed, sc.max_steps)
    res = supervised_loop(student, batches, make_batch, loss_fn, sc.lr, "π0 context distillation",
                          cfg.train.grad_clip, device=device, precision=cfg.train.precision,
                          gradient_checkpointing=cfg.train.gradient_checkpointing,
                          log_step=tracker.log_step if tracker else None)
    return {"steps": res.steps, "train_tokens": res.tokens, "train_seconds": round(res.seconds, 2),
            "tokens_per_second": round(res.tokens_per_second, 1), "first_kl": res.losses[0],
            "final_kl": sum(res.losses[-10:]) / len(res.losses[-10:]), "hhh_prompt_tokens": len(h)}
