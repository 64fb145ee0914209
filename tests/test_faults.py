"""Fault injection: parallel builders of one stage, a builder killed mid-build, a job that raises
inside a multirun (the others complete; a re-run re-runs only the failed job), a full disk while a
run writes its results, and a SIGKILL during each training method (the re-run resumes from the
checkpoint and ends exactly as an uninterrupted run)."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignbench.cache import build_stage
from tests.conftest import TINY
from tests.test_plugin import _env, plugin_site  # noqa: F401 (fixture)


def _slow_build(cache, barrier, out_q):
    def build(out):
        (out / "weights.bin").write_text(str(os.getpid()))
        time.sleep(1.0)
        return {"metrics": {"builder": os.getpid()}}
    barrier.wait()  # both workers ask for the stage at the same moment
    art = build_stage("shared", {"k": 1}, cache, build)
    out_q.put((os.getpid(), art.reused, art.record["metrics"]["builder"], str(art.path)))


def test_parallel_workers_build_a_stage_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_slow_build, args=(tmp_path, barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(r[1] for r in results) == [False, True]  # one built, the other waited and reused
    assert len({r[2] for r in results}) == 1 and len({r[3] for r in results}) == 1
    assert (Path(results[0][3]) / "weights.bin").read_text() == str(results[0][2])


def _build_forever(cache):
    def build(out):
        (out / "partial.bin").write_text("half")
        time.sleep(60)
        return {}
    build_stage("victim", {"k": 2}, cache, build)


def test_stage_killed_mid_build_is_rebuilt(tmp_path):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_build_forever, args=(tmp_path,))
    p.start()
    root = tmp_path / "stages"
    deadline = time.time() + 30
    while not list(root.glob(".tmp-victim-*/partial.bin")) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert not [d for d in root.glob("victim-*")]  # nothing that looks complete
    art = build_stage("victim", {"k": 2}, tmp_path, lambda out: (out / "ok.bin").write_text("ok") and {})
    assert not art.reused and (art.path / "ok.bin").exists() and not (art.path / "partial.bin").exists()
    assert not list(root.glob(".tmp-victim-*"))  # the dead builder's leftovers are gone


@pytest.mark.slow
def test_failed_job_leaves_the_sweep_running_and_rerun_retries_only_it(plugin_site, stage_cache, tmp_path):  # noqa: F811
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "alignbench.cli", "run", "-m", "method=context_distilled,explode,my_sft",
           *TINY, f"paths.cache_dir={stage_cache}", f"paths.sweep_dir={sweep}"]
    subprocess.run(cmd, env=_env(plugin_site), cwd=tmp_path, capture_output=True)
    runs = {r["method"]: r for r in json.loads((sweep / "index.json").read_text())["runs"]}
    assert runs["context_distilled"]["status"] == "done" and runs["my_sft"]["status"] == "done"
    assert runs["explode"]["status"] == "failed" and "injected failure" in runs["explode"]["error"]
    done_mtimes = {m: (sweep / runs[m]["dir"] / "DONE").stat().st_mtime for m in ("context_distilled", "my_sft")}

    proc = subprocess.run(cmd, env=_env(plugin_site), cwd=tmp_path, capture_output=True, text=True)
    runs = {r["method"]: r for r in json.loads((sweep / "index.json").read_text())["runs"]}
    assert runs["explode"]["status"] == "failed"  # retried (and failed again)
    assert {m: (sweep / runs[m]["dir"] / "DONE").stat().st_mtime for m in done_mtimes} == done_mtimes
    assert proc.stderr.count("is complete; skipping") == 2 or proc.stdout.count("is complete; skipping") == 2


def test_disk_full_while_writing_results_fails_the_run_and_a_rerun_completes(tiny_overrides, tmp_path, monkeypatch):
    """ENOSPC while the run writes its results: the job is recorded failed with the OS error, the
    run directory has no DONE (never taken as complete), and a re-run with space completes it."""
    import errno

    import alignbench.run_evaluation
    from alignbench.cli import compose
    from alignbench.runner import run_job

    def full_disk(path, rows):
        Path(path).write_text("sweep,run\n")  # a partial file, as a real full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    real = alignbench.run_evaluation.write_rows
    monkeypatch.setattr(alignbench.run_evaluation, "write_rows", full_disk)
    cfg = compose(tiny_overrides + ["method=context_distilled"])
    with pytest.raises(OSError, match="No space left on device"):
        run_job(cfg, ["method=context_distilled"])
    run = tmp_path / "sweep" / "runs" / "context_distilled_s0"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    assert not (run / "DONE").exists()
    index = json.loads((tmp_path / "sweep" / "index.json").read_text())
    assert index["runs"][0]["status"] == "failed"

    monkeypatch.setattr(alignbench.run_evaluation, "write_rows", real)
    run_job(cfg, ["method=context_distilled"])
    assert (run / "DONE").exists() and json.loads((run / "status.json").read_text())["status"] == "done"
    assert len((run / "results.csv").read_text().splitlines()) > 10  # the partial file was replaced


def _metrics(sweep: Path) -> dict:
    runs = json.loads((sweep / "index.json").read_text())["runs"]
    return json.loads((sweep / runs[0]["dir"] / "metrics.json").read_text())


# method overrides, the checkpoint step (0-based, last finished) to kill after, the steps logged
KILL_CASES = {
    "dpo": (["method=dpo", "method.max_steps=16", "method.eval_every=4", "train.checkpoint_every=4"], 7,
            [0, 4, 8, 12, 16, -1]),
    # LoRA: the checkpoint holds base + adapter weights; the reference is the policy with its adapter off
    "dpo_lora": (["method=dpo", "method.max_steps=8", "method.eval_every=4", "train.checkpoint_every=2",
                  "model.peft=lora", "model.lora.r=4"], 3, [0, 4, 8, -1]),
    "ppo": (["method=ppo", "method.steps=6", "method.rollout_batch_size=16", "method.eval_every=2",
             "method.kl_target=2", "method.ptx_coef=0.1", "train.checkpoint_every=1"], 2, [0, 2, 4, 6, -1]),
    "rrhf": (["method=rrhf", "method.steps=12", "method.prompts_per_step=4", "method.eval_every=4",
              "train.checkpoint_every=2"], 5, [0, 4, 8, 12, -1]),
    # 2 rounds of 3 batches: killed inside round 2, so the checkpoint carries round 1's record
    # and round 2's selected responses, optimizer and position
    "rs_finetune": (["method=rejection_sampling", "method.mode=finetune", "method.rounds=2",
                     "method.prompts_per_round=48", "method.eval_every=2", "train.checkpoint_every=1"], 3,
                    [0, 2, 4, 6, -1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILL_CASES))
def test_job_killed_mid_training_resumes_and_matches_uninterrupted(case, stage_cache, tmp_path):
    """SIGKILL a training job after a mid-training checkpoint, re-run the same command: it resumes
    from the checkpoint and ends with exactly the metrics of an uninterrupted run (CPU, fixed seed)."""
    overrides, kill_after, logged_steps = KILL_CASES[case]
    common = [sys.executable, "-m", "alignbench.cli", "run", *overrides, "train.num_threads=1", *TINY,
              f"paths.cache_dir={stage_cache}"]
    subprocess.run(common + [f"paths.sweep_dir={tmp_path}/clean"], check=True, capture_output=True, cwd=tmp_path)
    clean = _metrics(tmp_path / "clean")

    killed = common + [f"paths.sweep_dir={tmp_path}/killed"]
    proc = subprocess.Popen(killed, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        states = list((tmp_path / "killed" / "runs").glob("*/checkpoint/state.json"))
        if states and json.loads(states[0].read_text())["step"] >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = states[0].parent.parent
    assert not (run_dir / "DONE").exists(), "the job finished before it could be killed"
    resumed_from = json.loads(states[0].read_text())["step"]
    assert kill_after <= resumed_from < logged_steps[-2] - 1

    out = subprocess.run(killed, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "resuming from checkpoint" in out.stdout + out.stderr
    resumed = _metrics(tmp_path / "killed")
    for key in ("proxy_reward", "judge_reward", "kl_k1", "kl_k3"):
        assert resumed["final"][key] == clean["final"][key], key  # bitwise on CPU
    assert resumed["cost"]["tokens_trained"] == clean["cost"]["tokens_trained"]
    assert resumed["cost"]["tokens_generated"] == clean["cost"]["tokens_generated"]
    assert resumed["cost"]["flops"] == clean["cost"]["flops"] > 0
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [p["step"] for p in log] == logged_steps
    clean_log = (tmp_path / "clean" / "runs" / run_dir.name / "train_log.jsonl").read_text().splitlines()
    for a, b in zip(log, map(json.loads, clean_log)):
        assert a["judge_reward"] == b["judge_reward"] and a.get("kl_k3") == b.get("kl_k3"), a["step"]
