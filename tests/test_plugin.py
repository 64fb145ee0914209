"""A third-party method plugin, installed as a real distribution with its entry point, runs in a
sweep next to the built-ins; and the worked example in docs/methods.md is exactly the plugin tested here."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

EXAMPLE = Path(__file__).parent / "plugin_example"


def test_docs_example_is_the_tested_plugin():
    page = (REPO / "docs" / "methods.md").read_text()
    shown = re.search(r"```python\n# my_sft/method.py\n(.*?)```", page, re.S).group(1)
    assert shown in (EXAMPLE / "my_sft" / "method.py").read_text()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    target, src = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(EXAMPLE, src)  # pip writes build/ into the source: keep the repo clean
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True)
    assert list(target.glob("my_sft-0.1.0.dist-info/entry_points.txt"))
    return target


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_plugin_is_listed(plugin_site):
    out = subprocess.run([sys.executable, "-m", "alignbench.cli", "methods"], env=_env(plugin_site),
                         capture_output=True, text=True, check=True).stdout
    assert "my_sft" in out and "my-sft" in out and "dpo" in out


def test_plugin_runs_in_a_sweep_next_to_a_builtin(plugin_site, stage_cache, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "alignbench.cli", "run", "-m", "method=context_distilled,my_sft",
           *TINY, f"paths.cache_dir={stage_cache}", f"paths.sweep_dir={sweep}"]
    subprocess.run(cmd, env=_env(plugin_site), check=True, cwd=tmp_path, capture_output=True)
    index = json.loads((sweep / "index.json").read_text())
    assert {(r["method"], r["status"]) for r in index["runs"]} == {("context_distilled", "done"), ("my_sft", "done")}
    dirs = {r["method"]: sweep / r["dir"] for r in index["runs"]}
    base = json.loads((dirs["context_distilled"] / "metrics.json").read_text())
    sft = json.loads((dirs["my_sft"] / "metrics.json").read_text())
    assert base["stages"] == sft["stages"]  # same π0 and PM for both
    assert sft["cost"]["tokens_trained"] > 0 and sft["final"]["kl_k3"] > 0
    assert sft["cost"]["flops"] > 6 * sft["cost"]["tokens_trained"]  # charged through ctx.charge_step
