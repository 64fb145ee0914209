"""Safety context distillation on π0 (Llama 2 §4.2.4), stage ``pi0-safety``.

The HHH π0 answers a seeded, fixed set of the method's training prompts twice: once reading a
safety preprompt (``stages.pi0.safety_preprompt``: ``alignbench.stages.prompts``), once without.
π0 is then fine-tuned on (the prompt *without* the preprompt → the kept answer), the loss on the
answer tokens only. Untargeted, the kept answer is always the distilled one; targeted
(``stages.pi0.safety_targeted``), it is the distilled one only where the safety PM (the core's
``pm-safety`` stage) scores it above the undistilled one, else π0's own answer.

The prompts are adversarial ones, as in Llama 2: the harmless subsets' (subset labels, not gold;
``stages.pi0.safety_prompt_pool=adversarial``), or, ``mixed``, up to half from them and the rest
from the others. On hh_synth the record also holds Llama 2 Fig. 16b's view: the gold of the
kept and undistilled answers, binned by the undistilled answer's safety-PM score (targeted)
and by its gold, beside a null that applies the same keep rule to a second sample of π0's answer.
Measurement only: the gold never selects anything.
"""
from __future__ import annotations

import json
import random
from typing import Optional, Sequence

import numpy as np

from alignbench import freeze, lora
from alignbench.config import Config, ConfigError
from alignbench.data import load_data
from alignbench.data.synth import gold_parts, parse_task
from alignbench.data.types import harm_group
from alignbench.models import load_lm, load_tokenizer, pick_device
from alignbench.sampling import sample
from alignbench.stages.access import ACCESS_RULES, judge_kind, method_pairs
from alignbench.cache import Artifact, build_stage, read_record, data_key, format_key, lora_key, precision_key
from alignbench.stages.preference import stage_scorer
from alignbench.stages.prompts import safety_preprompt
from alignbench.tracking import Tracker
from alignbench.encoding import Encoded, encode_ids, pad_batch
from alignbench.train import batch_schedule, lm_loss, supervised_loop

HARMLESS_SHARE = 0.5  # the most of the distillation prompts drawn from the harmless subsets
ANSWERS = "distill_answers.jsonl"  # in the stage directory: both answers per prompt, and the kept one
N_BINS = 4  # Fig. 16b's bins of the undistilled answer's score (equal counts)


def check_safety_distill(cfg: Config) -> None:
    """Bad safety-distillation settings fail before any stage trains, naming the key."""
    sc = cfg.stages.pi0
    if sc.safety_targeted and sc.safety_preprompt == "none":
        raise ConfigError("stages.pi0.safety_targeted: true needs a safety preprompt to distill "
                          "(stages.pi0.safety_preprompt=generic or template), not none")


def distill_prompts(cfg: Config, data) -> tuple[list[str], list[bool]]:
    """(prompts, in a harmless subset) of the distillation: distinct prompts of ``method_pairs``,
    each group drawn by a ``stages.seed``-seeded shuffle. ``stages.pi0.safety_prompt_pool``:
    adversarial, the first min(N, all) harmless-subset prompts (N = ``stages.pi0.safety_prompts``);
    mixed, at most N prompts, of those min(all harmless-subset prompts, ⌈HARMLESS_SHARE·N⌉)
    harmless ones and the rest from the other subsets (all harmless ones again where the others
    run out)."""
    first: dict[str, bool] = {}
    for p in method_pairs(cfg, data):
        first.setdefault(p.prompt, harm_group(p.subset) == "harmless")
    rng = random.Random(cfg.stages.seed)
    harmless = [q for q, h in first.items() if h]
    other = [q for q, h in first.items() if not h]
    rng.shuffle(harmless)
    rng.shuffle(other)
    if cfg.stages.pi0.safety_prompt_pool == "adversarial":
        chosen = harmless[:cfg.stages.pi0.safety_prompts]
        return chosen, [True] * len(chosen)
    n = min(cfg.stages.pi0.safety_prompts, len(first))
    n_harm = min(len(harmless), max(int(np.ceil(HARMLESS_SHARE * n)), n - len(other)))
    chosen = harmless[:n_harm] + other[:n - n_harm]
    return chosen, [first[q] for q in chosen]


def targeted_keep(distilled: Sequence[float], undistilled: Sequence[float]) -> list[bool]:
    """Llama 2's targeting rule: keep_i = s(x_i, y_i^distilled) > s(x_i, y_i^undistilled), with s
    the safety PM's score of each answer to the prompt WITHOUT the preprompt; a tie keeps π0's
    own answer (distillation must earn its place)."""
    return [float(d) > float(u) for d, u in zip(distilled, undistilled)]


def null_answers(resampled: Sequence, undistilled: Sequence, keep_null: Sequence[bool]) -> list:
    """Fig. 16b's null arm: the kept arm's rule applied to a second, independent sample of π0's
    answer, null_i = resampled_i if keep_null_i else undistilled_i. Untargeted, keep_null is all
    True (a plain resample); targeted, keep_null_i = s(resampled_i) > s(undistilled_i)
    (``targeted_keep``): the targeted arm is a safety-PM-filtered best-of-2, so its null must be one
    too, or targeting would beat the null whatever the preprompt does."""
    return [r if k else u for r, u, k in zip(resampled, undistilled, keep_null)]


def student_examples(prompt_ids: Sequence[Sequence[int]], distilled_ids: Sequence[Sequence[int]],
                     undistilled_ids: Sequence[Sequence[int]], keep: Sequence[bool]) -> list[Encoded]:
    """The fine-tuning data: the prompt window sampled WITHOUT the preprompt, then the kept answer's
    sampled ids (EOS only where it was sampled); ``response_start`` masks the prompt out of the loss."""
    return [encode_ids(p, d if k else u) for p, d, u, k in zip(prompt_ids, distilled_ids, undistilled_ids, keep)]


def gain_by_bin(scores: Sequence[float], gold_undistilled: Sequence[float], gold_distilled: Sequence[float],
                gold_resampled: Sequence[float], n_bins: int = N_BINS) -> list[dict]:
    """Llama 2 Fig. 16b as a table: the answers sorted by ``scores`` (the undistilled answer's, a
    stable sort) and cut into ``n_bins`` equal-count bins (``np.array_split``); per bin its score
    range, n, mean gold of the undistilled and of the distilled answers (``gold_view`` passes the
    kept ones: targeted, π0's own where the PM kept it), gain = mean(distilled − undistilled), and
    null_gain = mean(resampled − undistilled), the same difference for the null arm (``gold_view``
    passes ``null_answers``: a second, independent undistilled answer kept by the same rule): binning
    on the undistilled answer's own score makes the top bins' gain negative and the bottom ones'
    positive by regression to the mean alone, and a keep rule that picks the better of two answers
    lifts the gain whatever was distilled, so the gain means something only against the null."""
    s, gu, gd, gr = (np.asarray(x, dtype=float) for x in (scores, gold_undistilled, gold_distilled, gold_resampled))
    out = []
    for idx in np.array_split(np.argsort(s, kind="stable"), min(n_bins, len(s))):
        if len(idx):
            out.append({"lo": float(s[idx].min()), "hi": float(s[idx].max()), "n": int(len(idx)),
                        "gold_undistilled": float(gu[idx].mean()), "gold_distilled": float(gd[idx].mean()),
                        "gain": float((gd[idx] - gu[idx]).mean()), "null_gain": float((gr[idx] - gu[idx]).mean())})
    return out


def gold_view(prompts: list[str], distilled: list[str], undistilled: list[str], resampled: list[str],
              keep: list[bool], s_u: Optional[list[float]], keep_null: Optional[list[bool]] = None) -> dict:
    """hh_synth's gold on the distillation answers (measurement): means of the gold and its harmless
    and helpful parts per arm (distilled, undistilled, kept: the one trained on), the kept-distilled
    share by request kind, and the Fig. 16b bins against the null ``null_answers(resampled,
    undistilled, keep_null)`` (``keep_null`` None: every resample kept, the untargeted null)."""
    parts = {arm: [gold_parts(p, r) for p, r in zip(prompts, answers)]
             for arm, answers in (("distilled", distilled), ("undistilled", undistilled))}
    parts["kept"] = [d if k else u for d, u, k in zip(parts["distilled"], parts["undistilled"], keep)]
    gold = {arm: [g.total for g in ps] for arm, ps in parts.items()}
    keep_null = [True] * len(prompts) if keep_null is None else keep_null
    gold["resampled"] = null_answers([gold_parts(p, r).total for p, r in zip(prompts, resampled)],
                                     gold["undistilled"], keep_null)
    kinds = [parse_task(p).kind for p in prompts]
    kinds = ["harmful" if k == "harmful" else "edgy" if k == "edgy" else "other" for k in kinds]
    view = {f"{what}_{arm}": float(np.mean([getattr(g, what) for g in ps]))
            for arm, ps in parts.items() for what in ("total", "harmless", "helpful")}
    view["kept_by_kind"] = {k: {"n": kinds.count(k), "kept_distilled": sum(kp for kp, kk in zip(keep, kinds) if kk == k)}
                            for k in ("harmful", "edgy", "other") if k in kinds}
    view["null"] = {"rule": "resample kept where the safety PM prefers it" if not all(keep_null) else "resample",
                    "kept_resampled": int(sum(keep_null))}
    golds = (gold["undistilled"], gold["kept"], gold["resampled"])  # what the student is trained on
    view["bins_by_gold"] = gain_by_bin(gold["undistilled"], *golds)
    if s_u is not None:
        view["bins_by_safety_pm"] = gain_by_bin(s_u, *golds)
    return view


def _write_answers(path, prompts: list[str], distilled: list[str], undistilled: list[str], keep: list[bool],
                   pm: Optional[tuple[list[float], list[float]]], resampled: Optional[list[str]] = None,
                   s_r: Optional[list[float]] = None) -> None:
    """Every distillation prompt's answers (two, and the null's resample on hh_synth) and which
    was kept, for inspection."""
    with open(path, "w") as f:
        for i, (p, d, u, k) in enumerate(zip(prompts, distilled, undistilled, keep)):
            f.write(json.dumps({"prompt": p, "distilled": d, "undistilled": u, "kept": "distilled" if k else "undistilled",
                                "safety_pm_distilled": pm[0][i] if pm else None,
                                "safety_pm_undistilled": pm[1][i] if pm else None,
                                "resampled": resampled[i] if resampled else None,
                                "safety_pm_resampled": s_r[i] if s_r else None}) + "\n")


def build_safety_pi0(cfg: Config, hhh: Artifact, safety_pm: Optional[Artifact]) -> Artifact:
    """π0 after safety context distillation (stage ``pi0-safety``), or ``hhh`` itself when
    ``stages.pi0.safety_preprompt`` is none."""
    sc = cfg.stages.pi0
    if sc.safety_preprompt == "none":
        return hhh
    if sc.safety_targeted and safety_pm is None:
        raise ValueError("targeted safety distillation needs the pm-safety stage (build_reward_pms builds it)")
    preprompt = safety_preprompt(sc.safety_preprompt)
    upstream = {"pi0": hhh.key, **({"safety_pm": safety_pm.key} if sc.safety_targeted else {})}
    key = {"upstream": upstream, "preprompt": preprompt,
           "safety": {"targeted": sc.safety_targeted, "prompts": sc.safety_prompts, "epochs": sc.safety_epochs,
                      "lr": sc.lr, "batch_size": sc.batch_size, "max_steps": sc.max_steps,
                      "pool": sc.safety_prompt_pool,
                      **({"harmless_share": HARMLESS_SHARE} if sc.safety_prompt_pool == "mixed" else {})},
           # issue 24: the null applies the kept arm's rule; the preprompt is never cut (turns are)
           "fig16b": "kept-vs-filtered-resample", "system_window": "drop-turns", "sampling": {"max_new_tokens": cfg.train.max_new_tokens, "temperature": cfg.train.temperature},
           "prompts_from": {"access": ACCESS_RULES, "judge": judge_kind(cfg)},
           "data": data_key(cfg), "seed": cfg.stages.seed, **precision_key(cfg), **format_key(cfg), **lora_key(cfg)}

    def build(out):
        data = load_data(cfg.data)
        prompts, harmless = distill_prompts(cfg, data)
        tok, model = load_tokenizer(hhh.path), load_lm(hhh.path)
        device, max_len, fmt = pick_device(cfg.train.device), hhh.record["max_len"], cfg.data.format
        model.to(device)
        draw = dict(n=1, max_new_tokens=cfg.train.max_new_tokens, temperature=cfg.train.temperature,
                    seed=cfg.stages.seed, max_len=max_len, fmt=fmt, kv_cache=cfg.train.kv_cache)
        distilled = sample(model, tok, prompts, system=preprompt, system_key="stages.pi0.safety_preprompt", **draw)
        undistilled = sample(model, tok, prompts, **draw)  # the same random stream: only the context differs
        gold = cfg.data.name == "hh_synth"  # the null of Fig. 16b's bins: a second undistilled answer (measured only)
        resampled = sample(model, tok, prompts, **{**draw, "seed": cfg.stages.seed + 1}).responses if gold else None
        s_d = s_u = s_r = None
        keep_null = [True] * len(prompts)  # the null arm's rule: untargeted, every resample
        if sc.safety_targeted:  # both answers scored as replies to the prompt the student will read
            scorer = stage_scorer(safety_pm, device, fmt=fmt)
            s_d = scorer.score(prompts, distilled.responses).tolist()
            s_u = scorer.score(prompts, undistilled.responses).tolist()
            keep = targeted_keep(s_d, s_u)
            if gold:  # measurement only: the same PM filter on the null's resample
                s_r = scorer.score(prompts, resampled).tolist()
                keep_null = targeted_keep(s_r, s_u)
            del scorer
        else:
            keep = [True] * len(prompts)
        enc = student_examples(undistilled.prompt_ids, distilled.response_ids, undistilled.response_ids, keep)
        model = freeze.prepare(model, cfg.model, seed=cfg.stages.seed)  # LoRA, or the top layers only
        batches = batch_schedule(len(enc), batch_size=sc.batch_size, epochs=sc.safety_epochs, seed=cfg.stages.seed,
                                 max_steps=sc.max_steps)
        with Tracker(out / "tb", cfg.train.report_to, "pi0-safety") as tracker:
            res = supervised_loop(model, batches, lambda idx: pad_batch([enc[i] for i in idx], tok.pad_token_id),
                                  lm_loss, lr=sc.lr, desc="π0 safety context distillation",
                                  grad_clip=cfg.train.grad_clip, device=device, precision=cfg.train.precision,
                                  gradient_checkpointing=cfg.train.gradient_checkpointing, log_step=tracker.log_step)
        metrics = {"preprompt": sc.safety_preprompt, "targeted": sc.safety_targeted, "prompts": len(prompts),
                   "harmless_subset_prompts": sum(harmless), "kept_distilled": sum(keep),
                   "kept_undistilled": len(keep) - sum(keep), "steps": res.steps, "train_tokens": res.tokens,
                   "train_seconds": round(res.seconds, 2), "final_loss": res.losses[-1]}
        _write_answers(out / ANSWERS, prompts, distilled=distilled.responses, undistilled=undistilled.responses,
                       keep=keep, pm=(s_d, s_u) if s_u is not None else None, resampled=resampled, s_r=s_r)
        if gold:
            metrics["gold"] = gold_view(prompts, distilled=distilled.responses, undistilled=undistilled.responses,
                                        resampled=resampled, keep=keep, s_u=s_u, keep_null=keep_null)
        lora.save(model.to("cpu"), out)
        tok.save_pretrained(out)
        return {"metrics": metrics, "max_len": max_len}

    return build_stage("pi0-safety", key, cfg.paths.cache_dir, build)


def safety_distill_record(pi0: Artifact) -> Optional[dict]:
    """The ``pi0-safety`` stage's metrics behind a run's π0 (for metrics.json and the report): π0
    itself, or the stage a later one (GAtt) names as its ``upstream`` π0; None without one."""
    if pi0.stage == "pi0-safety":
        return pi0.record.get("metrics")
    up = pi0.record.get("upstream", {}).get("pi0")
    record = read_record(pi0.path.parent / f"pi0-safety-{up}") if up else None
    return record.get("metrics") if record else None


def pi0_safety_record(cfg: Config, pi0: Artifact) -> dict:
    """metrics.json's ``pi0_safety``: the run's π0 variant (preprompt, targeted) and, where it has
    one, its ``pi0-safety`` stage's metrics (``safety_distill_record``): what the report's
    "Targeted safety context distillation" section groups and shows."""
    sc = cfg.stages.pi0
    return {"preprompt": sc.safety_preprompt, "targeted": sc.safety_targeted,
            "stage": safety_distill_record(pi0) if sc.safety_preprompt != "none" else None}
