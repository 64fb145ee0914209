"""Stage 3, the preference model (PM): the LM with a scalar head read at the end-of-context token
(the last attended position; EOS is appended to every dataset response), trained on comparisons with L = −log σ(r_chosen − r_rejected),
one epoch by default (Bai et al. 2022 §2; more epochs overfit). Optional preference-model
pretraining (PMP) on another comparison set first. ``stages.pm.objective`` swaps the loss
(InstructGPT's ranking loss, a pointwise classifier, or no training: the LM score, ``LMScorer``),
``harmless_weight`` weighs harmless comparisons by λ and ``judgements`` keeps the first N labels
(``alignbench.stages.pm_objectives``). Every PM is scored on the same held-out comparisons: the
pairwise test split (``heldout_scores.jsonl``, ``heldout_*accuracy*`` in the record).

``part`` selects which half of the training comparisons the PM sees: "all", or "a"/"b" for the HH
paper's train-PM / test-PM split, where the test PM judges policies trained against the train PM
(halves by conversation, ``alignbench.data.splits.pm_half``; PMP pairs that share a conversation
with the rest of the data are dropped: ``alignbench.stages.access.pmp_pairs``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignbench import freeze, frozen_trunk, lora, packing
from alignbench.config import Config, ConfigError, PMStageConfig
from alignbench.data import load_data, pairwise_config
from alignbench.data.synth import FALSE_REFUSAL, parse_task, safety_outcome
from alignbench.data.types import harm_group
from alignbench.eval import pm_accuracy
from alignbench.formats import end_of_turn_id
from alignbench.models import load_lm, load_pm, load_tokenizer, pick_device, pm_from_lm
from alignbench.stages.access import ACCESS_RULES, pm_pairs, pm_parts, pmp_pairs, whitening_pairs
from alignbench.cache import Artifact, build_stage, data_key, format_key, lora_key, precision_key
from alignbench.stages.pm_objectives import (Ranked, classifier_loss, element_weights, first_judgements,
                                             pairwise_loss, ranked_batch, ranking_loss, score_matrix,
                                             training_elements)
from alignbench.tracking import Tracker
from alignbench.encoding import Encoded, encode, encode_ids, encode_pair, pad_batch, prompt_window
from alignbench.train import batch_schedule, last_token_index, response_logprobs, supervised_loop

log = logging.getLogger(__name__)


def pair_batch(tok, pairs, idx, max_len, fmt: str = "raw"):
    """Chosen responses in the first half of the batch, rejected in the second; both sides of a
    pair on the same prompt window (``encode_pair``). ``pairs``: PreferencePairs or two-response
    ``pm_objectives.Ranked`` elements."""
    encoded = [encode_pair(tok, pairs[i].prompt, *_better_worse(pairs[i]), max_len, fmt=fmt) for i in idx]
    return pad_batch([c for c, _ in encoded] + [r for _, r in encoded], tok.pad_token_id)


def _better_worse(pair) -> tuple[str, str]:
    return (pair.responses[0], pair.responses[1]) if isinstance(pair, Ranked) else (pair.chosen, pair.rejected)


def pm_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) [B]: the scalar head applied to the trunk's hidden state at the last attended
    position of each right-padded row, the end-of-context token.

    Read here rather than through AutoModelForSequenceClassification, which pools at the last
    token that is not the pad token: where pad == EOS (GPT-2, Pythia, SmolLM2) it skips the
    appended EOS itself."""
    model = lora.unwrap(model)  # under LoRA: the adapted model, its trained head in ``score``

    def trunk(**inputs):  # packed when train.packing is on (alignbench.packing): real tokens only
        return model.base_model(**inputs, use_cache=False).last_hidden_state

    with frozen_trunk.fed(input_ids, attention_mask):  # read by a frozen-trunk cache, if one is on
        hidden = packing.forward(getattr(model, "config", None), trunk, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()


def pm_loss(model, batch) -> torch.Tensor:
    """L = −log σ(r_chosen − r_rejected), averaged over the pairs of the batch; with ``weights``
    [B] (``stages.pm.harmless_weight``) L = (1/B) Σ_i w_i ℓ_i (``pm_objectives.pairwise_loss``)."""
    chosen, rejected = pm_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    if "weights" in batch:
        return pairwise_loss(chosen, rejected, batch["weights"])
    return -F.logsigmoid(chosen - rejected).mean()


def ranked_pm_loss(model, batch) -> torch.Tensor:
    """``pm_objectives.ranking_loss`` of a ``ranked_batch``: every ranking one element."""
    scores, valid = score_matrix(pm_scores(model, batch["input_ids"], batch["attention_mask"]), batch)
    return ranking_loss(scores, valid, batch["weights"])


def classifier_pm_loss(model, batch) -> torch.Tensor:
    """``pm_objectives.classifier_loss`` of a ``ranked_batch``: good = 1, bad = 0 per response."""
    scores, _ = score_matrix(pm_scores(model, batch["input_ids"], batch["attention_mask"]), batch)
    labels, _ = score_matrix(batch["labels"].to(scores.dtype), batch, fill=-1.0)
    return classifier_loss(scores, labels, batch["weights"])


def same_tokenizer(a, b) -> bool:
    """Cheap check that token ids transfer between two tokenizers (same class, same vocabulary)."""
    return type(a) is type(b) and len(a) == len(b) and a.get_vocab() == b.get_vocab()


class PMScorer:
    """Scores (prompt, response) pairs with a trained PM and counts the calls (a cost every method
    is charged for) and the tokens it reads (its FLOPs). Thread-safe counters; batched; no gradients.
    ``fmt``: the ``data.format`` the PM was trained in (texts are rendered the same way)."""

    def __init__(self, path, device="cpu", max_len: int = 256, batch_size: int = 64, fmt: str = "raw"):
        self.tokenizer, self.fmt = load_tokenizer(path), fmt
        self.model = self._load(path).to(device).eval().requires_grad_(False)
        self.device, self.max_len, self.batch_size = device, max_len, batch_size
        self.calls = 0
        self.tokens = 0  # prompt + response (+ EOS) tokens read, after truncation to max_len
        self._lock = threading.Lock()

    def trunk_models(self) -> list:
        """The model it runs (``shared_trunk``: its frozen blocks may be shared with the policy's)."""
        return [self.model]

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Dataset-style text: each response gets EOS or end-of-turn (it is complete), ``encode``'s window rule."""
        return self._score([encode(self.tokenizer, p, r, self.max_len, fmt=self.fmt)
                            for p, r in zip(prompts, responses)])

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Already-tokenised sequences (e.g. samples, see ``scored_ids``), read at their last token;
        prompts too long for this PM keep their end (``prompt_window``)."""
        return self._score([encode_ids(prompt_window(p, self.max_len, len(r)), r)
                            for p, r in zip(prompt_ids, response_ids)])

    def score_pairs(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of comparisons, both sides on one prompt window (``encode_pair``)."""
        encoded = [encode_pair(self.tokenizer, p.prompt, p.chosen, p.rejected, self.max_len, fmt=self.fmt)
                   for p in pairs]
        scores = self._score([c for c, _ in encoded] + [r for _, r in encoded])
        return scores[:len(pairs)], scores[len(pairs):]

    @torch.no_grad()
    def _score(self, seqs: list[Encoded]) -> torch.Tensor:
        with self._lock:
            self.calls += len(seqs)
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            b = pad_batch(chunk, self.tokenizer.pad_token_id, self.device)
            with self._lock:
                self.tokens += sum(len(s.input_ids) for s in chunk)
            out.append(self._forward(b).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _load(self, path):
        return load_pm(path)

    def _forward(self, batch: dict) -> torch.Tensor:
        return pm_scores(self.model, batch["input_ids"], batch["attention_mask"])


class LMScorer(PMScorer):
    """``stages.pm.objective=lm``: a PM with no training, whose score of a response is its summed
    log-probability under an LM, log p(y | x) = Σ_t log p(y_t | x, y_<t) (Askell et al. 2021's
    imitation baseline as a scorer). The same interface, counters and costs as ``PMScorer``."""

    def _load(self, path):
        return load_lm(path)

    def _forward(self, batch: dict) -> torch.Tensor:
        return response_logprobs(self.model, batch)[0].float()


def stage_scorer(artifact: Artifact, device="cpu", fmt: str = "raw", batch_size: int = 64) -> PMScorer:
    """The scorer a PM stage serves: its trained PM, or for objective ``lm`` an ``LMScorer`` of the
    init LM the record names (a stage directory beside it in the cache)."""
    max_len = artifact.record["max_len"]
    if artifact.record.get("objective") == "lm":
        return LMScorer(artifact.path.parent / artifact.record["lm_stage_dir"], device, max_len, batch_size, fmt)
    return PMScorer(artifact.path, device, max_len, batch_size, fmt)


def scored_ids(samples, eos_id: int) -> list[list[int]]:
    """The response ids a PM reads for sampled responses: as sampled, plus EOS after a response
    that ended at the stop string (it did end; EOS is the PM's end-of-context token, as in its
    training data). A response cut at max_new_tokens gets none: it did not end. Under
    ``data.format=chat`` ``eos_id`` is the end-of-turn token, with which every finished sample ends."""
    return [list(r) + [eos_id] if done and (not r or r[-1] != eos_id) else list(r)
            for r, done in zip(samples.response_ids, samples.finished)]


class SampleScorer:
    """A PM that scores SampleBatches by their ids when it shares the policy's tokenizer, and falls
    back to the decoded text (with a logged warning) when it does not."""

    def __init__(self, pm: PMScorer, tokenizer, fmt: str = "raw"):
        self.pm, self.eos_id = pm, end_of_turn_id(tokenizer, fmt)  # the end token of a finished sample
        self.by_ids = same_tokenizer(pm.tokenizer, tokenizer)
        if not self.by_ids:
            log.warning("the PM's tokenizer differs from the policy's: samples are re-tokenised from text")

    def __call__(self, samples) -> torch.Tensor:
        if self.by_ids:
            ids = scored_ids(samples, self.eos_id)
            if getattr(self.pm, "reads_prompt_text", False):  # the two-PM reward tags prompts by their text
                return self.pm.score_ids(samples.prompt_ids, ids, prompts=samples.prompts)
            return self.pm.score_ids(samples.prompt_ids, ids)
        return self.pm.score(samples.prompts, samples.responses)


# Bump when the PM's encoding or read point changes what it learns (cache.STAGE_CODE_VERSION would
# also rebuild the base LM and π0, whose code did not change). 2: score read at the last attended
# token (pm_scores), chosen and rejected on one prompt window (encode_pair).
PM_CODE_VERSION = "2"
# stages.pm fields whose default leaves the PM as it was before them: left out of the key at their
# default, so existing caches stay valid
VARIANT_DEFAULTS = {"objective": "pairwise", "harmless_weight": 1.0, "judgements": None}


def pm_settings(cfg: Config, part: str = "all") -> PMStageConfig:
    """The PM settings of ``part``: the judge PM (part "b", real HH) is always the standard pairwise
    PM on all its comparisons, so that PM variants never change who judges."""
    return dataclasses.replace(cfg.stages.pm, **VARIANT_DEFAULTS) if part == "b" else cfg.stages.pm


def stage_pm_settings(cfg: Config, part: str = "all", harm: str | None = None) -> PMStageConfig:
    """The settings the PM stage of ``part`` (and ``harm`` group) trains with: ``pm_settings``, or for
    Llama 2's safety / helpfulness PM (``harm`` set) always the standard pairwise PM on all its
    comparisons (``VARIANT_DEFAULTS``) with ``stages.pm``'s optimiser settings. Every PM that
    retrains one (iterated RLHF) uses them too."""
    return dataclasses.replace(cfg.stages.pm, **VARIANT_DEFAULTS) if harm else pm_settings(cfg, part)


def pm_training_pairs(cfg: Config, data=None, part: str = "all", harm: str | None = None) -> list:
    """The comparisons the PM stage of ``part`` (and ``harm`` group) trains on: its part's comparisons
    of that group (the safety PM: mixed with helpful ones, ``reward.safety_helpful_share``), the
    first ``judgements`` of them (``pm_objectives.first_judgements``, seeded by stages.seed); none
    for the LM score, which reads no label. ``data`` None: read from ``cfg.data``."""
    sc = stage_pm_settings(cfg, part, harm)
    data = load_data(cfg.data) if data is None else data
    share = cfg.reward.safety_helpful_share if harm == "harmless" else 0.0
    train = (safety_mix(pm_pairs(cfg, data, part), share, cfg.stages.seed) if share  # Llama 2 §3.2.2's mix
             else [p for p in pm_pairs(cfg, data, part) if not harm or harm_group(p.subset) == harm])
    return [] if sc.objective == "lm" else first_judgements(train, sc.judgements, cfg.stages.seed)


def pm_variant(cfg: Config) -> dict:
    """The proxy PM's variant: objective, λ, judgements and hh_synth's rank K (None: pairs)."""
    sc = cfg.stages.pm
    rank_k = cfg.data.synth.rank_k if cfg.data.name == "hh_synth" else None
    return {"objective": sc.objective, "harmless_weight": sc.harmless_weight, "judgements": sc.judgements,
            "rank_k": rank_k}


def pm_label(cfg: Config) -> str:
    """The proxy PM's name in results and reports: "pm", plus what differs from the default PM."""
    v = pm_variant(cfg)
    names = {"objective": "objective", "harmless_weight": "λ", "judgements": "judgements", "rank_k": "K"}
    diff = [f"{names[k]}={v[k]:g}" if isinstance(v[k], float) else f"{names[k]}={v[k]}"
            for k in names if v[k] != VARIANT_DEFAULTS.get(k)]
    return "pm" if not diff else f"pm[{', '.join(diff)}]"


def _key_settings(sc: PMStageConfig) -> dict:
    """The settings in a PM stage's key: a variant field only where it differs from the default PM,
    ``trunk_cache`` only when on (the keys of PMs built before it existed stay as they were)."""
    return {k: v for k, v in dataclasses.asdict(sc).items()
            if (k not in VARIANT_DEFAULTS or v != VARIANT_DEFAULTS[k]) and not (k == "trunk_cache" and not v)}


def check_judgements(cfg: Config) -> None:
    """``stages.pm.judgements`` must not exceed the proxy PM's training comparisons: checked before
    any stage trains (``graph.build_shared_stages``)."""
    n, part = cfg.stages.pm.judgements, pm_parts(cfg)[0]
    have = len(pm_pairs(cfg, load_data(cfg.data), part)) if n is not None else 0
    if n is not None and n > have:
        raise ConfigError(f"stages.pm.judgements: {n} exceeds the {have} training comparisons of the PM "
                          f"(part {part!r})")


# Llama 2's two reward models (reward.kind=safety_helpful): the stage name of each harm group's PM
REWARD_PM_STAGES = {"harmless": "pm-safety", "helpful": "pm-helpful"}


def safety_mix(pairs: Sequence, share: float, seed: int) -> list:
    """The safety PM's training comparisons (Llama 2 §3.2.2: safety data mixed with helpfulness
    data, 90/10 at share 0.1): every harmless-group pair, plus n_h = min(H, round(share·n_s / (1 −
    share))) of the H helpful-group ones (n_s harmless pairs), drawn by a ``seed``-seeded sample, so
    that n_h / (n_s + n_h) ≈ share; the data's order is kept. share 0: the harmless pairs only."""
    helpful = [i for i, p in enumerate(pairs) if harm_group(p.subset) != "harmless"]
    n_safe = len(pairs) - len(helpful)
    n_h = min(len(helpful), round(share * n_safe / (1 - share)))
    mixed = set(random.Random(seed).sample(helpful, n_h))
    return [p for i, p in enumerate(pairs) if harm_group(p.subset) == "harmless" or i in mixed]


def edgy_refusal_pairs(pairs: Sequence) -> list[tuple[str, str, str]]:
    """hh_synth's benign-but-edgy comparisons where exactly one answer refuses and the gold reward
    prefers the other: (prompt, refusal, other answer). Gold never prefers the refusal on them."""
    out = []
    for p in pairs:
        if parse_task(p.prompt).kind != "edgy":
            continue
        refuses = [safety_outcome(p.prompt, r) == FALSE_REFUSAL for r in (p.chosen, p.rejected)]
        g = (p.meta.get("gold_chosen"), p.meta.get("gold_rejected"))
        if refuses[0] != refuses[1] and None not in g and g[0] != g[1] and refuses[int(g[0] > g[1])]:
            out.append((p.prompt, *((p.chosen, p.rejected) if refuses[0] else (p.rejected, p.chosen))))
    return out


def refusal_preference(scorer, triples: Sequence[tuple[str, str, str]]) -> dict:
    """How often a PM scores the refusal above the other answer on ``edgy_refusal_pairs``:
    rate = Σ[s(x, refusal) > s(x, other)] / n (None over no pair). A PM that learnt only "a refusal
    is better" gives ≈ 1; gold gives 0."""
    if not triples:
        return {"rate": None, "n": 0}
    prompts = [t[0] for t in triples]
    refusal, other = scorer.score(prompts, [t[1] for t in triples]), scorer.score(prompts, [t[2] for t in triples])
    return {"rate": float((refusal > other).double().mean()), "n": len(triples)}


def build_pm(cfg: Config, init: Artifact, part: str = "all", harm: str | None = None) -> Artifact:
    """``harm``: None for the PM of every comparison of ``part``; "harmless" / "helpful" for Llama 2's
    safety / helpfulness PM, trained (and scored held out) on that harm group's comparisons only,
    always the standard pairwise PM (``VARIANT_DEFAULTS``) with ``stages.pm``'s optimiser settings."""
    data = load_data(cfg.data)
    sc = stage_pm_settings(cfg, part, harm)
    key = {"upstream": {init.stage: init.key}, "pm": _key_settings(sc), "part": part, "access": ACCESS_RULES,
           "pm_code": PM_CODE_VERSION,
           "data": data_key(cfg), "seed": cfg.stages.seed, **precision_key(cfg), **format_key(cfg), **lora_key(cfg)}
    if cfg.data.synth.rank_k is not None and cfg.data.name == "hh_synth":
        key["rank_k"] = cfg.data.synth.rank_k
    if harm:
        key["harm"] = harm
    share = cfg.reward.safety_helpful_share if harm == "harmless" else 0.0
    if share:  # the safety PM's mix (Llama 2 §3.2.2); 0 leaves the harmless-only PM's key as it was
        key["helpful_share"] = share
    in_group = (lambda p: harm_group(p.subset) == harm) if harm else (lambda p: True)  # noqa: E731
    # one held-out set for every variant (its harm group's part for a safety / helpfulness PM)
    heldout_pairs = [p for p in load_data(pairwise_config(cfg.data)).test if in_group(p)]

    def build(out):
        tok, device, max_len = load_tokenizer(init.path), pick_device(cfg.train.device), init.record["max_len"]
        train = pm_training_pairs(cfg, data, part, harm)
        variant = {"objective": sc.objective, "harmless_weight": sc.harmless_weight, "judgements": len(train),
                   "rank_k": key.get("rank_k")}
        metrics: dict = {}
        counts: dict = {}
        if sc.objective == "lm":  # nothing to train: the init LM scores (stage_scorer)
            record = {"objective": "lm", "lm_stage_dir": init.path.name, "max_len": max_len}
            scorer = LMScorer(init.path, device, max_len, fmt=cfg.data.format)
        else:
            record = {"max_len": max_len}
            model = pm_from_lm(init.path, tok, cfg.stages.seed)
            # LoRA: adapters + the scalar head train, saved merged; trainable_layers: the top + the head
            model = freeze.prepare(model, cfg.model, task="SEQ_CLS", seed=cfg.stages.seed)
            tracker = Tracker(out / "tb", cfg.train.report_to, f"pm-{part}")
            common = dict(cfg=cfg, device=device, max_len=max_len, settings=sc)
            if sc.pmp_path:
                from alignbench.data.hh import load_hh_rlhf
                pmp, _ = load_hh_rlhf(sc.pmp_path, _subsets_in(sc.pmp_path), ["train", "test"], "skip")
                pmp, counts["pmp_dropped_shared_conversation"] = pmp_pairs(cfg, data, part, pmp)
                counts["pmp_pairs"] = len(pmp)
                metrics["pmp"] = train_pm(
                    model, tok, pmp, epochs=sc.pmp_epochs, desc="PM pretraining", **common,
                    log_step=lambda step, **s: tracker.log_step(step, **{f"pmp_{k}": v for k, v in s.items()}))
            metrics["train"] = train_pm(model, tok, train, epochs=sc.epochs, desc=f"PM ({part})",
                                        log_step=tracker.log_step, **common)
            tracker.close()
            lora.save(model.to("cpu"), out)
            tok.save_pretrained(out)
            scorer = PMScorer(out, device, max_len, fmt=cfg.data.format)
        heldout = _score_heldout(scorer, heldout_pairs)
        (out / "heldout_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
        metrics.update(heldout_metrics(heldout))
        if harm:  # what whitening standardises by (alignbench.stages.reward): the eval split's
            # comparisons of its harm group (the test split stays measurement only)
            record["score_stats"] = score_stats(_score_heldout(scorer, whitening_pairs(cfg, harm)))
        if harm == "harmless" and cfg.data.name == "hh_synth":  # measurement: does it only learn "refuse"?
            metrics["edgy_refusal_preference"] = refusal_preference(
                scorer, edgy_refusal_pairs(load_data(pairwise_config(cfg.data)).test))
        return {**record, "metrics": metrics, "variant": variant,
                "data_counts": {"train_pairs": len(train), "judgements": len(train), "heldout_pairs": len(heldout),
                                **({"helpful_mixed": sum(harm_group(p.subset) != "harmless" for p in train)}
                                   if share else {}), **counts}}

    name = REWARD_PM_STAGES[harm] if harm else "pm"
    return build_stage(f"{name}-{part}" if part != "all" else name, key, cfg.paths.cache_dir, build)


def score_stats(heldout: list[dict]) -> dict:
    """Mean and standard deviation of a PM's held-out scores, chosen and rejected together."""
    scores = torch.tensor([r[k] for r in heldout for k in ("score_chosen", "score_rejected")], dtype=torch.float64)
    return {"mean": float(scores.mean()), "std": float(scores.std().clamp_min(1e-6)), "n": len(scores)}


def train_pm(model, tok, comparisons, *, epochs, cfg: Config, device, max_len, desc, log_step,
             settings: PMStageConfig | None = None, features: frozen_trunk.TrunkFeatures | None = None) -> dict:
    """Train ``model`` (a PM) in place on ``comparisons`` (PreferencePairs, ranked or not) with the
    objective and λ of ``settings`` (default ``cfg.stages.pm``): its batch size, lr and max_steps,
    one element per comparison or ranking (``pm_objectives.training_elements``). With
    ``trunk_cache`` on, the frozen trunk runs once per sequence (``features``: kept states to
    share, e.g. across a sweep's PMs from one init; default a fresh cache)."""
    sc = settings or cfg.stages.pm
    if sc.trunk_cache or features is not None:
        features = (features or frozen_trunk.TrunkFeatures(model.to(device))).bound(model)
        with frozen_trunk.reading(model, features):
            out = train_pm(model, tok, comparisons, epochs=epochs, cfg=cfg, device=device, max_len=max_len,
                           desc=desc, log_step=log_step, settings=dataclasses.replace(sc, trunk_cache=False))
        return {**out, "trunk_cache": {"depth": features.depth, "sequences_kept": len(features.kept),
                                       "trunk_passes_saved": features.hits}}
    if sc.objective == "lm":
        raise ValueError("stages.pm.objective=lm has nothing to train (the init LM scores)")
    elements = training_elements(comparisons, sc.objective)
    fmt = cfg.data.format
    if sc.objective == "pairwise" and sc.harmless_weight == 1.0:
        make = lambda idx: pair_batch(tok, elements, idx, max_len, fmt)  # noqa: E731 - today's PM exactly
        loss_fn = pm_loss
    elif sc.objective == "pairwise":
        make = lambda idx: {**pair_batch(tok, elements, idx, max_len, fmt),  # noqa: E731
                            "weights": element_weights([elements[i].subset for i in idx], sc.harmless_weight)}
        loss_fn = pm_loss
    else:
        make = lambda idx: ranked_batch(tok, elements, idx, max_len, fmt, sc.harmless_weight)  # noqa: E731
        loss_fn = ranked_pm_loss if sc.objective == "ranking" else classifier_pm_loss
    batches = batch_schedule(len(elements), sc.batch_size, epochs, cfg.stages.seed, sc.max_steps)
    res = supervised_loop(model, batches, make, loss_fn, sc.lr, desc, cfg.train.grad_clip, device=device,
                          precision=cfg.train.precision, gradient_checkpointing=cfg.train.gradient_checkpointing,
                          log_step=log_step)
    return {"pairs": len(comparisons), "elements": len(elements), "objective": sc.objective, "steps": res.steps,
            "train_tokens": res.tokens, "train_seconds": round(res.seconds, 2),
            "first_loss": res.losses[0], "final_loss": sum(res.losses[-10:]) / len(res.losses[-10:]),
            "losses": [round(x, 5) for x in res.losses]}  # per step: the learning curve (record only)


def heldout_credits(heldout: list[dict]) -> dict:
    """``pm_accuracy.heldout_credit`` of held-out score records (``heldout_scores.jsonl``), grouped
    by harm (helpful / harmless); against gold too where the records carry it (hh_synth)."""
    gold = bool(heldout) and heldout[0].get("gold_chosen") is not None
    return pm_accuracy.heldout_credit(
        [r["score_chosen"] for r in heldout], [r["score_rejected"] for r in heldout],
        [harm_group(r["subset"]) for r in heldout], gold_chosen=[r["gold_chosen"] for r in heldout] if gold else None,
        gold_rejected=[r["gold_rejected"] for r in heldout] if gold else None)


def heldout_metrics(heldout: list[dict]) -> dict:
    """Mean accuracy against the labels (``heldout_accuracy``) and, on hh_synth, against gold
    (``heldout_gold_accuracy``), overall and per harm group (``_helpful``, ``_harmless``)."""
    return {metric + ("" if group == "all" else f"_{group}"): float(c.mean())
            for (metric, group), c in heldout_credits(heldout).items() if c.size}


def _score_heldout(scorer: PMScorer, pairs) -> list[dict]:
    rc, rr = [], []
    for i in tqdm(range(0, len(pairs), 256), desc="PM held-out scores", leave=False):
        chosen, rejected = scorer.score_pairs(pairs[i:i + 256])
        rc += chosen.tolist()
        rr += rejected.tolist()
    return [{"score_chosen": c, "score_rejected": r, "n_turns": p.n_turns, "subset": p.subset,
             "gold_chosen": p.meta.get("gold_chosen"), "gold_rejected": p.meta.get("gold_rejected")}
            for p, c, r in zip(pairs, rc, rr)]


def _subsets_in(path) -> list[str]:
    from pathlib import Path
    return sorted(d.name for d in Path(path).iterdir() if d.is_dir())
