"""``alignbench tune-pm``: the grid, the eval split as the only thing scored, one line per finished
point, and a rerun that trains nothing already done."""
import json

import pytest

from alignbench.cli import compose, main
from alignbench.config import ConfigError, to_config
from alignbench.data import load_data, pairwise_config
from alignbench.stages import pm_tuning


def test_grid_points_are_the_product_in_order_and_only_the_pm_recipe():
    points = pm_tuning.grid_points(["model.trainable_layers=2,4", "stages.pm.lr=1e-3,3e-4"])
    assert points == [{"model.trainable_layers": "2", "stages.pm.lr": "1e-3"},
                      {"model.trainable_layers": "2", "stages.pm.lr": "3e-4"},
                      {"model.trainable_layers": "4", "stages.pm.lr": "1e-3"},
                      {"model.trainable_layers": "4", "stages.pm.lr": "3e-4"}]
    with pytest.raises(ConfigError, match="^method.lr: tune-pm tunes the PM's recipe only"):
        pm_tuning.grid_points(["method.lr=1e-3"])
    with pytest.raises(ConfigError, match="expected key=v1,v2"):
        pm_tuning.grid_points(["stages.pm.lr"])


def test_tune_pm_scores_the_eval_split_and_resumes(tiny_overrides, tmp_path, monkeypatch, capsys):
    over = [o for o in tiny_overrides if not o.startswith("model.num_layers")] + ["model.num_layers=2"]
    out = tmp_path / "tuning.jsonl"
    argv = ["tune-pm", "--grid", "model.trainable_layers=1", "--grid", "stages.pm.lr=1e-3,1e-2", "--out", str(out), *over]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cfg = to_config(compose(over))
    n_eval = len(load_data(pairwise_config(cfg.data)).eval)
    assert [r["point"]["stages.pm.lr"] for r in rows] == ["1e-3", "1e-2"]
    assert all(r["eval_pairs"] == n_eval == r["eval"]["all"]["n"] and r["trunk_cache_depth"] == 1 for r in rows)
    assert rows[0]["eval"] != rows[1]["eval"] or rows[0]["final_loss"] != rows[1]["final_loss"]  # lr mattered
    table = capsys.readouterr().out
    best = max(rows, key=lambda r: r["eval"]["all"]["accuracy"])
    assert table.splitlines()[2].startswith(f"| 1 | {best['point']['stages.pm.lr']} | {best['eval']['all']['accuracy']:.3f}")
    # a rerun (after a kill that tore the line being written) trains nothing already done
    out.write_text(out.read_text() + '{"point": {"model.trai')
    monkeypatch.setattr(pm_tuning, "train_pm", lambda *a, **k: pytest.fail("a finished point retrained"))
    assert main(argv) == 0
    assert [r["point"] for r in pm_tuning.done_points(out).values()] == [r["point"] for r in rows]
