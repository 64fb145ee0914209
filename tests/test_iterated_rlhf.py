"""Online iterated RLHF: the simulated annotator, the own-samples check, config errors, and tiny
end-to-end runs (labels bought per round, the PM retrained on all comparisons, budget stop, resume)."""
from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest

from alignbench.cli import compose
from alignbench.config import ConfigError
from alignbench.data.annotator import SynthAnnotator, bt_draws, expected_gold_agreement
from alignbench.data.synth import SynthConfig, generate_hh_synth, gold_reward
from alignbench.runner import run_job, validate
from alignbench_methods.iterated_rlhf import (IteratedRLHFConfig, inner_method_config, own_sample_accuracy, regime,
                                              static_equivalent)
from tests.conftest import TINY


def _agreement(gold_a, gold_b, labels) -> tuple[float, int]:
    """Share of labels (True: a preferred) that order a gold-untied pair like gold, and the count."""
    hits = [(ga > gb) == pa for ga, gb, pa in zip(gold_a, gold_b, labels) if ga != gb]
    return sum(hits) / len(hits), len(hits)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_annotator_agreement_with_gold_matches_its_temperature(temperature):
    """Spurious-free Bradley–Terry labels agree with gold at mean σ(|Δgold|/T), within 4 SE."""
    rng = random.Random(1)
    gold_a = [rng.gauss(0, 1) for _ in range(20_000)]
    gold_b = [rng.gauss(0, 1) for _ in range(20_000)]
    got, n = _agreement(gold_a, gold_b, bt_draws(gold_a, gold_b, temperature, seed="t"))
    want = expected_gold_agreement(gold_a, gold_b, temperature)
    assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n), (got, want)
    # and the two temperatures differ by far more than that: the test can tell them apart
    other = expected_gold_agreement(gold_a, gold_b, 4 * temperature)
    assert want - other > 0.05


def test_synth_annotator_on_hh_synth_responses_matches_temperature_and_is_exact_at_low_t():
    pairs = generate_hh_synth(SynthConfig(n_pairs=3000, seed=3))
    prompts, a, b = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    gold_a = [gold_reward(p, r) for p, r in zip(prompts, a)]
    gold_b = [gold_reward(p, r) for p, r in zip(prompts, b)]
    subsets = [p.subset for p in pairs]
    for t in (1.0, 3.0):
        labelled = SynthAnnotator(t, spurious_strength=0.0)(prompts, a, b, subsets, seed="s")
        hits = [lp.meta["gold_chosen"] > lp.meta["gold_rejected"] for lp in labelled
                if lp.meta["gold_chosen"] != lp.meta["gold_rejected"]]
        got, want = sum(hits) / len(hits), expected_gold_agreement(gold_a, gold_b, t)
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / len(hits)), (t, got, want)
    sharp = SynthAnnotator(1e-4, spurious_strength=0.0)(prompts, a, b, subsets, seed="s")
    hits = [lp.meta["gold_chosen"] > lp.meta["gold_rejected"] for lp in sharp
            if abs(lp.meta["gold_chosen"] - lp.meta["gold_rejected"]) > 1e-2]
    assert sum(hits) / len(hits) > 0.999
    # same seed, same labels; the chosen side is the preferred one and keeps its gold reward
    again = SynthAnnotator(1.0, 0.0)(prompts, a, b, subsets, seed="s")
    assert [p.chosen for p in again] == [p.chosen for p in SynthAnnotator(1.0, 0.0)(prompts, a, b, subsets, seed="s")]
    assert all(gold_reward(p.prompt, p.chosen) == p.meta["gold_chosen"] for p in again[:50])


def test_own_sample_accuracy_known_answer():
    # prompt 1: judge 1 < 2 < 3; PM orders (0,1) right, (0,2) right, (1,2) wrong -> 2/3
    # prompt 2: judge 0, 0, 1: (0,1) tied (left out); the PM ties (0,2) -> 1/2; (1,2) wrong -> 0
    pm = [0.0, 5.0, 4.0, 1.0, 9.0, 1.0]
    judge = [1.0, 2.0, 3.0, 0.0, 0.0, 1.0]
    out = own_sample_accuracy(pm, judge, group=3, quantile=0.5)
    assert out["pm_own_pairs"] == 5 and out["pm_accuracy_own"] == pytest.approx((2 + 0.5 + 0) / 5)
    # median of the PM scores is 2.5: high pairs have both scores above it: only (1,2) of prompt 1, wrong
    assert out["pm_own_pairs_high"] == 1 and out["pm_accuracy_own_high"] == 0.0
    none = own_sample_accuracy([1.0, 2.0], [0.0, 0.0], group=2, quantile=0.5)
    assert none["pm_own_pairs"] == 0 and none["pm_accuracy_own"] is None


def test_static_equivalent_buys_the_same_labels_once_with_r_times_the_inner_steps():
    cfg = IteratedRLHFConfig(rounds=3, prompts_per_round=64, inner_config={"rollout_batch_size": 32})
    static = static_equivalent(cfg)
    assert (static.rounds, static.prompts_per_round) == (1, 192)
    assert inner_method_config(static).steps == 3 * inner_method_config(cfg).steps == 6
    assert inner_method_config(static).rollout_batch_size == 32
    assert regime(static) == "static" and regime(cfg) == "iterated"
    rs = static_equivalent(IteratedRLHFConfig(rounds=2, inner="rs_finetune"))
    assert inner_method_config(rs).rounds == 2 and inner_method_config(rs).mode == "finetune"


@pytest.mark.parametrize("override, key", [
    ("method.rounds=0", "method.rounds"),
    ("+method.inner_config.bogus=1", "method.inner_config.bogus"),
    ("+method.inner_config.steps=0", "method.inner_config.steps"),
    ("method.own_check_samples=1", "method.own_check_samples"),
    ("method.inner=dpo", "method.inner"),
])
def test_bad_input_fails_before_training_naming_the_key(tiny_overrides, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        validate(compose(tiny_overrides + ["method=iterated_rlhf", override]))


# the tiny run: 2 rounds of 8 labels, 2 PPO rollouts of 8 each, a short PM pass each round
RUN = ["method=iterated_rlhf", "method.rounds=2", "method.prompts_per_round=8",
       "method.own_check_samples=2", "+method.inner_config.rollout_batch_size=8", "eval.n_prompts=8",
       "train.log_points=2"]
OWN_KEYS = ("round", "pm_accuracy_own", "pm_own_pairs", "pm_accuracy_own_high", "pm_own_pairs_high")


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _run_dir(sweep):
    return next((sweep / "runs").glob("iterated_rlhf_*"))


@pytest.mark.slow
def test_rounds_buy_labels_retrain_on_all_comparisons_and_log_round_and_own_accuracy(tiny_overrides, tmp_path):
    metrics = run_job(compose(tiny_overrides + RUN), RUN)
    rounds = metrics["info"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and metrics["info"]["regime"] == "iterated"
    assert [r["annotations"] for r in rounds] == [8, 8] and metrics["cost"]["annotations"] == 16
    base = rounds[0]["pm_train_pairs"] - 8  # the proxy PM's comparisons
    assert base > 500 and rounds[1]["pm_train_pairs"] == base + 16  # retrained on every comparison so far
    assert all(0 <= r["pm_heldout_gold_accuracy"] <= 1 and r["pm_own_pairs"] > 0 for r in rounds)
    run_dir = _run_dir(tmp_path / "sweep")
    log = _log(run_dir)
    assert all(k in p for p in log for k in OWN_KEYS)  # π0's point and the final one included
    assert [p["round"] for p in log] == [0, 1, 1, 2, 2, 2] and [p["step"] for p in log] == [0, 1, 2, 3, 4, -1]
    assert [p["annotations"] for p in log] == [0, 8, 8, 16, 16, 16]
    # round 2 starts from round 1's policy (restart=last): its points measure KL to that start too
    assert "kl_k3_start" in log[3] and "kl_k3_start" not in log[1]
    labels = (run_dir / "subruns" / "02-labels" / "comparisons.jsonl").read_text().splitlines()
    assert len(labels) == 8 and (run_dir / "subruns" / "02-labels" / "pm" / "model.safetensors").exists()


@pytest.mark.slow
def test_continue_pm_rs_inner_and_restart_from_pi0(tiny_overrides, tmp_path):
    run = [o for o in RUN if "inner_config" not in o] + [
        "method.pm_update=continue", "method.inner=rs_finetune", "method.restart=pi0",
        "+method.inner_config.prompts_per_round=16"]
    rounds = run_job(compose(tiny_overrides + run), run)["info"]["rounds"]
    assert [r["pm_train_pairs"] for r in rounds] == [8, 8]  # the current PM, on the round's new labels only
    assert all(r["inner"]["mode"] == "finetune" and r["steps"] == 1 for r in rounds)  # 16 prompts, batch 16
    log = _log(_run_dir(tmp_path / "sweep"))
    assert not any("kl_k3_start" in p for p in log)  # every round starts at π0
    assert [p["round"] for p in log] == [0, 1, 2, 2]


@pytest.mark.slow
def test_annotation_budget_stops_the_run_cleanly(tiny_overrides, tmp_path):
    run = [*RUN, "method.rounds=3", "budget.annotations=8"]
    metrics = run_job(compose(tiny_overrides + run), run)
    info = metrics["info"]
    assert info["stopped"] == "budget.annotations=8 reached" and len(info["rounds"]) == 1
    assert metrics["cost"]["annotations"] == 8
    run_dir = _run_dir(tmp_path / "sweep")
    log = _log(run_dir)
    assert log[-2]["label"] == "end" and log[-2]["round"] == 1 and (run_dir / "DONE").exists()


@pytest.mark.slow
def test_killed_inside_round_two_resumes_and_matches_uninterrupted(stage_cache, tmp_path):
    common = [sys.executable, "-m", "alignbench.cli", "run", *RUN, "train.checkpoint_every=1",
              "train.num_threads=1", *TINY, f"paths.cache_dir={stage_cache}"]
    subprocess.run(common + [f"paths.sweep_dir={tmp_path}/clean"], check=True, capture_output=True, cwd=tmp_path)
    killed = common + [f"paths.sweep_dir={tmp_path}/killed"]
    proc = subprocess.Popen(killed, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    inside_round_2 = "runs/*/subruns/02-round/checkpoint/state.json"
    while time.time() < deadline and not list((tmp_path / "killed").glob(inside_round_2)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = _run_dir(tmp_path / "killed")
    assert not (run_dir / "DONE").exists(), "the job finished before it could be killed"
    assert (run_dir / "subruns" / "01-round" / "done.json").exists()
    out = subprocess.run(killed, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "resuming from checkpoint" in out.stdout + out.stderr
    clean_dir = _run_dir(tmp_path / "clean")
    clean, resumed = (json.loads((d / "metrics.json").read_text()) for d in (clean_dir, run_dir))
    for key in ("proxy_reward", "judge_reward", "kl_k3", "pm_accuracy_own"):
        assert resumed["final"][key] == clean["final"][key], key  # bitwise on CPU
    for key in ("annotations", "tokens_trained", "tokens_generated", "pm_calls", "flops"):
        assert resumed["cost"][key] == clean["cost"][key], key
    assert [p["step"] for p in _log(run_dir)] == [p["step"] for p in _log(clean_dir)]


def test_static_preset_is_the_static_equivalent_of_the_iterated_one(tiny_overrides):
    """conf/frontier/static3.yaml buys iterated3's labels in one round with R× the inner steps."""
    _, iterated, _ = validate(compose(tiny_overrides + ["frontier=iterated3"]))
    _, static, _ = validate(compose(tiny_overrides + ["frontier=static3"]))
    assert static == static_equivalent(iterated) and regime(static) == "static"


@pytest.mark.slow
def test_real_hh_annotator_pm_sees_neither_the_judge_half_nor_the_iterated_pm_comparisons(tmp_path, monkeypatch):
    """On real HH: the annotator PM trains on part a2, the iterated PM on a1 + the bought labels,
    the judge on b; no conversation is shared between them (a small real-HH sample, a few steps)."""
    import alignbench_methods.iterated_rlhf as it
    from alignbench.data.splits import conversation_key
    from alignbench.stages import preference
    from tests.conftest import shared_data
    overrides = TINY + ["data=hh_rlhf", f"data.path={shared_data('hh-rlhf')}", "data.max_pairs=600",
                        "stages.pi0.mode=none", "model.max_seq_len=128", "stages.base.max_steps=2",
                        "stages.base.batch_size=16", "stages.pm.max_steps=2", "stages.pm.batch_size=8",
                        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.sweep_dir={tmp_path / 'sweep'}",
                        "method=iterated_rlhf", "method.rounds=1", "method.prompts_per_round=4",
                        "+method.inner_config.rollout_batch_size=4", "+method.inner_config.steps=1",
                        "method.own_check_samples=2", "eval.n_prompts=4", "train.log_points=2"]
    trained: dict[str, list] = {}
    real = preference.train_pm

    def spy(model, tok, pairs, **kw):
        trained[kw["desc"]] = list(pairs)
        return real(model, tok, pairs, **kw)
    monkeypatch.setattr(preference, "train_pm", spy)
    monkeypatch.setattr(it, "train_pm", spy)
    metrics = run_job(compose(overrides), overrides)
    keys = {desc: {conversation_key(p.prompt) for p in pairs} for desc, pairs in trained.items()}
    iterated = next(d for d in trained if d.startswith("PM round"))
    bought = [p for p in trained[iterated] if p.source.startswith("annotator")]
    assert len(bought) == 4 and metrics["cost"]["annotations"] == 4
    assert not keys["PM (a2)"] & keys["PM (b)"] and not keys["PM (a2)"] & keys["PM (a1)"]
    assert not keys["PM (a2)"] & keys[iterated] and not keys["PM (b)"] & keys[iterated]
    assert len(trained[iterated]) == len(trained["PM (a1)"]) + 4
    assert metrics["info"]["rounds"][0]["pm_heldout_label_accuracy"] is not None
