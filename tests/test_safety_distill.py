"""Targeted safety context distillation (Llama 2 §4.2.4, alignbench.stages.safety_distill): the
targeting rule, the student's loss mask, the preprompts, the bad input and a tiny stage build."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.data import load_data
from alignbench.data.synth import gold_parts
from alignbench.data.types import harm_group
from alignbench.report.load import RunRecord, Sweep
from alignbench.report.render import Table, to_markdown
from alignbench.report.safety_distill import findings, safety_distill_blocks, safety_frame, variant_frame
from alignbench.stages.graph import build_shared_stages
from alignbench.stages.prompts import GENERIC_SAFETY_PREPROMPT, RISK_TEMPLATES, safety_preprompt
from alignbench.stages.safety_distill import (ANSWERS, distill_prompts, gain_by_bin, null_answers,
                                              pi0_safety_record, student_examples, targeted_keep)
from alignbench import train
from alignbench.models import load_lm
from alignbench.encoding import pad_batch
from alignbench.train import lm_loss


def test_targeted_rule_keeps_exactly_the_distilled_answers_the_safety_pm_prefers():
    distilled = [2.0, -1.0, 0.5, 0.3, -3.0]
    undistilled = [1.0, 0.0, 0.5, -0.2, -2.0]
    # strictly above: index 2 is a tie and keeps π0's own answer
    assert targeted_keep(distilled, undistilled) == [True, False, False, True, False]
    assert targeted_keep(torch.tensor(distilled), torch.tensor(undistilled)) == [True, False, False, True, False]


def test_student_sees_the_prompt_without_preprompt_and_learns_only_the_kept_answer(monkeypatch):
    preprompt_ids = [90, 91, 92]
    prompt = [5, 6, 7]
    enc = student_examples([prompt, prompt], distilled_ids=[[8, 9, 2], [11]], undistilled_ids=[[10, 2], [12, 13]],
                           keep=[True, False])
    assert [e.input_ids for e in enc] == [[5, 6, 7, 8, 9, 2], [5, 6, 7, 12, 13]]
    assert all(e.response_start == 3 for e in enc)
    assert not any(t in e.input_ids for e in enc for t in preprompt_ids)
    batch = pad_batch(enc, pad_id=0)
    assert batch["response_mask"].int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]

    # lm_loss = mean −log p over the answer tokens only: a model whose logits are a learned table
    # per position gets gradient exactly at the positions predicting answer tokens (2..4 and 2..3)
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(6, 100))

        def forward(self, input_ids, attention_mask=None, **_):
            return self.logits[None, : input_ids.shape[1]].expand(len(input_ids), -1, -1)

    def logprobs(m, ids, attn, positions, **kw):  # the Table has no LM head: log p from its logits
        logp = torch.log_softmax(m(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return logp * positions, None, None

    monkeypatch.setattr(train, "selected_logprobs", logprobs)
    model = Table()
    loss = lm_loss(model, batch)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=1e-6)  # uniform: log V
    loss.backward()
    touched = (model.logits.grad.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [2, 3, 4]  # positions 0, 1 (prompt targets) and 5 (nothing after) get none


def test_preprompt_texts_by_variant():
    assert safety_preprompt("none") is None
    generic, template = safety_preprompt("generic"), safety_preprompt("template")
    assert generic == GENERIC_SAFETY_PREPROMPT and generic.count(".") == 1 and "harm" in generic
    assert template.startswith(generic) and len(template) > len(generic)
    assert [c for c, _ in RISK_TEMPLATES] == ["violence", "theft", "poisoning", "break-in", "cruelty"]
    for _, text in RISK_TEMPLATES:
        assert text in template and text.startswith("If asked")


def test_gain_by_bin_known_answer():
    scores = [0.4, 0.1, 0.3, 0.2, 0.8, 0.6, 0.5, 0.7]
    undistilled = [4.0, 1.0, 3.0, 2.0, 8.0, 6.0, 5.0, 7.0]
    distilled = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    resampled = [4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 7.0]
    bins = gain_by_bin(scores, undistilled, distilled, resampled, n_bins=4)
    assert [(b["lo"], b["hi"], b["n"]) for b in bins] == [(0.1, 0.2, 2), (0.3, 0.4, 2), (0.5, 0.6, 2), (0.7, 0.8, 2)]
    assert [b["gold_undistilled"] for b in bins] == [1.5, 3.5, 5.5, 7.5]
    assert [b["gain"] for b in bins] == [-0.5, -2.5, -4.5, -6.5]
    assert [b["null_gain"] for b in bins] == [0.0, 0.0, -3.0, -4.0]


def test_null_answers_apply_the_keep_rule_to_the_resample():
    undistilled, resampled = ["u0", "u1", "u2"], ["r0", "r1", "r2"]
    assert null_answers(resampled, undistilled, [True, False, True]) == ["r0", "u1", "r2"]
    assert null_answers([1.0, 2.0], [3.0, 4.0], [False, False]) == [3.0, 4.0]


def test_targeted_gain_matches_its_null_when_the_preprompt_does_nothing():
    """Issue 24 §1.1: a preprompt with no effect (the distilled answer is just another sample of
    π0's) must show no gain against the null. The targeted arm is a safety-PM-filtered best-of-2,
    so its null is the same filter on a resample; an unfiltered resample would make targeting
    "beat the null" by the filter alone."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    quality = lambda: torch.randn(n, generator=gen)  # noqa: E731  gold of one sample of π0's answer
    gu, gd, gr = quality(), quality(), quality()  # undistilled, "distilled" (no effect), resampled
    pm = lambda g: g + torch.randn(n, generator=gen)  # noqa: E731  a noisy safety PM
    su, sd, sr = pm(gu), pm(gd), pm(gr)
    keep = targeted_keep(sd, su)
    kept = [d if k else u for d, u, k in zip(gd.tolist(), gu.tolist(), keep)]  # the targeted arm's kept answers
    filtered = null_answers(gr.tolist(), gu.tolist(), targeted_keep(sr, su))
    top = gain_by_bin(gu.tolist(), gu.tolist(), kept, filtered)[-1]
    plain = gain_by_bin(gu.tolist(), gu.tolist(), kept, gr.tolist())[-1]
    assert top["gain"] == pytest.approx(top["null_gain"], abs=0.05)  # no effect: gain ≈ its null
    assert top["gain"] - plain["null_gain"] > 0.5  # against the unfiltered null, a spurious "win"


def test_distill_prompts_are_adversarial_only_by_default(tiny_overrides):
    """Llama 2 §4.2.4 distils the safety context on adversarial prompts: by default every
    distillation prompt is a harmless-subset (harmful) request (issue 24 §1.2)."""
    cfg = to_config(compose(tiny_overrides + ["stages.pi0.safety_prompts=40"]))
    assert cfg.stages.pi0.safety_prompt_pool == "adversarial"
    data = load_data(cfg.data)
    prompts, harmless = distill_prompts(cfg, data)
    subset = {p.prompt: harm_group(p.subset) == "harmless" for p in data.train}
    assert len(prompts) == len(set(prompts)) == 40 and harmless == [True] * 40
    assert all(subset[p] for p in prompts)
    assert distill_prompts(cfg, data) == (prompts, harmless)  # seeded
    # more prompts asked than there are harmful ones: all of them, none other
    n_harm = len({p.prompt for p in data.train if harm_group(p.subset) == "harmless"})
    big = to_config(compose(tiny_overrides + [f"stages.pi0.safety_prompts={10 * n_harm}"]))
    assert len(distill_prompts(big, data)[0]) <= n_harm and all(distill_prompts(big, data)[1])


def test_distill_prompts_mixed_take_half_from_the_harmless_subsets(tiny_overrides):
    cfg = to_config(compose(tiny_overrides + ["stages.pi0.safety_prompts=40", "stages.pi0.safety_prompt_pool=mixed"]))
    data = load_data(cfg.data)
    prompts, harmless = distill_prompts(cfg, data)
    assert len(prompts) == len(set(prompts)) == 40 and sum(harmless) == 20
    subset = {p.prompt: harm_group(p.subset) == "harmless" for p in data.train}
    assert [subset[p] for p in prompts] == harmless
    assert distill_prompts(cfg, data) == (prompts, harmless)  # seeded


@pytest.mark.parametrize("overrides, key", [
    (["stages.pi0.safety_targeted=true"], "stages.pi0.safety_targeted"),
])
def test_bad_input_fails_before_training(tiny_overrides, tmp_path, overrides, key):
    cfg = to_config(compose(tiny_overrides + [f"paths.cache_dir={tmp_path / 'cache'}", *overrides]))
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_shared_stages(cfg)
    assert not (tmp_path / "cache" / "stages").exists() or not any((tmp_path / "cache" / "stages").iterdir())


def _build(tiny_overrides, *extra):
    cfg = to_config(compose(tiny_overrides + ["stages.pi0.safety_prompts=48", "stages.pi0.safety_epochs=1", *extra]))
    return cfg, build_shared_stages(cfg)


def test_targeted_stage_build_records_counts_and_follows_the_rule(tiny_overrides):
    # generic: the tiny tokenizer makes the template preprompt 243 tokens, more than the 240-token prompt
    # window, which now fails naming stages.pi0.safety_preprompt instead of cutting it (issue 24 §1.3)
    cfg, st = _build(tiny_overrides, "stages.pi0.safety_preprompt=generic", "stages.pi0.safety_targeted=true")
    assert st.pi0.stage == "pi0-safety" and st.safety_pm is not None
    assert st.pi0.record["upstream"] == {"pi0": st.pm.record["upstream"]["pi0"], "safety_pm": st.safety_pm.key}
    m = st.pi0.record["metrics"]
    assert m["prompts"] == 48 and m["harmless_subset_prompts"] == 48  # adversarial prompts only
    assert m["kept_distilled"] + m["kept_undistilled"] == 48 and m["steps"] == 2  # ⌈48 / 32⌉ batches
    rows = [json.loads(line) for line in (st.pi0.path / ANSWERS).read_text().splitlines()]
    assert len(rows) == 48
    # the kept answer is the distilled one exactly where the safety PM scores it above π0's own
    assert [r["kept"] == "distilled" for r in rows] == targeted_keep([r["safety_pm_distilled"] for r in rows],
                                                                     [r["safety_pm_undistilled"] for r in rows])
    assert sum(r["kept"] == "distilled" for r in rows) == m["kept_distilled"]
    gold = m["gold"]
    assert sum(b["n"] for b in gold["bins_by_gold"]) == 48 == sum(b["n"] for b in gold["bins_by_safety_pm"])
    assert all(b["null_gain"] is not None for b in gold["bins_by_gold"])
    # the null applies the targeted rule to the resample: it replaces π0's answer only where the
    # safety PM scores the resample strictly above π0's own answer (issue 24 §1.1)
    keep_null = targeted_keep([r["safety_pm_resampled"] for r in rows], [r["safety_pm_undistilled"] for r in rows])
    assert gold["null"]["kept_resampled"] == sum(keep_null) < 48
    null = [gold_parts(r["prompt"], r["resampled"] if k else r["undistilled"]).total - gold_parts(r["prompt"], r["undistilled"]).total
            for r, k in zip(rows, keep_null)]
    assert sum(b["null_gain"] * b["n"] for b in gold["bins_by_gold"]) == pytest.approx(sum(null))
    # the bins compare what the student trains on (the kept answer) with π0's own, measured by gold
    kept = [gold_parts(r["prompt"], r[r["kept"]]).total for r in rows]
    assert gold["total_kept"] == pytest.approx(sum(kept) / 48)
    assert sum(b["gold_distilled"] * b["n"] for b in gold["bins_by_gold"]) == pytest.approx(sum(kept))
    assert sum(k["kept_distilled"] for k in gold["kept_by_kind"].values()) == m["kept_distilled"]
    assert pi0_safety_record(cfg, st.pi0) == {"preprompt": "generic", "targeted": True, "stage": m}
    # the student differs from the HHH π0 it started from
    hhh_dir = st.pi0.path.parent / f"pi0-{st.pi0.record['upstream']['pi0']}"
    a, b = load_lm(hhh_dir).state_dict(), load_lm(st.pi0.path).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_untargeted_keeps_every_distilled_answer_and_none_is_pi0_itself(tiny_overrides):
    cfg, st = _build(tiny_overrides, "stages.pi0.safety_preprompt=generic")
    assert st.safety_pm is None  # untargeted needs no safety PM
    m = st.pi0.record["metrics"]
    assert m["kept_distilled"] == 48 and m["kept_undistilled"] == 0
    rows = [json.loads(line) for line in (st.pi0.path / ANSWERS).read_text().splitlines()]
    assert all(r["kept"] == "distilled" and r["safety_pm_distilled"] is None for r in rows)
    # the stage's preprompt changes what π0 answers on some prompt (the same random stream otherwise)
    assert any(r["distilled"] != r["undistilled"] for r in rows)
    cfg0, none = _build(tiny_overrides)
    assert none.pi0.stage == "pi0" and none.pi0.key == st.pm.record["upstream"]["pi0"]
    assert pi0_safety_record(cfg0, none.pi0) == {"preprompt": "none", "targeted": False, "stage": None}


def _report_sweep(tmp_path):
    bins = [{"lo": 0.0, "hi": 1.0, "n": 2, "gold_undistilled": 0.5, "gold_distilled": 0.7, "gain": 0.2},
            {"lo": 1.5, "hi": 2.0, "n": 2, "gold_undistilled": 1.8, "gold_distilled": 0.6, "gain": -1.2,
             "null_gain": -0.4}]
    stage = {"prompts": 4, "kept_distilled": 4, "kept_undistilled": 0,
             "gold": {"bins_by_gold": bins, "kept_by_kind": {"harmful": {"n": 2, "kept_distilled": 2}}}}
    runs = []
    for config, pre, targeted, st in (("cd_none", "none", False, None), ("cd_gen", "generic", False, stage),
                                      ("cd_gen_t", "generic", True, {**stage, "kept_distilled": 3})):
        for seed in (0, 1):
            runs.append(RunRecord(f"{config}_s{seed}", "context_distilled", seed, tmp_path, config=config,
                                  metrics={"pi0_safety": {"preprompt": pre, "targeted": targeted, "stage": st}}))
    runs.append(RunRecord("ppo_s0", "ppo", 0, tmp_path, config="ppo", metrics={}))
    # false refusals: none 0.15 [0.1, 0.2], untargeted 0.45 [0.4, 0.5] (worse), targeted 0.18 [0.12, 0.25]
    values = {"cd_none": 0.15, "cd_gen": 0.45, "cd_gen_t": 0.18}
    rows = [{"config": c, "evaluator": "safety", "metric": "false_refusal_rate", "slice": "heldout", "value": v,
             "ci_low": v - 0.05 - (0.01 if c == "cd_gen_t" else 0), "ci_high": v + 0.05 + (0.02 if c == "cd_gen_t" else 0),
             "n": 40, "n_seeds": 2} for c, v in values.items()]
    rows += [{"config": c, "evaluator": "safety", "metric": "gold_helpful", "slice": "heldout", "value": 1.0,
              "ci_low": 0.8, "ci_high": 1.2, "n": 90, "n_seeds": 2} for c in values]
    return Sweep("s", tmp_path, runs), pd.DataFrame(rows)


def test_report_section_names_variants_and_measures_the_finding(tmp_path):
    sweep, agg = _report_sweep(tmp_path)
    variants = variant_frame(sweep)
    assert list(variants["variant"]) == ["none", "generic, untargeted", "generic, targeted"]
    said = findings(variants, safety_frame(agg, variants))
    assert "false-refusal rate 0.150 → 0.450: worse" in said[0] and "gold helpful 1.000 → 1.000: no clear" in said[0]
    assert ("top quarter by gold) the kept answers changed gold by -1.200, against -0.400 for the null, a second "
            "sample of π0's own answer kept always, as the untargeted arm keeps the distilled one") in said[0]
    assert said[0].endswith("-0.800 that the preprompt itself made.")
    assert "against -0.400 for the null, a second sample of π0's own answer kept where the safety PM prefers" in said[1]
    assert "false-refusal rate 0.150 → 0.180: no clear change" in said[1]
    assert said[2] == ("generic: untargeted distillation hurt answers that were already good (false-refusal rate "
                       "worse than without it), as Llama 2 found; targeting avoided it for false-refusal rate.")
    blocks = safety_distill_blocks(sweep, agg)
    tables = [b for b in blocks if isinstance(b, Table)]
    assert tables[0].rows[1][:5] == ["generic, untargeted", "–", "1.000 [0.800, 1.200]", "–", "0.450 [0.400, 0.500]"]
    assert tables[0].rows[2][6] == "3/4 (harmful 2/2)"
    assert len(tables[1].rows) == 4 and tables[1].rows[1][-2:] == ["-1.200", "-0.400"]
    assert "Targeted safety context distillation" in to_markdown(blocks)
    # a sweep without a distilled variant gets no section
    sweep.runs = [r for r in sweep.runs if r.config in ("cd_none", "ppo")]
    assert safety_distill_blocks(sweep, agg) == []
