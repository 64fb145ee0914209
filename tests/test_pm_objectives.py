"""PM objectives (issue 13 §2, §3): hh_synth's ranked data, the ranking / pairwise / classifier
losses and λ against hand-computed values, the judgement subsample, the LM scorer, and the PM stage
scoring every variant on one held-out set."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.data import load_data, pairwise_config
from alignbench.data.synth import SynthConfig, generate_hh_synth, gold_reward, gumbel_ranking, spurious_count
from alignbench.stages import pm_objectives as po


def _nll(d: float) -> float:
    """−log σ(d), by hand."""
    return math.log1p(math.exp(-d))


# ----------------------------------------------------------------------------- ranked hh_synth data


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_ranking_orders_each_pair_with_its_bradley_terry_probability(temperature):
    """Over 1500 prompts × C(5,2) pairs: the share of pairs the annotator ranks in gold order equals
    the analytic mean of σ(Δu / T) (Δu: the gold-better minus the gold-worse response's annotator
    utility, gold + s·phrases), within 4 standard errors of per-prompt sums (pairs of one prompt share
    a draw), and the agreement falls with T."""
    cfg = SynthConfig(n_pairs=1500, rank_k=5, noise_temperature=temperature)
    diffs, agree, total = [], 0.0, 0
    for pair in generate_hh_synth(cfg):
        ranked = pair.meta["ranked"]
        assert len(set(ranked)) == 5 and (pair.chosen, pair.rejected) == (ranked[0], ranked[-1])
        gold = [gold_reward(pair.prompt, r) for r in ranked]
        assert gold == pair.meta["gold_ranked"]
        u = [g + cfg.spurious_strength * spurious_count(r) for g, r in zip(gold, ranked)]
        d = 0.0
        for i in range(5):
            for j in range(i + 1, 5):  # i is ranked above j
                if gold[i] == gold[j]:
                    continue
                better, worse = (i, j) if gold[i] > gold[j] else (j, i)
                expected = 1 / (1 + math.exp(-(u[better] - u[worse]) / temperature))
                d += (gold[i] > gold[j]) - expected
                agree += gold[i] > gold[j]
                total += 1
        diffs.append(d)
    diffs = np.array(diffs)
    z = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(len(diffs)))
    assert abs(z) < 4, f"observed agreement departs from Σσ(Δu/T) by z={z:.2f}"
    share = agree / total
    assert (share > 0.80) if temperature == 0.5 else (0.6 < share < 0.75)


def test_gumbel_ranking_pair_marginal_is_logistic():
    """Known answer on fixed utilities: P(item 0 above item 1) = σ((u0 − u1)/T) among four items."""
    rng = random.Random(0)
    u, t, n = [1.0, 0.0, 0.5, -2.0], 0.7, 20000
    hits = sum(r.index(0) < r.index(1) for r in (gumbel_ranking(u, t, rng) for _ in range(n)))
    p = 1 / (1 + math.exp(-1.0 / t))
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_ranked_data_keeps_prompts_and_splits_of_the_pairwise_data():
    pairwise = to_config(compose(["data.synth.n_pairs=400"])).data
    ranked = to_config(compose(["data.synth.n_pairs=400", "data.synth.rank_k=6"])).data
    a, b = load_data(pairwise), load_data(ranked)
    for split in ("train", "eval", "test"):
        assert [p.prompt for p in a.splits[split]] == [p.prompt for p in b.splits[split]]
    assert all(len(p.meta["ranked"]) == 6 for p in b.train)
    assert pairwise_config(ranked) == pairwise


@pytest.mark.parametrize("override, key", [
    ("data.synth.rank_k=1", "data.synth.rank_k"), ("data.synth.rank_k=3", "data.synth.rank_k"),
    ("data.synth.rank_k=10", "data.synth.rank_k"), ("stages.pm.harmless_weight=-0.5", "stages.pm.harmless_weight"),
    ("stages.pm.objective=hinge", "stages.pm.objective"), ("stages.pm.judgements=0", "stages.pm.judgements"),
])
def test_bad_pm_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        to_config(compose([override]))
    assert str(e.value).startswith(key)


# ----------------------------------------------------------------------------- losses


def test_ranking_loss_is_the_mean_of_its_pairwise_losses():
    """InstructGPT eq. 1 on a hand-written ranking of 4 (best→worst) with hand-picked scores."""
    scores = [2.0, 0.5, 1.0, -1.0]
    by_hand = [_nll(scores[i] - scores[j]) for i in range(4) for j in range(i + 1, 4)]
    loss = po.ranking_loss(torch.tensor([scores]), torch.ones(1, 4, dtype=torch.bool), torch.ones(1))
    assert len(by_hand) == 6 and loss.item() == pytest.approx(sum(by_hand) / 6, rel=1e-6)
    # each pair as its own element (the "shuffled pairs" ablation) gives the same mean
    chosen = torch.tensor([scores[i] for i in range(4) for j in range(i + 1, 4)])
    rejected = torch.tensor([scores[j] for i in range(4) for j in range(i + 1, 4)])
    assert po.pairwise_loss(chosen, rejected, torch.ones(6)).item() == pytest.approx(loss.item(), rel=1e-6)


def test_ranking_loss_mixes_rankings_of_different_sizes_and_weights():
    """Two elements, K = 3 (padded to 4) and K = 2, weights 1 and λ = 0.5: (ℓ1 + 0.5 ℓ2) / 2."""
    s1, s2 = [0.3, -0.2, 0.9], [1.5, 0.1]
    l1 = (_nll(s1[0] - s1[1]) + _nll(s1[0] - s1[2]) + _nll(s1[1] - s1[2])) / 3
    l2 = _nll(s2[0] - s2[1])
    scores = torch.tensor([s1 + [0.0], s2 + [0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss = po.ranking_loss(scores, valid, torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx((l1 + 0.5 * l2) / 2, rel=1e-6)


def test_ranking_loss_of_pairs_is_the_pairwise_loss():
    c, r = torch.randn(16, generator=torch.Generator().manual_seed(0)), torch.randn(16)
    ranked = po.ranking_loss(torch.stack([c, r], 1), torch.ones(16, 2, dtype=torch.bool), torch.ones(16))
    assert ranked.item() == pytest.approx(po.pairwise_loss(c, r, torch.ones(16)).item(), rel=1e-6)


def test_unit_harmless_weight_is_todays_pm_loss_exactly():
    """λ = 1: every weight 1, the same number as today's −log σ(r_c − r_r) averaged, bit for bit."""
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(32, generator=g), torch.randn(32, generator=g)
    subsets = ["hh_synth/harmless", "hh_synth/helpful"] * 16
    w = po.element_weights(subsets, 1.0)
    assert torch.equal(po.pairwise_loss(c, r, w), -F.logsigmoid(c - r).mean())


def test_harmless_weight_scales_the_harmless_losses():
    """L = (Σ_helpful ℓ + λ Σ_harmless ℓ) / B; λ = 0 ignores harmless comparisons."""
    c, r = torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.0, 0.5, 0.4])
    subsets = ["helpful-base", "harmless-base", "hh_synth/harmless"]
    ell = [_nll(1.0), _nll(-1.0), _nll(-0.2)]
    for lam in (0.0, 0.25, 3.0):
        got = po.pairwise_loss(c, r, po.element_weights(subsets, lam)).item()
        assert got == pytest.approx((ell[0] + lam * (ell[1] + ell[2])) / 3, rel=1e-6)


def test_classifier_loss_by_hand():
    """K = 3: top = good, bottom = bad, the middle one unlabelled; plus a pair (good, bad)."""
    assert po.classifier_labels(3) == [1.0, -1.0, 0.0] and po.classifier_labels(4) == [1.0, 1.0, 0.0, 0.0]
    scores = torch.tensor([[2.0, 7.0, -1.0], [0.5, 0.3, 0.0]])
    labels = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])

    def bce(s, y):
        p = 1 / (1 + math.exp(-s))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))
    l1, l2 = (bce(2.0, 1) + bce(-1.0, 0)) / 2, (bce(0.5, 1) + bce(0.3, 0)) / 2
    got = po.classifier_loss(scores, labels, torch.tensor([1.0, 2.0])).item()
    assert got == pytest.approx((l1 + 2 * l2) / 2, rel=1e-6)


def test_training_elements_and_judgements():
    pairs = generate_hh_synth(SynthConfig(n_pairs=50, rank_k=4))
    ranking = po.training_elements(pairs, "ranking")
    shuffled = po.training_elements(pairs, "pairwise")
    assert len(ranking) == 50 and len(shuffled) == 50 * 6
    assert shuffled[:6] == po.sub_pairs(ranking[0])
    r = pairs[0].meta["ranked"]
    assert [e.responses for e in shuffled[:3]] == [(r[0], r[1]), (r[0], r[2]), (r[0], r[3])]
    ten, twenty = po.first_judgements(pairs, 10, seed=0), po.first_judgements(pairs, 20, seed=0)
    assert len(ten) == 10 and set(map(id, ten)) <= set(map(id, twenty))  # nested: label efficiency shares labels
    assert po.first_judgements(pairs, 10, seed=0) == ten and po.first_judgements(pairs, 10, seed=1) != ten
    assert po.first_judgements(pairs, None, seed=0) == pairs


def test_ranked_batch_places_each_response_in_its_score_matrix():
    elements = [po.Ranked("p", ("a", "b", "c"), "hh_synth/helpful"), po.Ranked("q", ("d", "e"), "hh_synth/harmless")]
    batch = {"group": torch.tensor([0, 0, 0, 1, 1]), "position": torch.tensor([0, 1, 2, 0, 1]),
             "weights": po.element_weights([e.subset for e in elements], 0.5)}
    mat, valid = po.score_matrix(torch.arange(5.0), batch)
    assert mat.tolist() == [[0, 1, 2], [3, 4, 0]] and valid.tolist() == [[True] * 3, [True, True, False]]
    assert batch["weights"].tolist() == [1.0, 0.5]


# ----------------------------------------------------------------------------- the PM stage


def test_pm_variants_train_and_score_on_one_heldout_set(tiny_overrides):
    """A ranking PM on ranked data (200 judgements) and the untrained LM scorer: both are scored on
    the pairwise test comparisons; the LM scorer's score is log p(response | prompt) under π0."""
    from alignbench.models import load_lm, load_tokenizer
    from alignbench.stages.graph import build_shared_stages
    from alignbench.stages.preference import LMScorer, PMScorer, stage_scorer
    from alignbench.encoding import encode, pad_batch
    from alignbench.train import response_logprobs

    ranked = to_config(compose(tiny_overrides + ["data.synth.rank_k=4", "stages.pm.objective=ranking",
                                                 "stages.pm.judgements=200", "stages.pm.batch_size=8"]))
    st = build_shared_stages(ranked)
    rec = st.pm.record
    assert rec["variant"] == {"objective": "ranking", "harmless_weight": 1.0, "judgements": 200, "rank_k": 4}
    assert rec["metrics"]["train"]["elements"] == 200 and rec["metrics"]["train"]["steps"] == 25
    test = load_data(pairwise_config(ranked.data)).test
    assert rec["data_counts"]["heldout_pairs"] == len(test)
    assert 0 <= rec["metrics"]["heldout_gold_accuracy_harmless"] <= 1
    assert isinstance(stage_scorer(st.pm), PMScorer) and not isinstance(stage_scorer(st.pm), LMScorer)

    lm_cfg = to_config(compose(tiny_overrides + ["stages.pm.objective=lm"]))
    lm = build_shared_stages(lm_cfg)
    assert lm.pi0.key == st.pi0.key  # rank_k changes only the PM
    assert lm.pm.record["data_counts"]["heldout_pairs"] == len(test)
    scorer = stage_scorer(lm.pm)
    assert isinstance(scorer, LMScorer)
    p = test[0]
    tok, model = load_tokenizer(lm.pi0.path), load_lm(lm.pi0.path).eval()
    with torch.no_grad():
        want = response_logprobs(model, pad_batch([encode(tok, p.prompt, p.chosen, scorer.max_len)], tok.pad_token_id))[0]
    assert scorer.score([p.prompt], [p.chosen]).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    assert scorer.calls == 1


# ----------------------------------------------------------------------------- the report section


def _pm_run(root, run_id, label, variant, credits):
    """A context_distilled run of the fake sweep whose PM rows (``config`` = the PM's label) hold
    held-out credits with known means."""
    from alignbench.eval import pm_accuracy
    from alignbench.eval.stats import read_rows, write_rows
    from tests.test_report import write_run
    write_run(root, run_id, "context_distilled", 0)
    run = root / "runs" / run_id
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "pm": {"label": label, **variant}}))
    ident = dict(sweep="fake", run=f"pm-{run_id}", method="pm", config=label, seed=0)
    rows = pm_accuracy.heldout_rows({k: np.asarray(v, float) for k, v in credits.items()}, n_boot=500, boot_seed=0,
                                    **ident)
    write_rows(run / "results.csv", pd.concat([read_rows(run / "results.csv"), pd.DataFrame(rows)]))
    return run_id


def _credits(acc_all, acc_helpful, acc_harmless, n=200):
    def ones(p, m):
        return [1.0] * round(p * m) + [0.0] * (m - round(p * m))
    return {("heldout_gold_accuracy", "all"): ones(acc_all, n), ("heldout_gold_accuracy", "helpful"):
            ones(acc_helpful, n // 2), ("heldout_gold_accuracy", "harmless"): ones(acc_harmless, n // 2)}


def test_report_section_compares_pm_variants(tmp_path):
    from alignbench.report.build import build_report
    root = tmp_path / "fake"
    variants = [  # label, settings, (all, helpful, harmless)
        ("pm[judgements=200]", dict(objective="pairwise", rank_k=None, harmless_weight=1.0, judgements_used=200),
         (0.60, 0.62, 0.58)),
        ("pm[objective=ranking, judgements=200, K=4]",
         dict(objective="ranking", rank_k=4, harmless_weight=1.0, judgements_used=200), (0.90, 0.9, 0.9)),
        ("pm[objective=classifier, judgements=200, K=4]",
         dict(objective="classifier", rank_k=4, harmless_weight=1.0, judgements_used=200), (0.88, 0.9, 0.86)),
        ("pm[λ=0, judgements=200]", dict(objective="pairwise", rank_k=None, harmless_weight=0.0,
                                         judgements_used=200), (0.55, 0.70, 0.40)),
    ]
    runs = [_pm_run(root, f"cd-{i}", label, v, _credits(*acc)) for i, (label, v, acc) in enumerate(variants)]
    (root / "index.json").write_text(json.dumps({"runs": [dict(run_id=r, method="context_distilled", seed=0,
                                                                config=f"context_distilled_cfg-{r}", status="done",
                                                                dir=f"runs/{r}") for r in runs]}))
    md = build_report(root, tmp_path / "out", n_boot=200).read_text()
    section = md[md.index("## PM objectives"):md.index("## Win rates")].replace("\\[", "[").replace("\\]", "]")
    assert "| ranking | 4 | 1 | 200 | gold | 0.900 [" in section
    assert "| pairwise | 2 | 0 | 200 | gold | 0.550 [" in section
    # ranking (0.90) against classifier (0.88) on 200 pairs: the bootstrap intervals overlap
    assert "At 200 judgements, ranking (K=4) scores highest (0.900), but its interval overlaps classifier's" in section
    # λ table: the pairwise family swept over λ = 0 and 1
    assert "| pairwise | 2 | 200 | 0 | gold | 0.700 [" in section and "0.400 [" in section
    assert (tmp_path / "out" / "pm_label_efficiency.png").exists()
    assert (tmp_path / "out" / "pm_harmless_weight.png").exists()


def test_report_section_needs_two_pm_variants(tmp_path):
    from alignbench.report.build import build_report
    root = tmp_path / "fake"
    run = _pm_run(root, "cd-0", "pm", dict(objective="pairwise", rank_k=None, harmless_weight=1.0,
                                            judgements_used=960), _credits(0.7, 0.7, 0.7))
    (root / "index.json").write_text(json.dumps({"runs": [dict(run_id=run, method="context_distilled", seed=0,
                                                                status="done", dir=f"runs/{run}")]}))
    assert "## PM objectives" not in build_report(root, tmp_path / "out", n_boot=200).read_text()


def test_too_many_judgements_fail_before_any_stage_trains(tmp_path):
    from alignbench.stages.graph import build_shared_stages
    cfg = to_config(compose(["data.synth.n_pairs=100", "stages.pm.judgements=5000",
                             f"paths.cache_dir={tmp_path / 'cache'}"]))
    with pytest.raises(ConfigError, match=r"^stages.pm.judgements: 5000 exceeds the \d+ training comparisons"):
        build_shared_stages(cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("objective, weight", [("classifier", 1.0), ("pairwise", 0.5), ("ranking", 2.0)])
def test_train_pm_runs_each_objective_on_ranked_pairs(tiny_config, objective, weight):
    """``train_pm`` (the iterated-RLHF entry point) on 12 rankings of 4: one element per ranking, or
    per sub-pair for pairwise; the loss is finite and falls (deterministic on CPU)."""
    import dataclasses

    from alignbench.models import load_tokenizer, pm_from_lm
    from alignbench.stages.graph import build_shared_stages
    from alignbench.stages.preference import train_pm
    st = build_shared_stages(tiny_config)
    tok = load_tokenizer(st.pi0.path)
    pairs = generate_hh_synth(SynthConfig(n_pairs=12, rank_k=4))
    settings = dataclasses.replace(tiny_config.stages.pm, objective=objective, harmless_weight=weight,
                                   batch_size=4 if objective != "pairwise" else 24, lr=3e-3)
    model = pm_from_lm(st.pi0.path, tok, 0)
    res = train_pm(model, tok, pairs, epochs=4, cfg=tiny_config, device="cpu", max_len=128, desc="pm", log_step=None,
                   settings=settings)
    n_elements = 12 * 6 if objective == "pairwise" else 12
    assert res["elements"] == n_elements and res["steps"] == 12
    assert all(math.isfinite(x) for x in res["losses"])
    assert np.mean(res["losses"][-3:]) < np.mean(res["losses"][:3])
