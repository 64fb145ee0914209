"""The same two-job sweep through Hydra's basic, joblib (local_parallel) and submitit-local
launchers: every job finishes, the results are bitwise identical whichever launcher ran them
(each job is a seeded CPU process), and the shared stages are built exactly once per cache even
when the two jobs ask for them at the same moment from different processes.

Each launcher gets its own fresh cache, so the stage builds happen inside that launcher's sweep:
in the parallel ones one job builds while the other waits on the stage lock and then reuses it.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

LAUNCHERS = {
    "basic": ["hydra/launcher=sequential"],  # the preset for Hydra's basic launcher
    "joblib": ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"],
    "submitit": ["hydra/launcher=submitit_local_run"],
}
PARALLEL = ("joblib", "submitit")
SWEEP = ["seed=0,1", "method=dpo", "method.max_steps=6", "train.num_threads=1"]
STAGES = ("base", "pi0", "pm")  # hh_synth: the judge is the gold reward, so no test PM stage
FINAL_KEYS = ("proxy_reward", "judge_reward", "kl_k1", "kl_k3", "mean_response_chars", "tokens_trained")


def _run_sweep(root: Path, launcher: str) -> dict:
    sweep, cache = root / launcher / "sweep", root / launcher / "cache"
    cmd = [sys.executable, "-m", "alignbench.cli", "run", "-m", *SWEEP, *TINY, *LAUNCHERS[launcher],
           f"paths.cache_dir={cache}", f"paths.sweep_dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{launcher} sweep failed:\n{out[-4000:]}"
    runs = json.loads((sweep / "index.json").read_text())["runs"]
    return {"sweep": sweep, "cache": cache, "cli_pid": proc.pid, "out": out,
            "runs": {r["run_id"]: r for r in runs}}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launchers")
    return {name: _run_sweep(root, name) for name in LAUNCHERS}


def _metrics(s: dict, run_id: str) -> dict:
    return json.loads((s["sweep"] / s["runs"][run_id]["dir"] / "metrics.json").read_text())


def _status(s: dict, run_id: str) -> dict:
    return json.loads((s["sweep"] / s["runs"][run_id]["dir"] / "status.json").read_text())


def _stage_dirs(cache: Path) -> dict:
    dirs = sorted(p for p in (cache / "stages").iterdir() if p.is_dir())
    return {d.name.split("-")[0]: d for d in dirs}


def _digest(d: Path) -> str:
    """Hash of a stage's files (weights, tokenizer, held-out scores), not its record (times, pid)
    nor its TensorBoard event files under tb/ (wall times, host and pid in their names)."""
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "record.json" and "tb" not in p.relative_to(d).parts[:1]:
            h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_every_launcher_finishes_every_job(sweeps):
    for name, s in sweeps.items():
        assert sorted((r["method"], r["seed"]) for r in s["runs"].values()) == [("dpo", 0), ("dpo", 1)], name
        assert {r["status"] for r in s["runs"].values()} == {"done"}, (name, s["runs"])
        for r in s["runs"].values():
            assert (s["sweep"] / r["dir"] / "DONE").exists(), (name, r)
        assert "2 done" in s["out"], name  # the SweepSummary callback ran after the multirun
    # submitit really ran the jobs: one job folder with a result each, under the sweep's hydra dir
    assert len(list((sweeps["submitit"]["sweep"] / "hydra" / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.slow
def test_results_are_identical_across_launchers(sweeps):
    run_ids = set(sweeps["basic"]["runs"])
    assert len(run_ids) == 2
    for name, s in sweeps.items():
        assert set(s["runs"]) == run_ids, name  # launcher overrides are Hydra's, not the run's
    for rid in sorted(run_ids):
        ref = _metrics(sweeps["basic"], rid)
        ref_samples = (sweeps["basic"]["sweep"] / "runs" / rid / "samples.jsonl").read_bytes()
        for name in PARALLEL:
            m = _metrics(sweeps[name], rid)
            for key in FINAL_KEYS:
                assert m["final"][key] == ref["final"][key], (rid, name, key)  # bitwise on CPU
            assert m["stages"] == ref["stages"], (rid, name)  # same stage keys, other cache
            assert m["info"]["final_probe_loss"] == ref["info"]["final_probe_loss"], (rid, name)
            samples = (sweeps[name]["sweep"] / "runs" / rid / "samples.jsonl").read_bytes()
            assert samples == ref_samples, (rid, name)
    seeds = [_metrics(sweeps["basic"], rid)["final"]["judge_reward"] for rid in sorted(run_ids)]
    assert seeds[0] != seeds[1]  # the seeds differ, so equality above is not vacuous


@pytest.mark.slow
def test_each_stage_is_built_once_per_sweep(sweeps):
    digests = {}
    for name, s in sweeps.items():
        stages = _stage_dirs(s["cache"])
        assert sorted(stages) == sorted(STAGES), (name, list(stages))  # one directory per stage kind
        assert not list((s["cache"] / "stages").glob(".tmp-*")), name  # no abandoned builds
        records = {k: json.loads((d / "record.json").read_text()) for k, d in stages.items()}
        assert all(r["complete"] is True for r in records.values()), name
        builders = {k: r["built_by"]["pid"] for k, r in records.items()}
        if name == "basic":  # jobs run one after another inside the CLI process
            assert set(builders.values()) == {s["cli_pid"]}, builders
        else:  # built in a worker process, not the launching one
            assert s["cli_pid"] not in builders.values(), (name, builders, s["cli_pid"])
        reused = [_metrics(s, rid)["stages_reused"] for rid in sorted(s["runs"])]
        # the jobs' own logs (submitit's job output never reaches the CLI's)
        logs = "".join(p.read_text() for p in sorted((s["sweep"] / "hydra").glob("job*/cli.log")))
        for stage in STAGES:  # exactly one job built the stage, the other found it on disk
            assert sorted(r[stage] for r in reused) == [False, True], (name, stage, reused)
            assert logs.count(f"stage {stage}: built") == 1, (name, stage)
            assert logs.count(f"stage {stage}: reusing") == 1, (name, stage)
        digests[name] = {k: _digest(d) for k, d in stages.items()}
        for rid in s["runs"]:  # the jobs used the very directories found in the cache
            assert {k: f"{k}-{key}" for k, key in _metrics(s, rid)["stages"].items()} == \
                {k: d.name for k, d in stages.items()}, (name, rid)
    # the builds in three different kinds of process are bitwise the same artifacts
    assert digests["joblib"] == digests["basic"] and digests["submitit"] == digests["basic"]


@pytest.mark.slow
def test_parallel_jobs_wait_for_the_stage_being_built(sweeps):
    """In the parallel launchers both jobs were running while the base LM was being built: the
    job that reused it started before the build finished, so it waited on the lock (not built
    after the fact in sequence, as with the basic launcher)."""
    for name in PARALLEL:
        s = sweeps[name]
        base = json.loads((_stage_dirs(s["cache"])["base"] / "record.json").read_text())
        for rid in s["runs"]:
            assert _status(s, rid)["started"] <= base["built_at"], (name, rid, base["built_at"])
    s = sweeps["basic"]
    base = json.loads((_stage_dirs(s["cache"])["base"] / "record.json").read_text())
    later = [rid for rid in s["runs"] if _metrics(s, rid)["stages_reused"]["base"]]
    assert len(later) == 1 and _status(s, later[0])["started"] >= base["built_at"]
