"""Iterated RLHF's PM fits (issue 24 §1.4): every PM of a run — the round-0 PM and every retrain, the
two reward PMs of reward=safety_helpful included — trains with one set of settings (stages.pm's, as
the shared stage it starts from uses them), and round k's PM trains on exactly the round-0 PM's
comparisons plus the labels the method bought and was charged for, never more."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from alignbench.cli import _bad_input_types, check_inputs_first, compose, one_line
from alignbench.config import ConfigError, to_config
from alignbench.data import load_data
from alignbench.data.types import PreferencePair, harm_group
from alignbench.runner import run_job
from alignbench.stages import preference
from alignbench.stages.access import pm_pairs
from alignbench.stages.pm_objectives import first_judgements
import alignbench_methods.iterated_rlhf as it

# 2 rounds of 8 bought labels, 1 PPO step of 8 each: a few seconds a round
SMALL = ["method=iterated_rlhf", "method.rounds=2", "method.prompts_per_round=8", "method.own_check_samples=2",
         "+method.inner_config.rollout_batch_size=8", "+method.inner_config.steps=1", "eval.n_prompts=8",
         "train.log_points=2"]
# non-default PM settings: each must reach every PM fit of the run
PM = ["stages.pm.lr=3e-3", "stages.pm.batch_size=16", "stages.pm.epochs=0.5"]
FIELDS = ("lr", "batch_size", "epochs", "max_steps", "objective", "harmless_weight")


def _spy(monkeypatch) -> list[dict]:
    """Every train_pm call of the run: its comparisons and the settings it trained with (``settings``,
    else cfg.stages.pm as train_pm resolves them, with the epochs it was given)."""
    fits: list[dict] = []
    real = preference.train_pm

    def spy(model, tok, pairs, **kw):
        sc = kw.get("settings") or kw["cfg"].stages.pm
        fits.append({"desc": kw["desc"], "pairs": list(pairs),
                     "settings": {**{k: getattr(sc, k) for k in FIELDS}, "epochs": kw["epochs"]}})
        return real(model, tok, pairs, **kw)
    monkeypatch.setattr(preference, "train_pm", spy)
    monkeypatch.setattr(it, "train_pm", spy)
    return fits


def _ids(pairs) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


@pytest.mark.slow
def test_round_k_pm_trains_on_the_round0_pm_labels_plus_the_bought_ones_with_its_settings(
        tiny_overrides, monkeypatch):
    n = 200
    run = [*SMALL, *PM, f"stages.pm.judgements={n}"]
    fits = _spy(monkeypatch)
    metrics = run_job(compose(tiny_overrides + run), run)
    want = {"lr": 3e-3, "batch_size": 16, "epochs": 0.5, "max_steps": None, "objective": "pairwise",
            "harmless_weight": 1.0}
    (start,) = [f for f in fits if f["desc"] == "PM (all)"]  # the round-0 (shared proxy) PM
    rounds = [f for f in fits if f["desc"].startswith("PM round")]
    assert len(start["pairs"]) == n and len(rounds) == 2
    bought = [p for p in rounds[-1]["pairs"] if p.source.startswith("annotator")]  # every round's, in order
    assert len(bought) == 16
    for r, fit in enumerate(rounds, 1):
        # exactly the round-0 PM's comparisons, in order, then the labels bought in rounds 1..r
        assert _ids(fit["pairs"]) == _ids(start["pairs"]) + _ids(bought[:8 * r]), r
        assert len(fit["pairs"]) == n + 8 * r
    assert [f["settings"] for f in [start, *rounds]] == [want] * 3  # one set of settings for every fit
    info = metrics["info"]
    assert [r["pm_train_pairs"] for r in info["rounds"]] == [n + 8, n + 16]
    assert metrics["cost"]["annotations"] == 16 == sum(r["annotations"] for r in info["rounds"])


@pytest.mark.slow
def test_two_reward_pm_retrains_use_the_reward_stages_settings_and_labels(tiny_overrides, monkeypatch):
    """reward=safety_helpful: the shared pm-safety / pm-helpful stages are the standard pairwise PM
    on all their group's comparisons with stages.pm's optimiser settings; each retrain is too, on
    those comparisons plus the bought labels of its group (a λ and judgements set for the proxy PM
    reach neither)."""
    run = [*SMALL, *PM, "method.rounds=1", "reward=safety_helpful", "stages.pm.harmless_weight=0.5",
           "stages.pm.judgements=300"]
    fits = _spy(monkeypatch)
    metrics = run_job(compose(tiny_overrides + run), run)
    want = {"lr": 3e-3, "batch_size": 16, "epochs": 0.5, "max_steps": None, "objective": "pairwise",
            "harmless_weight": 1.0}
    # the safety PM's comparisons are the harmless ones mixed with helpful ones (reward.safety_helpful_share,
    # Llama 2's 90/10); the helpfulness PM's are helpful only
    group = lambda f: "harmless" if any(harm_group(p.subset) == "harmless" for p in f["pairs"]) else "helpful"  # noqa: E731
    start = {g: next(f for f in fits if f["desc"] == "PM (all)" and group(f) == g) for g in ("harmless", "helpful")}
    assert {harm_group(p.subset) for p in start["harmless"]["pairs"]} == {"harmless", "helpful"}
    retrains = [f for f in fits if f["desc"].startswith("PM round")]
    assert len(retrains) == 2
    for fit in retrains:
        g = group(fit)
        new = [p for p in fit["pairs"] if p.source.startswith("annotator")]
        assert fit["settings"] == start[g]["settings"] == want, g
        assert _ids(fit["pairs"]) == _ids(start[g]["pairs"]) + _ids(new), g
    (rnd,) = metrics["info"]["rounds"]
    assert rnd["pm_train_pairs"] == len(start["harmless"]["pairs"]) + len(start["helpful"]["pairs"]) + 8
    assert metrics["cost"]["annotations"] == 8


@pytest.mark.slow
def test_continued_pm_trains_on_the_new_labels_with_the_same_settings(tiny_overrides, monkeypatch):
    run = [*SMALL, *PM, "method.pm_update=continue", "stages.pm.judgements=150"]
    fits = _spy(monkeypatch)
    metrics = run_job(compose(tiny_overrides + run), run)
    (start,) = [f for f in fits if f["desc"] == "PM (all)"]
    rounds = [f for f in fits if f["desc"].startswith("PM round")]
    assert len(start["pairs"]) == 150 and [len(f["pairs"]) for f in rounds] == [8, 8]
    assert [f["settings"] for f in rounds] == [start["settings"]] * 2
    assert metrics["cost"]["annotations"] == 16


def test_method_pm_epochs_is_gone_its_epochs_are_stages_pm_epochs():
    """A second epochs key would let the retrained PMs train differently from the round-0 PM: the
    old key is one line at it, the way `alignbench run` checks overrides."""
    overrides = ["method=iterated_rlhf", "method.pm_epochs=0.5"]
    with pytest.raises(_bad_input_types()) as e:
        check_inputs_first(overrides)
    assert one_line(e.value, tuple(overrides)).startswith("method.pm_epochs: "), one_line(e.value, tuple(overrides))


@pytest.mark.parametrize("update, key", [("retrain", "stages.pm.pmp_path"), ("continue", None)])
def test_retrain_with_pm_pretraining_fails_naming_the_key(tiny_config, tmp_path, update, key):
    """The round-0 PM pretrains on stages.pm.pmp_path; a retrain from the init would not."""
    cfg = dataclasses.replace(tiny_config, stages=dataclasses.replace(
        tiny_config.stages, pm=dataclasses.replace(tiny_config.stages.pm, pmp_path=str(tmp_path))))
    mcfg = it.IteratedRLHFConfig(pm_update=update)
    if key is None:
        it.check_pm_settings(cfg, mcfg)
        return
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        it.check_pm_settings(cfg, mcfg)
    lm = dataclasses.replace(tiny_config, stages=dataclasses.replace(
        tiny_config.stages, pm=dataclasses.replace(tiny_config.stages.pm, objective="lm")))
    with pytest.raises(ConfigError, match=r"^stages\.pm\.objective: "):
        it.check_pm_settings(lm, mcfg)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from tests.conftest import TINY
    cfg = to_config(compose(TINY + [f"paths.cache_dir={tmp_path_factory.mktemp('c')}", "method=iterated_rlhf"]))
    return cfg, load_data(cfg.data)


def _label(i: int, r: int) -> PreferencePair:
    return PreferencePair(prompt=f"q{r}.{i}", chosen="a", rejected="b", subset="helpful-base",
                          n_turns=1, source=f"annotator:round{r}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.one_of(st.none(), st.integers(1, 900)), rounds=st.integers(1, 5), m=st.integers(1, 64),
       update=st.sampled_from(["retrain", "continue"]))
def test_round_pool_arithmetic(synth, n, rounds, m, update):
    """Round r's pool: retrain = the round-0 PM's N comparisons (the first N of its seeded order;
    all without judgements) + the r·M bought labels, in order; continue = round r's M labels."""
    cfg, data = synth
    cfg = dataclasses.replace(cfg, stages=dataclasses.replace(
        cfg.stages, pm=dataclasses.replace(cfg.stages.pm, judgements=n)))
    part_pairs = pm_pairs(cfg, data, "all")
    start = it.start_comparisons(cfg, data)
    assert _ids(start) == _ids(first_judgements(part_pairs, n, cfg.stages.seed))
    assert len(start) == (min(n, len(part_pairs)) if n else len(part_pairs))
    bought = [[_label(i, r) for i in range(m)] for r in range(1, rounds + 1)]
    for r in range(1, rounds + 1):
        pool = it.round_pool(start, bought[:r], update)
        if update == "retrain":
            assert len(pool) == len(start) + r * m
            assert _ids(pool) == _ids(start) + _ids([p for b in bought[:r] for p in b])
        else:
            assert _ids(pool) == _ids(bought[r - 1])
