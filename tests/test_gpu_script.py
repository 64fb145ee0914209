"""scripts/hh_smollm2_gpu.sh cannot rot while no GPU is at hand (issue 10 §9): its --smoke mode runs the
same stages, every method and the report on CPU with tiny sizes; this checks the report has every method.
Its preflight fails in seconds, naming what is missing."""
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import REPO, shared_data, shared_dir
from tests.test_smollm2_e2e import smollm2_file

SCRIPT = REPO / "scripts" / "hh_smollm2_gpu.sh"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, **extra}


def test_preflight_names_the_missing_gguf(tmp_path):
    env = _env(ALIGNBENCH_SMOLLM2=str(tmp_path / "absent.gguf"), ALIGNBENCH_HH_PATH=str(tmp_path))
    res = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "SmolLM2's GGUF not found" in res.stderr and "ALIGNBENCH_SMOLLM2" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.slow(minutes=3)
@pytest.mark.timeout(3600)  # a few minutes on 2 free cores; far longer when the cores are shared
def test_smoke_run_reports_every_method(tmp_path, tmp_path_factory):
    # the stage cache the SmolLM2 end-to-end tests use: the GGUF is converted once per session
    env = _env(ALIGNBENCH_SMOLLM2=str(smollm2_file()), ALIGNBENCH_HH_PATH=str(shared_data("hh-rlhf")),
               ALIGNBENCH_CACHE=str(shared_dir(tmp_path_factory, "smollm2-cache")))
    res = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=3500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    banners = [line for line in res.stdout.splitlines() if line.startswith("==== [")]
    assert len(banners) == 9 and banners[-1].endswith("done ====")  # stages, 6 runs, report, done
    rows = pd.read_csv(tmp_path / "report" / "results.csv")
    policy = rows[rows.evaluator == "policy"]
    assert {"context_distilled", "dpo", "ppo", "rejection_sampling", "rrhf"} <= set(policy.method)
    assert policy.config.str.contains("method.mode=finetune").any()  # RS fine-tuning beside best-of-n
    assert "win_rate" in set(rows.evaluator) and (tmp_path / "report" / "report.md").exists()
    hw = pd.read_json(next((tmp_path / "sweep" / "runs").glob("dpo*/metrics.json")), typ="series")["hardware"]
    assert hw == {"processes": 1, "device": "cpu", "precision": "fp32"}
