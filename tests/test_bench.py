"""`alignbench bench`: every benchmark runs both sides on the same work and reports real throughputs."""
from __future__ import annotations

import json

import pytest

from alignbench.bench import main, markdown

# A model and batch small enough for seconds: the point is that both sides run, not the numbers.
MINI = ["--steps", "2", "--batch-size", "2", "--seq-len", "96", "--max-new-tokens", "4", "--pairs", "24",
        "--vocab-size", "300", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
        "--intermediate-size", "64", "--threads", "1", "--format", "json"]
PEERS = {"dpo": "trl", "generate": "hf", "train-loop": "torch"}


@pytest.mark.parametrize("what", ["dpo", "generate", "train-loop"])
def test_bench_reports_both_sides(what, capsys, tmp_path):
    out_file = tmp_path / "rows.json"
    assert main([what, *MINI, "--out", str(out_file)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(out_file.read_text())
    assert [r["side"] for r in rows] == ["alignbench", PEERS[what]]
    for r in rows:
        assert r["bench"] == what and r["steps"] == 2, r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["peak_mem_mb"] >= 0, r
        assert r["batch_size"] == 2 and r["threads"] == 1
    ours, peer = rows
    assert ours["speedup_vs_peer"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"], rel=1e-2)
    if what in ("dpo", "train-loop"):  # same pairs/batches and tokenizer: both sides train on the same tokens
        assert ours["tokens"] == peer["tokens"]
        # same start, same data: the first steps' losses agree closely (DPO: both ≈ log 2 at π = π0)
        assert ours["mean_loss"] == pytest.approx(peer["mean_loss"], rel=0.05)
    if what == "dpo":
        assert ours["ref_precompute_s"] > 0


def test_markdown_table_has_one_line_per_side():
    rows = [{"bench": "dpo", "side": s, "impl": s, "steps": 2, "tokens": 10, "tokens_per_s": 5.0, "step_ms": 1.0,
             "wall_s": 2.0, "peak_mem_mb": 1.0, **({"speedup_vs_peer": 1.5} if s == "alignbench" else {})}
            for s in ("alignbench", "trl")]
    table = markdown(rows).splitlines()
    assert len(table) == 4 and table[2].endswith("| 1.50x |") and "| trl |" in table[3]


@pytest.mark.parametrize("argv", [["nope"], ["dpo", "--steps", "0"], ["dpo", "--beta", "0"], ["dpo", "--seq-len", "8"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "alignbench bench" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["pm", "ppo", "dpo"])
def test_solo_benches_with_lora_and_gradient_checkpointing(what, capsys):
    assert main([what, *MINI, "--lora", "--lora-r", "4", "--grad-ckpt"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["side"] == "alignbench"  # no peer under --lora
    r = rows[0]
    assert r["bench"] == what and r["steps"] == 2 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
    assert "LoRA r=4, grad ckpt" in r["impl"] and r["process_maxrss_mb"] > 0
