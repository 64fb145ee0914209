"""What runs measure for the frontier study (issue 12): log spacing, PM robustness at each point,
the win rate against the dataset's chosen response, temperature and diversity, the selection split."""
import json
import math

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.eval.diversity import distinct_n, self_bleu, tokens
from alignbench.eval.robustness import pairwise_agreement, rank_correlation
from alignbench.log_points import log_steps, point_steps
from alignbench.runner import config_id_for, run_id_for, run_job, validate


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- pure functions
def test_log_steps_spread_evenly_over_the_planned_steps_and_end_on_the_last():
    assert log_steps(64, 8) == {8, 16, 24, 32, 40, 48, 56, 64}
    assert log_steps(75, 8) == {10, 19, 29, 38, 47, 57, 66, 75}  # ceil(i·75/8)
    assert log_steps(5, 8) == {1, 2, 3, 4, 5}  # fewer steps than points: every step
    assert log_steps(0, 8) == set()

    class Explicit:
        eval_every = 25
    assert point_steps(Explicit(), 75, 8) == {25, 50, 75}  # an explicit eval_every is honoured
    Explicit.eval_every = None
    assert point_steps(Explicit(), 75, 8) == log_steps(75, 8)


def test_rank_correlation_known_answers():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (2,1,4,3): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60 = 0.6
    assert rank_correlation([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking


def test_pairwise_agreement_counts_proxy_ties_half_and_skips_judge_ties():
    # items: agree; proxy tie (½); disagree; judge tie (left out) -> (1 + 0.5 + 0) / 3
    pa, ja = [1.0, 2.0, 0.0, 5.0], [1.0, 2.0, 0.0, 3.0]
    pb, jb = [0.0, 2.0, 1.0, 0.0], [0.0, 1.0, -1.0, 3.0]
    assert pairwise_agreement(pa, ja, pb, jb) == pytest.approx(0.5)
    assert pairwise_agreement([1, 2], [1, 2], [0, 0], [0, 0]) == 1.0
    assert math.isnan(pairwise_agreement([1], [1], [0], [1]))


def test_distinct_n_and_self_bleu_known_answers():
    assert tokens("Hi, there!") == ["Hi", ",", "there", "!"]  # sacrebleu 13a splits punctuation off
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "c d"], 2) == 1.0  # bigrams never cross texts
    same = ["the cat sat on the mat today"] * 4
    assert self_bleu([same]) == pytest.approx(100.0)
    assert distinct_n(same, 1) == pytest.approx(6 / 28)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue cyan", "w x y z"]
    assert self_bleu([disjoint]) == pytest.approx(0.0, abs=1e-6) and distinct_n(disjoint, 1) == 1.0
    partial = ["the cat sat on the mat", "the cat sat on a rug", "a dog ran in the park"]
    assert 0 < self_bleu([partial]) < 100


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("override, key", [
    ("eval.temperatures=[0.5,0]", "eval.temperatures"),
    ("eval.temperatures=[2.5]", "eval.temperatures"),
    ("eval.diversity_samples=1", "eval.diversity_samples"),
    ("train.log_points=1", "train.log_points"),
    ("eval.temperature_prompts=200", "eval.temperature_prompts"),
])
def test_bad_values_fail_naming_the_key(override, key):
    extra = ["eval.temperatures=[1.0]"] if override.startswith("eval.temperature_prompts") else []
    with pytest.raises(ConfigError, match=f"^{key}"):
        to_config(compose(["eval.n_prompts=128", *extra, override]))


def test_frontier_synth_preset_composes_every_configuration_with_a_readable_id():
    want = {"pi0": ("context_distilled", "context_distilled_pi0"), "beta0.05": ("dpo", "dpo_beta0.05"),
            "kl0.1": ("ppo", "ppo_kl0.1"), "n16": ("rejection_sampling", "rejection_sampling_n16"),
            "rounds4": ("rejection_sampling", "rejection_sampling_rounds4")}
    for name, (method, config_id) in want.items():
        overrides = [f"frontier={name}", "seed=2"]
        cfg, mcfg, _ = validate(compose(["experiment=frontier_synth", *overrides]))
        assert cfg.method["name"] == method and config_id_for(cfg, overrides) == config_id
        assert run_id_for(cfg, overrides) == config_id.replace(f"{method}_", f"{method}_s2_", 1)
        assert cfg.eval.selection_prompts == 128 and cfg.eval.temperatures == [0.25, 0.5, 0.75, 1.0]
    assert validate(compose(["experiment=frontier_synth", "frontier=n4"]))[1].mode == "best_of_n"
    assert validate(compose(["experiment=frontier_synth", "frontier=rounds2"]))[1].rounds == 2
    assert validate(compose(["experiment=frontier_synth", "frontier=beta0.1"]))[1].beta == 0.1


# --------------------------------------------------------------------------- end to end
TEMPS = ["eval.temperatures=[0.25,1.0]", "eval.diversity_samples=3", "eval.temperature_prompts=8",
         "eval.selection_prompts=16"]


def test_runs_log_eight_points_and_write_temperature_diversity_chosen_and_selection(tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep" / "runs"
    run_job(compose(tiny_overrides + TEMPS + ["method=dpo", "method.max_steps=10", "method.probe_pairs=16"]), [])
    run_job(compose(tiny_overrides + TEMPS + ["method=ppo", "method.steps=2", "method.rollout_batch_size=16",
                                              "method.ppo_epochs=4"]), [])
    run_job(compose(tiny_overrides + TEMPS + ["method=rejection_sampling", "method.n=4", "method.kl_pool=8"]), [])
    for name in ("dpo_s0", "ppo_s0"):
        log = _read_jsonl(sweep / name / "train_log.jsonl")
        train = [p for p in log if p["label"] not in ("pi0", "final")]
        assert log[0]["label"] == "pi0" and len(train) >= 8, (name, [p["step"] for p in log])
        assert all(-1 <= p["proxy_judge_spearman"] <= 1 for p in log)  # defined: rewards vary over 24 prompts
        assert "proxy_judge_agreement" not in log[0]
        # null only where the judge ties on every prompt (a policy still sampling π0's very texts)
        agreement = [p["proxy_judge_agreement"] for p in log[1:]]
        assert all(a is None or 0 <= a <= 1 for a in agreement) and agreement[-1] is not None
    ppo = _read_jsonl(sweep / "ppo_s0" / "train_log.jsonl")
    # 2 rollouts × 4 epochs × 1 minibatch = 8 optimiser steps for 8 points: one per optimiser step,
    # inside the rollouts at fractional PPO steps, each rollout's end with its rollout statistics
    assert [p["step"] for p in ppo[1:-1]] == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]
    assert [p["optimizer_step"] for p in ppo[1:-1]] == list(range(1, 9))
    assert [("rollout_kl" in p) for p in ppo[1:-1]] == [False, False, False, True] * 2

    for name, family in (("dpo_s0", "dpo"), ("ppo_s0", "ppo"), ("rejection_sampling_s0", "best_of_n")):
        run = sweep / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["family"] == family
        sel = metrics["selection"]
        assert sel["split"] == "eval" and sel["n"] == 16 and len(sel["judge_rewards"]) == 16
        assert sel["judge_reward"] == pytest.approx(sum(sel["judge_rewards"]) / 16) and sel["kl"] >= 0
        samples = _read_jsonl(run / "samples.jsonl")
        assert all(isinstance(s["chosen_judge_reward"], float) and isinstance(s["chosen_proxy_reward"], float)
                   for s in samples)
        by_t = _read_jsonl(run / "samples_by_temperature.jsonl")
        assert len(by_t) == 2 * 8 * 3
        assert {(r["temperature"], r["prompt_id"], r["sample"]) for r in by_t} == \
            {(t, i, k) for t in (0.25, 1.0) for i in range(8) for k in range(3)}
        chosen = {s["prompt_id"]: s["chosen_judge_reward"] for s in samples}
        assert all(r["chosen_judge_reward"] == chosen[r["prompt_id"]] for r in by_t)
        rows = pd.read_csv(run / "results.csv")
        vs = rows[(rows.evaluator == "policy") & (rows.metric == "win_rate_vs_chosen")]
        wins = [(s["judge_reward"] > s["chosen_judge_reward"]) + 0.5 * (s["judge_reward"] == s["chosen_judge_reward"])
                for s in samples]
        assert list(vs.slice) == ["vs:chosen"] and vs.value.iloc[0] == pytest.approx(sum(wins) / len(wins))
        temp = rows[rows.evaluator == "temperature"]
        div = rows[rows.evaluator == "diversity"]
        assert set(zip(temp.metric, temp.slice)) == {(m, s) for m in ("judge_reward", "proxy_reward",
                                                                       "win_rate_vs_chosen") for s in ("T=0.25", "T=1")}
        assert set(zip(div.metric, div.slice)) == {(m, s) for m in ("distinct_1", "distinct_2", "self_bleu")
                                                   for s in ("T=0.25", "T=1")}
        judge_t1 = [r["judge_reward"] for r in by_t if r["temperature"] == 1.0 and r["sample"] == 0]
        assert temp[(temp.metric == "judge_reward") & (temp.slice == "T=1")].value.iloc[0] == \
            pytest.approx(sum(judge_t1) / 8)
        # lower temperature, less diverse samples: the measurable form of "RLHF reduces diversity"
        d = div.set_index(["metric", "slice"]).value
        assert d["distinct_2", "T=0.25"] < d["distinct_2", "T=1"], name
        assert d["self_bleu", "T=0.25"] > d["self_bleu", "T=1"], name


def test_plugin_samplers_without_temperature_are_recognised():
    from alignbench.policy_measures import method_family, takes_temperature
    assert not takes_temperature(lambda prompts, seed: prompts)
    assert takes_temperature(lambda prompts, seed, temperature=None: prompts)
    assert takes_temperature(lambda prompts, seed, **kw: prompts)

    class Mode:
        mode = "finetune"
    assert method_family("rejection_sampling", Mode()) == "rs_finetune"
    Mode.mode = "best_of_n"
    assert method_family("rejection_sampling", Mode()) == "best_of_n" and method_family("dpo", Mode()) == "dpo"


def test_chosen_responses_come_from_the_eval_split_and_never_from_training(tiny_config):
    from alignbench.data import load_data
    from alignbench.stages.access import chosen_responses, eval_prompts, method_pairs, selection_prompts
    data = load_data(tiny_config.data)
    prompts, _ = eval_prompts(tiny_config, data)
    chosen = chosen_responses(tiny_config, data, prompts)
    first = {}
    for p in data.splits["test"]:
        first.setdefault(p.prompt, p)
    assert chosen == [first[q].chosen for q in prompts]
    trained = {(p.prompt, p.chosen) for p in method_pairs(tiny_config, data)}
    assert not trained & set(zip(prompts, chosen))
    assert selection_prompts(tiny_config, data) == []  # eval.selection_prompts = 0: off
    tiny_config.eval.selection_prompts = 10
    sel = selection_prompts(tiny_config, data)
    assert len(sel) == 10 and set(sel) <= {p.prompt for p in data.splits["eval"]}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=st.sampled_from(["eval", "test"]), n_prompts=st.integers(1, 60), n_select=st.integers(1, 60))
def test_selection_prompts_never_include_a_reported_prompt(tiny_config, split, n_prompts, n_select):
    # issue 24 §1.8: with eval.split=eval both sets were one seeded sample of the same split
    import dataclasses
    from alignbench.data import load_data
    from alignbench.stages.access import eval_prompts, selection_prompts
    cfg = dataclasses.replace(tiny_config, eval=dataclasses.replace(
        tiny_config.eval, split=split, n_prompts=n_prompts, selection_prompts=n_select))
    data = load_data(cfg.data)
    reported, selected = eval_prompts(cfg, data)[0], selection_prompts(cfg, data)
    eval_split = {p.prompt for p in data.splits["eval"]}
    assert not set(reported) & set(selected) and set(selected) <= eval_split
    available = len(eval_split) - (len(set(reported)) if split == "eval" else 0)
    assert len(selected) == min(n_select, available) and len(set(selected)) == len(selected)
