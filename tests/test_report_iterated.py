"""The iterated-RLHF report section on a fake sweep with known numbers."""
from __future__ import annotations

import json

import pytest
from scipy import stats as sps

from alignbench.report.build import _figure
from alignbench.report.iterated import final_frame, iterated_blocks, round_frame
from alignbench.report.load import RunRecord, Sweep, load_sweep
from alignbench.report.render import Para, Table, to_markdown


def write_run(root, run_id, config, seed, regime, rounds: list[dict], final: dict):
    run = root / "runs" / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "done", "config": config}))
    (run / "DONE").write_text("")
    info = {"regime": regime, "labels_planned": 64, "rounds": rounds}
    (run / "metrics.json").write_text(json.dumps({"method": "iterated_rlhf", "config": config, "seed": seed,
                                                  "final": final, "cost": {"annotations": 64}, "info": info}))
    return {"run_id": run_id, "method": "iterated_rlhf", "seed": seed, "status": "done", "dir": f"runs/{run_id}",
            "config": config}


def make_sweep(tmp_path, static_acc):
    root, entries = tmp_path / "sweep", []
    for seed, (acc_it, acc_st) in enumerate(zip([0.80, 0.82, 0.84], static_acc)):
        rounds = [{"round": r, "annotations_total": 32 * r, "judge_reward": 0.1 * r + seed,
                   "pm_accuracy_own": acc_it, "pm_own_pairs": 100, "pm_accuracy_own_high": 0.7, "pm_own_pairs_high": 30}
                  for r in (1, 2)]
        final = {"judge_reward": 1.0 + seed, "pm_accuracy_own": acc_it, "pm_own_pairs": 100,
                 "pm_accuracy_own_high": 0.7, "pm_own_pairs_high": 30}
        entries.append(write_run(root, f"it-{seed}", "iterated_rlhf", seed, "iterated", rounds, final))
        st_round = [{"round": 1, "annotations_total": 64, "judge_reward": 0.5, "pm_accuracy_own": acc_st,
                     "pm_own_pairs": 100, "pm_accuracy_own_high": 0.5, "pm_own_pairs_high": 30}]
        st_final = {**final, "pm_accuracy_own": acc_st, "pm_accuracy_own_high": 0.5}
        entries.append(write_run(root, f"st-{seed}", "iterated_rlhf_method.rounds=1", seed, "static", st_round,
                                 st_final))
    (root / "index.json").write_text(json.dumps({"runs": entries}))
    (tmp_path / "report").mkdir()
    return load_sweep(root)


def test_section_numbers_intervals_and_sentence(tmp_path):
    sweep = make_sweep(tmp_path, static_acc=[0.60, 0.62, 0.64])
    rounds = round_frame(sweep)
    assert len(rounds) == 9 and sorted(final_frame(sweep)["regime"].unique()) == ["iterated", "static"]
    blocks = iterated_blocks(sweep, tmp_path / "report", _figure)
    assert "## Iterated online RLHF" in to_markdown(blocks)
    per_round, final = [b for b in blocks if isinstance(b, Table)]
    # round 2 of the iterated configuration: judge reward mean over seeds (0.2, 1.2, 2.2) = 1.2
    half = sps.t.ppf(0.975, 2) * 1.0 / 3 ** 0.5  # s = 1 over 3 seeds
    assert per_round.rows[1][:5] == ["iterated_rlhf", "iterated", "2", "64",
                                     f"1.200 [{1.2 - half:.3f}, {1.2 + half:.3f}] t(n=3)"]
    # final accuracy 0.82 ± t·0.02/√3 vs 0.62 ± the same: separated
    h = sps.t.ppf(0.975, 2) * 0.02 / 3 ** 0.5
    assert final.rows[0][4] == f"0.820 [{0.82 - h:.3f}, {0.82 + h:.3f}] t(n=3)"
    assert final.rows[1][1:5:3] == ["static", f"0.620 [{0.62 - h:.3f}, {0.62 + h:.3f}] t(n=3)"]
    paras = [b.text for b in blocks if isinstance(b, Para)]
    assert any("Iterating kept the PM more accurate on its own policy's samples than static RLHF." in p
               for p in paras)
    assert any("iterated 0.700 > static 0.500" in p for p in paras)  # the high-score region, zero spread
    assert (tmp_path / "report" / "iterated_rounds.png").exists()


def test_overlapping_intervals_say_so(tmp_path):
    sweep = make_sweep(tmp_path, static_acc=[0.70, 0.82, 0.94])
    paras = [b.text for b in iterated_blocks(sweep, tmp_path / "report", _figure) if isinstance(b, Para)]
    assert any("This sweep cannot say whether iterating kept the PM more accurate" in p for p in paras)
    assert any("the 95% intervals overlap" in p for p in paras)


def test_no_section_without_iterated_runs(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"runs": []}))
    assert iterated_blocks(load_sweep(root), tmp_path / "r", _figure) == []


@pytest.mark.parametrize("pairs", [100])
def test_one_seed_uses_the_pairs_interval(tmp_path, pairs):
    sweep = make_sweep(tmp_path, static_acc=[0.60, 0.62, 0.64])
    sweep.runs = [r for r in sweep.runs if r.seed == 0]
    tables = [b for b in iterated_blocks(sweep, tmp_path / "report", _figure) if isinstance(b, Table)]
    lo, hi = sps.beta.ppf(0.025, 80, 21), sps.beta.ppf(0.975, 81, 20)  # Clopper–Pearson, 80 of 100
    assert any(f"0.800 [{lo:.3f}, {hi:.3f}] pairs(n={pairs})" in cell for t in tables for row in t.rows for cell in row)


def test_round_zero_is_pi0_with_the_shared_pm(tmp_path):
    """The per-round table opens with π0's point (round 0, no labels bought), read from train_log."""
    run = RunRecord(dir=tmp_path, run_id="r", method="iterated_rlhf", config="it", seed=0,
              metrics={"info": {"regime": "iterated", "labels_planned": 8,
                                "rounds": [{"round": 1, "annotations_total": 8, "judge_reward": 0.2,
                                            "pm_accuracy_own": 0.6, "pm_own_pairs": 10}]}},
              train_log=[{"label": "pi0", "step": 0, "judge_reward": -0.3, "pm_accuracy_own": 0.7,
                          "pm_own_pairs": 12}])
    frame = round_frame(Sweep(dir=tmp_path, name="s", runs=[run]))
    assert frame["round"].tolist() == [0, 1] and frame["labels"].tolist() == [0, 8]
    assert frame["pm_accuracy_own"].tolist() == [0.7, 0.6] and frame["judge_reward"].tolist() == [-0.3, 0.2]
