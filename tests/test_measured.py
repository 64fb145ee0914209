"""Weights are measured once: a final evaluation of the weights the last log point measured reads
that point back (and says so), π0's point is shared by the runs of a sweep through the disk, and
the numbers are exactly those of measuring afresh."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from alignbench.cli import compose
from alignbench.measured import MeasureMemo, Measured, fingerprint
from alignbench.report.aggregate import train_points
from alignbench.report.load import load_sweep
from alignbench.runner import run_job
from alignbench.sampling import SampleBatch


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    net.register_parameter("scale", torch.nn.Parameter(torch.tensor(0.5)))  # 0-dim, as Gemma's normaliser
    return net


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 12 + 3 + 3 + 3 + 1 - 1), delta=st.sampled_from([1e-6, -1e-3, 1.0]))
def test_fingerprint_changes_with_any_single_weight_and_only_then(index, delta):
    a, b = _net(), _net()
    assert fingerprint(a) == fingerprint(b)  # same weights, separate objects
    flat = [p for p in b.parameters()]
    sizes = [p.numel() for p in flat]
    i = index
    for p, n in zip(flat, sizes):
        if i < n:
            with torch.no_grad():
                p.view(-1)[i] += delta
            break
        i -= n
    assert fingerprint(a) != fingerprint(b)


def test_memo_round_trips_a_point_exactly_through_disk(tmp_path):
    samples = SampleBatch(["p"], ["r"], [0], 3, [[1, 2]], [[3, 4, 5]], [True], 0.7)
    got = Measured(samples, [0.1 + 0.2], [1 / 3], {"kl_k1": 0.0, "kl_k3": 0.0})
    MeasureMemo({"x": 1}, tmp_path).put("w", got, to_disk=True)
    back, own = MeasureMemo({"x": 1}, tmp_path).get("w")
    assert not own and back.samples == samples and back.proxy == [0.1 + 0.2] and back.judge == [1 / 3]
    assert MeasureMemo({"x": 2}, tmp_path).get("w") == (None, False)  # another context: not this point
    (next(tmp_path.glob("*.json"))).write_text("{torn")
    assert MeasureMemo({"x": 1}, tmp_path).get("w") == (None, False)  # a torn file is measured afresh


def test_final_evaluation_reads_back_the_last_point_and_the_frontier_counts_it_once(tiny_overrides, tmp_path):
    over = ["method=dpo", "method.max_steps=2", "method.eval_every=2", "method.probe_pairs=4"]
    run_job(compose(tiny_overrides + over), over)
    run = tmp_path / "sweep" / "runs" / "dpo_s0_method.eval_every=2_method.max_steps=2_method.probe_pairs=4"
    log = _log(run)
    last, final = log[-2], log[-1]
    assert final["label"] == "final" and final["repeats_step"] == last["step"] == 2
    for key in ("proxy_reward", "judge_reward", "kl_k1", "kl_k3", "truncation_rate", "mean_response_chars"):
        assert final[key] == last[key]
    assert "repeats_step" not in last
    points = train_points(load_sweep(tmp_path / "sweep"))
    assert [p["label"] for p in points] == [p["label"] for p in log[:-1]]  # the repeat is not a second point


def test_pi0_point_is_shared_across_runs_and_equals_measuring_afresh(tiny_overrides, tmp_path):
    # run A measures π0 and writes it to the cache; run B (another method, same seed) reads it
    a = run_job(compose(tiny_overrides + ["method=context_distilled"]), [])
    over = ["method=dpo", "method.max_steps=1", "method.probe_pairs=4"]
    run_job(compose(tiny_overrides + over), over)
    pi0_a = _log(tmp_path / "sweep" / "runs" / "context_distilled_s0")[0]
    pi0_b = _log(tmp_path / "sweep" / "runs" / "dpo_s0_method.max_steps=1_method.probe_pairs=4")[0]
    assert pi0_a["label"] == pi0_b["label"] == "pi0" and pi0_a["kl_k1"] == 0.0 and pi0_a["kl_k3"] == 0.0
    for key in ("proxy_reward", "judge_reward", "truncation_rate", "mean_response_chars", "proxy_judge_spearman"):
        assert pi0_a[key] == pi0_b[key]
    # the baseline's final evaluation is π0's weights again: read back, marked, identical
    final = _log(tmp_path / "sweep" / "runs" / "context_distilled_s0")[-1]
    assert final["repeats_step"] == 0 and final["judge_reward"] == pi0_a["judge_reward"]
    assert a["final"]["judge_reward"] == pi0_a["judge_reward"]
    # and measuring afresh (the same stages, no measured points) gives the same numbers exactly
    stages = next(o for o in tiny_overrides if o.startswith("paths.cache_dir=")).split("=", 1)[1]
    (tmp_path / "fresh-cache").mkdir()
    (tmp_path / "fresh-cache" / "stages").symlink_to(f"{stages}/stages")
    fresh = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")] + [
        f"paths.cache_dir={tmp_path / 'fresh-cache'}", f"paths.sweep_dir={tmp_path / 'fresh'}"]
    b = run_job(compose(fresh + ["method=context_distilled"]), [])
    assert b["final"]["judge_reward"] == a["final"]["judge_reward"]
    assert b["final"]["proxy_reward"] == a["final"]["proxy_reward"]
    # the dataset's chosen responses are scored once per sweep's stages, and read back exactly
    assert len(list((tmp_path / "fresh-cache" / "measured").glob("texts-*.json"))) == 1
    chosen = [[(r["chosen_proxy_reward"], r["chosen_judge_reward"]) for r in map(json.loads, (
        d / "runs" / "context_distilled_s0" / "samples.jsonl").read_text().splitlines())]
        for d in (tmp_path / "sweep", tmp_path / "fresh")]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 24
