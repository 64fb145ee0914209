"""`alignbench bench`: every benchmark runs both sides on the same batches and reports real throughputs."""
from __future__ import annotations

import json

import pytest
import torch

from alignbench.bench import bound_fraction, main, markdown, summary
from alignbench.bench.core import (Side, arithmetic_bound, batch_digest, decode_matmul_shape, mfu, padding_fraction,
                                   peak_bf16_flops, real_tokens, sampled_tokens, select)
from alignbench.precision import native_bf16
from tests.conftest import shared_data

# A model and batch small enough for seconds: the point is that both sides run, not the numbers.
MINI = ["--steps", "2", "--batch-size", "2", "--seq-len", "96", "--max-new-tokens", "4", "--pairs", "24",
        "--vocab-size", "300", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
        "--intermediate-size", "64", "--threads", "1"]
PEERS = {"dpo": ("trl", "trl.DPOTrainer"), "pm": ("trl", "trl.RewardTrainer"),
         "generate": ("hf", "transformers generate(do_sample=True)"), "train-loop": ("torch", "plain torch loop")}
SUMMARY_KEYS = {"bench", "ours_tok_s", "peer_tok_s", "ratio", "ours_peak_mb", "peer_peak_mb", "padding_fraction"}


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("what", ["dpo", "pm", "generate", "train-loop"])
def test_bench_reports_both_sides_and_a_summary(what, capsys, tmp_path):
    out_file = tmp_path / "rows.jsonl"
    assert main([what, *MINI, "--out", str(out_file)]) == 0
    lines = _lines(capsys)
    assert lines == [json.loads(line) for line in out_file.read_text().splitlines()]
    ours, peer, summ = lines
    assert [ours["side"], peer["side"]] == ["alignbench", PEERS[what][0]] and peer["impl"].startswith(PEERS[what][1])
    for r in (ours, peer):
        assert r["bench"] == what and r["steps"] == 2 and r["data"] == "hh_synth", r
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 and r["peak_mem_mb"] >= 0, r
        assert r["batch_size"] == 2 and r["threads"] == 1 and r["mfu"] is None  # mfu: CUDA only
        assert r["precision"] == "fp32" and "precision_note" not in r  # the CPU default
    assert SUMMARY_KEYS <= set(summ) and "side" not in summ and summ["bench"] == what
    assert summ["ours_bound_fraction"] > 0 and summ["peer_bound_fraction"] > 0 and summ["matmul_shape"] == [2, 32, 64]
    assert summ["ratio"] == pytest.approx(summ["ours_tok_s"] / summ["peer_tok_s"], rel=1e-2)
    assert (summ["ours_tok_s"], summ["peer_tok_s"]) == (ours["tokens_per_s"], peer["tokens_per_s"])
    assert (summ["ours_peak_mb"], summ["peer_peak_mb"]) == (ours["peak_mem_mb"], peer["peak_mem_mb"])
    # the same batches reached both sides: the peer's digest is of what its collator produced
    assert ours["batch_sha"] == peer["batch_sha"] and summ["same_batches"] is True
    assert 0 < summ["padding_fraction"] < 1 and summ["padding_fraction"] == ours["padding_fraction"]
    if what != "generate":  # same batches, one counting rule: the same real tokens
        assert ours["tokens"] == peer["tokens"]
        # same start, same data: the losses agree closely (DPO: both ≈ log 2 at π = π0)
        assert ours["mean_loss"] == pytest.approx(peer["mean_loss"], rel=0.05)
    else:  # at most max_new_tokens sampled per prompt, filler not counted
        assert 0 < ours["tokens"] <= 2 * 2 * 4 and 0 < peer["tokens"] <= 2 * 2 * 4
    if what == "dpo":
        assert ours["ref_precompute_s"] > 0


@pytest.mark.parametrize("what", ["dpo", "pm", "generate", "train-loop"])
def test_precision_bf16_runs_both_sides_under_bf16_autocast(what, capsys, monkeypatch):
    """--precision bf16: every F.linear of both sides (ours, TRL's trainers with their reference pass,
    HF generate, the plain loop) runs under bf16 autocast, and every row says bf16."""
    linear, seen = torch.nn.functional.linear, []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    assert main([what, *MINI, "--precision", "bf16"]) == 0
    ours, peer, summ = _lines(capsys)
    assert ours["precision"] == peer["precision"] == summ["precision"] == "bf16"
    assert len(seen) > 10 and all(seen), f"{seen.count(False)} of {len(seen)} linear calls outside autocast"
    emulated = not native_bf16(torch.device("cpu"))  # this machine's CPU: its rows say so
    assert all(("precision_note" in r) == emulated for r in (ours, peer)), ours
    if what != "generate":  # same start, same batches, both in bf16: the losses agree as in fp32
        assert ours["mean_loss"] == pytest.approx(peer["mean_loss"], rel=0.05)


def test_token_counting_and_padding_on_a_hand_built_batch():
    rows = [[5, 6, 7], [8]]  # padded to 3: 4 real tokens in 6 slots
    assert real_tokens(rows) == 4
    assert padding_fraction([[3, 1]]) == pytest.approx(2 / 6)
    # two batches: (6 slots, 4 real) and (4 slots, 4 real) -> 2 pads in 10 slots
    assert padding_fraction([[3, 1], [2, 2]]) == pytest.approx(0.2)
    assert padding_fraction([]) == 0.0
    side = Side("dpo", "alignbench", "x")
    side.add_step(2.0, rows)
    side.add_step(1.0, [[1, 2], [3, 4]])
    side.add_step(1.0, [[1]], tokens=9)  # generate: the sampled count is given
    assert side.finish(4.0, 1.0).tokens == 4 + 4 + 9
    assert side.tokens_per_s() == pytest.approx((4 + 9) / 2.0)  # the first step is warm-up
    # generate: up to and including the first EOS (2); what follows is filler
    assert sampled_tokens([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9]], eos=2) == 2 + 4 + 1
    assert batch_digest([rows]) == batch_digest([[[5, 6, 7], [8]]]) != batch_digest([[[8], [5, 6, 7]]])


def test_selection_is_seeded_random_and_skips_what_does_not_fit():
    pool = list(range(100))
    fit = lambda x: x if x % 2 == 0 else None  # noqa: E731  odd items are "too long"
    a, b = select(pool, fit, 10, seed=0, what="items"), select(pool, fit, 10, seed=0, what="items")
    assert a.items == b.items and all(x % 2 == 0 for x in a.items) and len(set(a.items)) == 10
    assert a.items != list(range(0, 20, 2))  # random pairs, not the first ones
    assert select(pool, fit, 10, seed=1, what="items").items != a.items
    assert a.scanned == 10 + a.dropped and a.dropped_fraction == pytest.approx(a.dropped / a.scanned)
    with pytest.raises(Exception, match="only 50 of 100 items fit"):
        select(pool, fit, 51, seed=0, what="items")


def test_mfu_from_the_device_table():
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16_flops("NVIDIA A10") == 125e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Some Future GPU") is None and mfu(6e9, 1000.0, "Some Future GPU") is None
    assert mfu(6 * 135e6, 1e5, "NVIDIA H200") == pytest.approx(6 * 135e6 * 1e5 / 989e12)


def test_summary_and_markdown_table():
    rows = [{"bench": "dpo", "side": s, "impl": s, "steps": 2, "tokens": 10, "tokens_per_s": t, "step_ms": 1.0,
             "wall_s": 2.0, "peak_mem_mb": m, "padding_fraction": 0.25, "batch_sha": "ab", "mfu": None}
            for s, t, m in (("alignbench", 6.0, 3.0), ("trl", 4.0, 5.0))]
    summ = summary("dpo", rows)
    assert {k: summ[k] for k in SUMMARY_KEYS} == {"bench": "dpo", "ours_tok_s": 6.0, "peer_tok_s": 4.0, "ratio": 1.5,
                                                  "ours_peak_mb": 3.0, "peer_peak_mb": 5.0, "padding_fraction": 0.25}
    table = markdown(rows + [summ]).splitlines()
    assert len(table) == 4 and table[2].endswith("| 1.50x |") and "| trl |" in table[3]
    assert summary("ppo", rows[:1])["ratio"] is None  # no peer


def test_bound_fractions_are_model_flops_over_the_measured_matmul_rate():
    """generate: 2·N per sampled token; a training bench 6·N; over the faster measured matmul."""
    rows = [{"bench": "generate", "side": s, "impl": s, "tokens_per_s": t, "peak_mem_mb": 1.0, "n_params": 100_000_000,
             "padding_fraction": 0.1, "batch_sha": "ab", "mfu": None} for s, t in (("alignbench", 150.0), ("hf", 60.0))]
    bound = {"matmul_shape": [32, 576, 1536], "matmul_gflops_fp32": 80.0, "matmul_gflops_bf16": 200.0,
             "bound_gflops": 200.0, "bound_dtype": "bf16"}
    summ = summary("generate", rows, bound)
    # 2 · 1e8 · 150 / 2e11 = 0.15; 2 · 1e8 · 60 / 2e11 = 0.06
    assert (summ["ours_bound_fraction"], summ["peer_bound_fraction"]) == (0.15, 0.06)
    assert summ["matmul_gflops_fp32"] == 80.0 and summ["bound_dtype"] == "bf16"
    assert bound_fraction(rows[0], "dpo", 200.0) == 0.45  # 6 · 1e8 · 150 / 2e11
    assert summary("generate", rows[:1], bound)["peer_bound_fraction"] is None
    assert bound_fraction(rows[0], "dpo", 0) is None


def test_arithmetic_bound_measures_both_dtypes_on_the_decode_shape():
    from types import SimpleNamespace
    shape = decode_matmul_shape(SimpleNamespace(hidden_size=576, intermediate_size=1536), 32)
    assert shape == (32, 576, 1536)
    assert decode_matmul_shape(SimpleNamespace(n_embd=64, n_inner=None), 4) == (4, 64, 256)  # GPT-2: 4·n_embd
    bound = arithmetic_bound((8, 32, 48), torch.device("cpu"), reps=2)
    assert bound["matmul_gflops_fp32"] > 0 and bound["matmul_gflops_bf16"] > 0
    assert bound["bound_gflops"] == max(bound["matmul_gflops_fp32"], bound["matmul_gflops_bf16"])
    assert bound["bound_dtype"] == ("bf16" if bound["bound_gflops"] == bound["matmul_gflops_bf16"] else "fp32")


@pytest.mark.parametrize("argv", [["nope"], ["dpo", "--steps", "0"], ["dpo", "--beta", "0"], ["dpo", "--seq-len", "8"],
                                  ["dpo", "--precision", "fp16"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "alignbench bench" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--model", "/no/such/model"], "--model /no/such/model: neither smollm2 nor a local save_pretrained"),
    (["pm", "--data-path", "EMPTY"], "--data-path EMPTY: no HH files there"),
    (["generate", "--data", "hh_rlhf"], "--data hh_rlhf: needs --data-path"),
])
def test_bad_model_or_data_fail_in_one_line_before_anything_is_built(argv, message, capsys, tmp_path):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("alignbench bench: error: " + message.replace("EMPTY", str(tmp_path))), err


def test_real_hh_batches_are_the_same_for_both_sides(capsys):
    path = shared_data("hh-rlhf")
    assert main(["pm", *MINI, "--data", "hh_rlhf", "--data-path", str(path), "--seq-len", "160"]) == 0
    captured = capsys.readouterr()
    ours, peer, summ = [json.loads(line) for line in captured.out.splitlines()]
    assert summ["data"] == "hh_rlhf" and summ["same_batches"] is True and ours["tokens"] == peer["tokens"]
    assert 0 < summ["dropped_fraction"] < 1 and 0 < summ["padding_fraction"] < 1  # real HH lengths vary
    assert f"{100 * summ['dropped_fraction']:.1f}% of those scanned dropped" in captured.err


@pytest.mark.parametrize("what", ["pm", "ppo", "dpo"])
def test_solo_benches_with_lora_and_gradient_checkpointing(what, capsys):
    assert main([what, *MINI, "--lora", "--lora-r", "4", "--grad-ckpt"]) == 0
    r, summ = _lines(capsys)
    assert r["side"] == "alignbench" and summ["peer_tok_s"] is None and summ["ratio"] is None  # no peer under --lora
    assert r["bench"] == what and r["steps"] == 2 and r["tokens"] > 0 and r["tokens_per_s"] > 0, r
    assert "LoRA r=4, grad ckpt" in r["impl"] and r["process_maxrss_mb"] > 0


@pytest.mark.parametrize("what", ["pm", "ppo", "dpo", "train-loop"])
def test_solo_benches_train_only_the_top_layers(what, capsys):
    assert main([what, *MINI, "--num-layers", "2", "--trainable-layers", "1"]) == 0
    r, summ = _lines(capsys)
    assert r["side"] == "alignbench" and summ["peer_tok_s"] is None  # the peers train every weight: no peer
    assert r["bench"] == what and r["steps"] == 2 and r["tokens"] > 0 and "top 1 layers" in r["impl"], r


@pytest.mark.parametrize("argv, message", [
    (["pm", "--trainable-layers", "-1"], "--trainable-layers: must be >= 0, got -1"),
    (["pm", "--trainable-layers", "5"], "--trainable-layers: must be between 0 and the model's 4 layers"),
    (["dpo", "--trainable-layers", "1", "--lora"], "--trainable-layers: cannot be combined with --lora"),
])
def test_bad_trainable_layers_fail_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("alignbench bench: error: " + message), err


def test_measure_shares_the_trunk_and_computes_bitwise_what_separate_forwards_do(capsys):
    """bench measure: the two PMs, the policy and π0 over the same batches, with one pass over the
    blocks below the top K against four forwards: the same numbers (digest), the shared blocks named."""
    mini = [a if a != "1" or prev != "--num-layers" else "3" for prev, a in zip([""] + MINI, MINI)]
    assert main(["measure", *mini, "--trainable-layers", "1"]) == 0
    ours, peer, summ = _lines(capsys)
    assert (ours["side"], peer["side"], summ["bench"]) == ("alignbench", "separate", "measure")
    assert ours["shared_blocks"] == peer["shared_blocks"] == 2  # 3 blocks, the top 1 moved
    assert ours["outputs_sha"] == peer["outputs_sha"] and ours["batch_sha"] == peer["batch_sha"]
    assert ours["tokens"] == peer["tokens"] > 0 and ours["packing"] and peer["packing"]
