"""Shared stages: caching (reuse and exact invalidation), atomic artifacts, and the stage losses."""
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from alignbench.cli import compose
from alignbench.config import ModelConfig, to_config
from alignbench.models import load_lm, tiny_lm, train_tokenizer
from alignbench.stages.base import build_base
from alignbench.cache import Artifact, build_stage, model_dir, read_record
from alignbench.stages.distill import build_pi0
from alignbench.stages.distill import topk_distill_loss
from alignbench.stages.graph import SharedStages, build_shared_stages
from alignbench.stages.preference import pm_loss


def _stages(overrides):
    return build_shared_stages(to_config(compose(overrides)))


def test_rerun_reuses_every_stage_and_changes_invalidate_exactly(tiny_overrides):
    t0 = time.time()
    first = _stages(tiny_overrides)
    first_s = time.time() - t0
    t0 = time.time()
    again = _stages(tiny_overrides)
    again_s = time.time() - t0
    assert again.reused() == {"base": True, "pi0": True, "pm": True}
    assert again.keys() == first.keys()
    built = sum(a.record["build_seconds"] for a in (first.base, first.pi0, first.pm) if not a.reused)
    assert again_s <= 0.05 * max(first_s, built) or first.base.reused  # (session cache may be warm)

    pm_only = _stages(tiny_overrides + ["stages.pm.lr=1e-3"])
    assert pm_only.base.key == first.base.key and pm_only.pi0.key == first.pi0.key
    assert pm_only.reused() == {"base": True, "pi0": True, "pm": False}

    new_base = _stages(tiny_overrides + ["model.intermediate_size=64"])
    assert new_base.reused() == {"base": False, "pi0": False, "pm": False}
    assert len({new_base.base.key, first.base.key}) == 2


def test_stage_records_carry_config_metrics_and_counts(tiny_config):
    st = build_shared_stages(tiny_config)
    rec = st.pm.record
    assert rec["complete"] and rec["upstream"] == {"pi0": st.pi0.key}
    assert rec["pm"]["epochs"] == 1.0 and rec["data"]["name"] == "hh_synth"
    assert rec["data_counts"]["train_pairs"] > 0 and 0.0 <= rec["metrics"]["heldout_accuracy"] <= 1.0
    # learned something: well below a uniform guess over the vocabulary (ln 512 ≈ 6.24 nats)
    assert st.base.record["metrics"]["heldout_nll"] < 0.7 * math.log(tiny_config.model.vocab_size)
    assert (st.pm.path / "model.safetensors").exists() and (st.pi0.path / "tokenizer.json").exists()


def _tiny_hf_checkpoint(path: Path) -> Path:
    """A `model=hf` checkpoint on disk (a seeded tiny Llama and its tokenizer), as a user's would be."""
    tok = train_tokenizer(["\n\nHuman: What is 2 plus 3?\n\nAssistant: 5."] * 20, vocab_size=300)
    tiny_lm(ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                        max_seq_len=128), tok, seed=5).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _weights(path) -> dict:
    return load_lm(path).state_dict()


def test_pi0_mode_none_points_at_the_base_lm_and_costs_nothing(tmp_path):
    """stages.pi0.mode=none: π0 is the base LM, so its stage holds a record naming the base stage and
    no weights; loading it gives the base LM's weights. A missing base is detected (loading fails
    instead of half-loading) and rebuilt, after which the same π0 record is valid again."""
    cfg = to_config(compose(["model=hf", f"model.name_or_path={_tiny_hf_checkpoint(tmp_path / 'ckpt')}",
                             "model.max_seq_len=128", "data.synth.n_pairs=200", "stages.pi0.mode=none",
                             f"paths.cache_dir={tmp_path / 'cache'}"]))
    base = build_base(cfg)
    t0 = time.time()
    pi0 = build_pi0(cfg, base)
    seconds = time.time() - t0
    assert seconds < 0.5 and not pi0.reused  # no copy, no load: a record (the old copy took ~0.5-40 s)
    assert [p.name for p in pi0.home.iterdir()] == ["record.json"]  # no weights, no tokenizer: a link
    assert pi0.record["weights_from"] == base.home.name == f"base-{base.key}" and pi0.path == base.path
    assert pi0.record["metrics"]["heldout_nll"] == base.record["metrics"]["heldout_nll"]
    a, b = _weights(pi0.home), _weights(tmp_path / "ckpt")  # the loader follows the link
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    moved = tmp_path / "base-moved"
    base.home.rename(moved)  # the pointed-to stage is gone
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        load_lm(pi0.home)
    moved.rename(base.home)  # back under its key (as a rebuild puts it): the π0 record is valid as it is
    assert build_pi0(cfg, base).reused

    shutil.rmtree(base.home)
    with pytest.raises(FileNotFoundError):  # the broken link is detected, and no π0 is left behind
        build_pi0(cfg, base)
    assert not pi0.home.exists()
    new_base = build_base(cfg)  # the graph rebuilds the base first, then π0 links to it again
    again = build_pi0(cfg, new_base)
    assert not new_base.reused and not again.reused and again.key == pi0.key
    c = _weights(again.home)
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_failed_build_leaves_no_artifact(tmp_path):
    def boom(out):
        (out / "half-written.bin").write_text("x")
        raise RuntimeError("killed mid-build")
    with pytest.raises(RuntimeError):
        build_stage("demo", {"k": 1}, tmp_path, boom)
    assert [p.name for p in (tmp_path / "stages").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("damage", ["no_record", "corrupt_record", "incomplete_record", "truncated_file",
                                    "deleted_file"])
def test_untrusted_directory_is_rebuilt(tmp_path, damage):
    calls = []

    def build(out):
        calls.append(1)
        (out / "weights.bin").write_text("ok")
        return {"metrics": {"n": len(calls)}}

    art = build_stage("demo", {"k": 1}, tmp_path, build)
    rec = art.path / "record.json"
    if damage == "no_record":
        rec.unlink()
    elif damage == "corrupt_record":
        rec.write_text("{not json")
    elif damage == "incomplete_record":
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "complete": False}))
    elif damage == "truncated_file":
        (art.path / "weights.bin").write_text("o")
    else:
        (art.path / "weights.bin").unlink()
    assert read_record(art.path) is None or model_dir(art.path) is None
    again = build_stage("demo", {"k": 1}, tmp_path, build)
    assert not again.reused and len(calls) == 2 and again.record["metrics"]["n"] == 2
    assert build_stage("demo", {"k": 1}, tmp_path, build).reused and len(calls) == 2


def test_topk_distill_loss_matches_full_kl_and_vanishes_at_the_teacher():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.ones(2, 5)
    full = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert topk_distill_loss(s, t, mask, k=7) == pytest.approx(full.item(), abs=1e-5)  # k = V: exact KL
    assert topk_distill_loss(t, t, mask, k=3).item() == pytest.approx(0.0, abs=1e-6)
    # k < V lumps the tail into one bucket: a lower bound of the full KL (data processing inequality)
    assert 0 < topk_distill_loss(s, t, mask, k=3).item() <= full.item() + 1e-6


def test_pm_loss_is_bradley_terry_negative_log_likelihood():
    class Fixed(torch.nn.Module):  # a trunk whose last hidden state is the score, and an identity head
        score = torch.nn.Identity()

        def base_model(self, input_ids, attention_mask, use_cache=True):  # pm_scores passes use_cache=False
            hidden = torch.tensor([[9.0, 2.0], [0.5, 9.0], [1.0, 9.0], [9.0, 1.5]])[:, :, None]
            return type("Out", (), {"last_hidden_state": hidden})()
    # right padding: rows 2 and 3 end at position 0, rows 1 and 4 at position 1 (read at the last 1)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1]])
    loss = pm_loss(Fixed(), {"input_ids": None, "attention_mask": mask})
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(1.0)) + torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_later_pi0_stages_keep_the_hhh_pi0_for_the_pms():
    """With safety distillation and GAtt, methods start from the last π0 while every PM (and
    iterated RLHF's retrained ones) starts from the HHH π0; each stage is listed once, in order."""
    art = {name: Artifact(name, f"k-{name}", Path(name), {}, reused=True)
           for name in ("base", "pi0", "pi0-safety", "pi0-gatt", "pm")}
    plain = SharedStages(art["base"], art["pi0"], art["pm"], None)
    assert plain.pm_init_lm is art["pi0"] and list(plain.keys()) == ["base", "pi0", "pm"]
    both = SharedStages(art["base"], art["pi0-gatt"], art["pm"], None, earlier_pi0=(art["pi0"], art["pi0-safety"]))
    assert both.pm_init_lm is art["pi0"]
    assert both.keys() == {"base": "k-base", "hhh_pi0": "k-pi0", "pi0-safety": "k-pi0-safety", "pi0": "k-pi0-gatt",
                           "pm": "k-pm"}
    assert set(both.reused()) == {"base", "pi0", "pi0-safety", "pi0-gatt", "pm"}
