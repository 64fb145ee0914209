"""`alignbench study`: the parts of a study run in order, each finished part is recorded in
study.json and skipped on a rerun; a study killed mid-part resumes to the same results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from alignbench.cli import main
from alignbench.config import ConfigError
from alignbench.eval.nlp_tasks import EVALUATOR as NLP_EVAL
from alignbench.study import Part, Study, fingerprint, hms, parse_study, run_study

# tiny everything: a study of three parts takes ~20 s of CPU
MINI = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.intermediate_size=64", "model.max_seq_len=256", "data.synth.n_pairs=300", "stages.base.epochs=1",
        "stages.base.batch_size=64", "stages.pi0.epochs=0.25", "stages.pm.epochs=1", "stages.pm.lr=2e-3",
        "eval.n_prompts=8", "eval.bootstrap=100", "train.max_new_tokens=8", "train.batch_size=16",
        "train.num_threads=1"]

STUDY = """
overrides: [name=mini]
parts:
  - name: pi0                     # builds the shared stages inside its one run
    sweep: [method=context_distilled]
  - name: dpo
    sweep: [method=dpo, method.max_steps=6, train.checkpoint_every=2, "seed=0,1"]
  - name: report
    report: reports/never-used     # replaced by --out
"""


def _files(root: Path) -> dict:
    """path -> (size, mtime in ns) of every file under ``root``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _results(sweep: Path) -> dict:
    """run -> (final metrics without timings, samples): what must not depend on a kill."""
    out = {}
    for run in sorted((sweep / "runs").iterdir()):
        final = json.loads((run / "metrics.json").read_text())["final"]
        out[run.name] = ({k: v for k, v in final.items() if not k.endswith("_s")}, (run / "samples.jsonl").read_text())
    return out


def test_killed_study_resumes_without_redoing_finished_parts_and_ends_as_an_uninterrupted_one(tmp_path):
    study = tmp_path / "mini.yaml"
    study.write_text(STUDY)
    common = [str(study), *MINI, f"paths.cache_dir={tmp_path / 'cache'}"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alignbench.cli", "study", "--out", str(tmp_path / "report-a"), *common,
           f"paths.sweep_dir={killed}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 240
        # kill it inside part 2: its first run finished, the second one started
        while time.time() < deadline and proc.poll() is None:
            if (list(killed.glob("runs/dpo_s0*/DONE")) and list(killed.glob("runs/dpo_s1*/status.json"))
                    and not list(killed.glob("runs/dpo_s1*/DONE"))):
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    progress = json.loads((killed / "study.json").read_text())
    assert list(progress["parts"]) == ["pi0"]  # part 1 recorded, part 2 not
    part1 = {r: _files(r) for r in killed.glob("runs/context_distilled*")}
    dpo_s0 = {r: _files(r) for r in killed.glob("runs/dpo_s0*")}
    assert len(part1) == 1 and len(dpo_s0) == 1

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    banners = [line for line in again.stdout.splitlines() if line.startswith("== [study mini]")]
    assert banners[0].startswith("== [study mini] part 1/3 'pi0' (sweep): finished earlier in ")
    assert banners[-1].startswith("== [study mini] complete: pi0 ")
    assert not any("part 1/3 'pi0' (sweep): starting" in line for line in banners)
    assert {r: _files(r) for r in part1} == part1  # part 1 not redone: its runs' files untouched
    assert {r: _files(r) for r in dpo_s0} == dpo_s0  # nor part 2's finished run
    done = json.loads((killed / "study.json").read_text())["parts"]
    assert set(done) == {"pi0", "dpo", "report"} and done["pi0"] == progress["parts"]["pi0"]
    assert all(p["seconds"] > 0 for p in done.values()) and (tmp_path / "report-a" / "report.md").is_file()

    whole = tmp_path / "whole"  # the same study uninterrupted (in this process; stages cached)
    assert main(["study", "--out", str(tmp_path / "report-b"), *common, f"paths.sweep_dir={whole}"]) == 0
    assert len(_results(killed)) == 3 and _results(killed) == _results(whole)
    assert ((tmp_path / "report-a" / "results.csv").read_text().splitlines()[0]
            == (tmp_path / "report-b" / "results.csv").read_text().splitlines()[0])


def test_finished_parts_are_skipped_and_a_changed_part_reruns(tmp_path, capsys):
    study = parse_study("s", "parts:\n  - {name: a, stages: [x=1]}\n  - {name: b, report: out}\n")
    calls = []

    def run_part(part, overrides, report_dir):
        calls.append((part.name, overrides, report_dir))
        return 0

    assert run_study(study, tmp_path, ["y=2"], None, run_part) == 0
    assert calls == [("a", ["x=1", "y=2"], None), ("b", [], "out")]
    assert run_study(study, tmp_path, ["y=2"], None, run_part) == 0 and len(calls) == 2  # all skipped
    assert run_study(study, tmp_path, ["y=3"], "elsewhere", run_part) == 0  # both changed: both rerun
    assert calls[2:] == [("a", ["x=1", "y=3"], None), ("b", [], "elsewhere")]
    assert "finished earlier" in capsys.readouterr().out


def test_a_failing_part_stops_the_study_and_is_not_recorded(tmp_path):
    study = parse_study("s", "parts:\n  - {name: a, stages: []}\n  - {name: b, sweep: [method=dpo]}\n"
                             "  - {name: c, report: out}\n")
    ran = []
    assert run_study(study, tmp_path, [], None, lambda p, o, r: ran.append(p.name) or (2 if p.name == "b" else 0)) == 2
    assert ran == ["a", "b"] and list(json.loads((tmp_path / "study.json").read_text())["parts"]) == ["a"]


@pytest.mark.parametrize("text, message", [
    ("parts: []", "parts is empty"),
    ("parts:\n  - {name: a}", r"parts\[0\]: needs a name and exactly one of stages, sweep, report"),
    ("parts:\n  - {name: a, stages: [], sweep: []}", "exactly one of"),
    ("parts:\n  - {name: a, stages: []}\n  - {name: a, report: r}", "'a' is used twice"),
    ("parts:\n  - {name: a, sweep: x=1}", r"parts\[0\].sweep: a list of overrides"),
    ("parts:\n  - {name: a, report: [r]}", r"parts\[0\].report: the report's output directory"),
    ("steps: []", "keys are overrides and parts"),
])
def test_bad_study_definitions_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_study("s", text)


def test_study_helpers():
    assert [hms(s) for s in (3.44, 123, 3723)] == ["3.4s", "2m 03s", "1h 02m 03s"]
    study, part = Study("s", ("a=1",), ()), Part("p", "sweep", ("b=2",))
    assert fingerprint(study, part, [], None) != fingerprint(study, part, ["c=3"], None)


def test_the_cpu_study_of_smollm2_parses_and_names_its_report():
    study = parse_study("hh_smollm2_cpu", (Path(__file__).parents[1] / "conf/study/hh_smollm2_cpu.yaml").read_text())
    assert study.overrides == ("experiment=hh_smollm2_cpu",)
    assert study.parts[0].kind == "stages" and study.parts[-1].args == ("reports/hh-smollm2-cpu",)
    assert {p.kind for p in study.parts[1:-1]} == {"sweep"}


def test_a_study_with_a_missing_input_fails_before_its_first_part(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNBENCH_SMOLLM2", str(tmp_path / "gone.gguf"))
    assert main(["study", "hh_smollm2_cpu", f"paths.sweep_dir={tmp_path / 'sweep'}",
                 f"paths.cache_dir={tmp_path / 'cache'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignbench")]
    assert len(err) == 1 and "ALIGNBENCH_SMOLLM2" in err[0] and "alignbench fetch-model smollm2" in err[0]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()


# the study's own parts at tiny sizes: each method's run is one or two steps on 2 prompts
MINIATURE = {
    "method=context_distilled": [],
    "method=dpo": ["method.max_steps=1", "method.probe_pairs=2", "method.ref_batch_size=2"],
    "method=rejection_sampling": ["method.n=2", "method.kl_pool=2", "method.rounds=1", "method.prompts_per_round=2"],
    "method=ppo": ["method.steps=1", "method.rollout_batch_size=2", "method.ppo_epochs=1", "method.batch_size=2"],
    "method=rrhf": ["method.steps=1", "method.prompts_per_step=2", "method.k_samples=1"],
    "method=chain": ["method.stages=[{name:preferred_ft,max_steps:1,batch_size:2,eval_every:1},"
                     "{name:dpo,max_steps:1,batch_size:2,probe_pairs:2,ref_batch_size:2,eval_every:1}]"],
}
TINY_SMOLLM2 = ["seed=0", "data.max_pairs=64", "model.max_seq_len=64", "stages.pm.judgements=null",
                "stages.pm.batch_size=2", "stages.pm.max_steps=2", "train.batch_size=2", "train.max_new_tokens=4",
                "eval.n_prompts=2", "eval.bootstrap=100", "eval.nlp_limit=2", "eval.nlp_tasks=[local_sst2]"]


@pytest.mark.slow(minutes=3)
@pytest.mark.timeout(1800)  # about 3 minutes on a free core; far longer when the cores are shared
def test_the_cpu_study_in_miniature_runs_every_part_and_reports_every_method(tmp_path, tmp_path_factory, monkeypatch):
    from tests.conftest import shared_data, shared_dir
    from tests.test_smollm2_e2e import smollm2_file
    real = parse_study("hh_smollm2_cpu", (Path(__file__).parents[1] / "conf/study/hh_smollm2_cpu.yaml").read_text())
    parts = []
    for part in real.parts:  # the real parts, in order, each with its method's tiny sizes appended
        if part.kind == "sweep":
            method = next(a for a in part.args if a.startswith("method="))
            parts.append({"name": part.name, "sweep": [*part.args, *MINIATURE[method]]})
        else:
            parts.append({"name": part.name, part.kind: list(part.args) if part.kind == "stages" else part.args[0]})
    mini = tmp_path / "hh_smollm2_cpu.yaml"
    mini.write_text(json.dumps({"overrides": list(real.overrides), "parts": parts}))
    monkeypatch.setenv("ALIGNBENCH_SMOLLM2", str(smollm2_file()))
    monkeypatch.setenv("ALIGNBENCH_HH_PATH", str(shared_data("hh-rlhf")))
    cache = shared_dir(tmp_path_factory, "smollm2-cache")  # the GGUF is converted once per session
    sweep = tmp_path / "sweep"
    assert main(["study", str(mini), "--out", str(tmp_path / "report"), *TINY_SMOLLM2, f"paths.cache_dir={cache}",
                 f"paths.sweep_dir={sweep}"]) == 0
    done = json.loads((sweep / "study.json").read_text())["parts"]
    assert set(done) == {p.name for p in real.parts}
    metrics = [json.loads(p.read_text()) for p in sorted(sweep.glob("runs/*/metrics.json"))]
    assert {m["seed"] for m in metrics} == {0} and len(metrics) == len(real.parts) - 2  # one run per method part
    assert sorted(m["method"] for m in metrics) == ["chain", "context_distilled", "dpo", "dpo", "ppo",
                                                    "rejection_sampling", "rejection_sampling", "rrhf"]
    assert sum("method.loss=ipo" in m["config"] for m in metrics) == 1  # IPO is its own configuration
    assert sum("method.mode=finetune" in m["config"] for m in metrics) == 1  # and so is RS fine-tuning
    rows = pd.read_csv(tmp_path / "report" / "results.csv")
    nlp = rows[rows.evaluator == NLP_EVAL]  # π0 and every trained policy (best-of-n has no weights of its own)
    assert set(nlp.slice) == {"local_sst2"}  # the study's three tasks, one in miniature
    assert set(nlp.method) == {"context_distilled", "dpo", "ppo", "chain", "rrhf", "rejection_sampling"}
    assert (tmp_path / "report" / "report.md").read_text().lstrip().startswith("#")
