"""Padding-free training (issue 11 §1): every training forward runs on packed sequences, and its
losses and gradients equal the right-padded batch's to 1e-5."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignbench import lora, packing
from alignbench.config import ModelConfig
from alignbench.models import TINY_CLASSES, tiny_config
from alignbench.stages import graph
from alignbench.stages.distill import distill_batch_loss, topk_distill_loss
from alignbench.stages.preference import pm_loss
from alignbench.encoding import Encoded, pad_batch
from alignbench.train import autocast, final_hidden, lm_loss, response_logprobs
from methods.dpo import dpo_loss, sequence_logps
from methods.ppo import ActorCritic, ppo_loss
from methods.rrhf import rrhf_loss

VOCAB, PAD = 64, 0
# very unequal lengths (37, 3, 20, 11 tokens): most of the padded batch is padding
SEQS = [Encoded(list(range(3, 40)), 30), Encoded([5, 6, 7], 1), Encoded(list(range(10, 30)), 12),
        Encoded(list(range(40, 51)), 4)]


class Tok:  # what tiny_config reads from a tokenizer
    eos_token_id, pad_token_id = 1, PAD

    def __len__(self):
        return VOCAB


def tiny(arch: str = "llama", seed: int = 0, pm: bool = False):
    cfg = tiny_config(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_seq_len=64), Tok())
    torch.manual_seed(seed)
    if pm:
        cfg.num_labels = 1
        return AutoModelForSequenceClassification.from_config(cfg).eval()
    return TINY_CLASSES[arch](cfg).eval()  # eval: GPT-2's dropout would make two forwards differ


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def padded_and_packed(model, loss_fn):
    """loss_fn(model) and the gradients of every parameter, padded then packed."""
    out = []
    for on in (False, True):
        model.zero_grad()
        with packing.use(on):
            loss = loss_fn(model)
        loss.backward()
        out.append((loss.detach(), grads(model)))
    return out


def assert_same(padded, packed, atol=1e-5):
    (l0, g0), (l1, g1) = padded, packed
    assert torch.allclose(l0, l1, atol=atol), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=atol), name


@pytest.mark.parametrize("arch", sorted(TINY_CLASSES))
def test_packed_hidden_states_equal_padded_at_real_positions(arch):
    model, batch = tiny(arch).eval(), pad_batch(SEQS, PAD)
    with packing.padded():
        want = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert model.config._attn_implementation == "sdpa"  # padded: the model was not touched
    got = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert model.config._attn_implementation == packing.PACKED_SDPA
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert (got[~real] == 0).all()  # pads are never computed


def test_pack_position_ids_restart_and_cu_seqlens():
    batch = pad_batch(SEQS, PAD)
    p = packing.pack(batch["input_ids"], batch["attention_mask"])
    assert p.lengths == (37, 3, 20, 11) and p.cu_seqlens.tolist() == [0, 37, 40, 60, 71]
    assert p.cu_seqlens.dtype == torch.int32 and p.max_length == 37
    assert p.position_ids.tolist() == [list(range(37)) + list(range(3)) + list(range(20)) + list(range(11))]
    assert p.input_ids[0].tolist() == sum((s.input_ids for s in SEQS), [])
    x = torch.arange(71.0)[None, :, None]
    back = p.unpack(x)[..., 0]  # [B, T], packed token j back at its padded place
    assert back.shape == batch["input_ids"].shape
    assert back[1].tolist() == [37.0, 38.0, 39.0] + [0.0] * 34


def test_left_padded_batch_is_not_packed():
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert packing.pack(torch.ones(2, 3, dtype=torch.long), attn) is None
    model = tiny().eval()
    ids = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    with packing.padded():
        want = final_hidden(model, ids, attn)
    assert torch.equal(final_hidden(model, ids, attn), want)  # the padded forward, the meaning unchanged


def test_attention_never_crosses_a_sequence_boundary():
    model = tiny().eval()
    batch = pad_batch(SEQS, PAD)
    other = pad_batch([Encoded([9] * 37, 0)] + SEQS[1:], PAD)  # sequence 0 changed, same length
    a = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    b = final_hidden(model, other["input_ids"], other["attention_mask"])
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1:], b[1:])  # bit for bit: nothing of sequence 0 reaches the others


def test_lm_loss_and_grads_equal_padded():
    model = tiny("qwen2")  # grouped KV heads, biased projections
    batch = pad_batch(SEQS, PAD)
    assert_same(*padded_and_packed(model, lambda m: lm_loss(m, batch)))


@pytest.mark.parametrize("mode", ["full", "lora", "checkpointing"])
def test_pm_loss_and_grads_equal_padded(mode):
    model = tiny("llama", pm=True)
    if mode == "lora":
        model = lora.wrap(model, ModelConfig(peft="lora"), task="SEQ_CLS", seed=0)
        for n, p in model.named_parameters():  # B = 0 at init: move it so every adapter weight has a gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    if mode == "checkpointing":
        lora.set_gradient_checkpointing(model, True)
    model.train()
    batch = pad_batch(SEQS, PAD)  # 2 pairs: chosen rows 0, 1; rejected rows 2, 3
    padded, packed = padded_and_packed(model, lambda m: pm_loss(m, batch))
    assert_same(padded, packed)
    if mode == "lora":
        assert any("lora_A" in n for n in packed[1])


def test_dpo_loss_and_grads_equal_padded():
    model = tiny("gpt_neox")
    batch = pad_batch(SEQS, PAD)
    ref = torch.tensor([-40.0, -5.0, -30.0, -12.0])

    def loss(m):
        logps, lengths = sequence_logps(m, batch)
        pc, pr = logps.chunk(2)
        return dpo_loss(pc, pr, ref[:2], ref[2:], beta=0.1).loss

    assert_same(*padded_and_packed(model, loss))


def test_rrhf_loss_and_grads_equal_padded_under_lora():
    model = lora.wrap(tiny("gemma"), ModelConfig(peft="lora"), seed=0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = pad_batch(SEQS, PAD)
    rewards = torch.tensor([[0.3, -1.0], [2.0, 0.5]])

    def loss(m):
        logp, _ = response_logprobs(m, batch, average=True)
        return rrhf_loss(logp.view(2, 2), rewards)[0]

    assert_same(*padded_and_packed(model, loss))


def test_context_distillation_loss_and_grads_equal_padded():
    student, teacher = tiny("gpt2"), tiny("gpt2", seed=1).eval()
    s_pre = [2, 3]  # the student's own prefix, seen but not distilled
    batch = pad_batch([Encoded(s_pre + s.input_ids, len(s_pre)) for s in SEQS], PAD)
    prefix = torch.tensor([11, 12, 13, 14, 15])  # the teacher's HHH prompt

    def loss(m):
        return distill_batch_loss(m, teacher, batch, prefix=prefix, s0=len(s_pre), top_k=8)

    padded, packed = padded_and_packed(student, loss)
    assert_same(padded, packed)
    # the old loss: full [B, T, V] logits of both models, masked to the dialogue's real tokens
    ids, attn = batch["input_ids"], batch["attention_mask"]
    t_ids = torch.cat([prefix.expand(len(ids), -1), ids[:, 2:]], 1)
    t_attn = torch.cat([torch.ones(len(ids), 5, dtype=attn.dtype), attn[:, 2:]], 1)
    old = topk_distill_loss(student(input_ids=ids, attention_mask=attn).logits[:, 2:],
                            teacher(input_ids=t_ids, attention_mask=t_attn).logits[:, 5:], attn[:, 2:].float(), 8)
    assert old.item() == pytest.approx(packed[0].item(), abs=1e-5)


def test_ppo_loss_and_grads_equal_padded_under_gradient_checkpointing():
    policy = lora.set_gradient_checkpointing(tiny("llama"), True).train()
    assert policy.is_activation_checkpointing
    model = ActorCritic(policy, torch.nn.Linear(32, 1))
    batch = pad_batch(SEQS, PAD)
    mask = batch["response_mask"][:, 1:].float()
    torch.manual_seed(3)
    old_lp, adv, old_v, ret = (torch.randn(mask.shape) for _ in range(4))

    def loss(m):
        lp, v, _ = m(batch["input_ids"], batch["attention_mask"], temperature=0.7, positions=mask)
        return ppo_loss(lp, old_lp * 0.1 + lp.detach(), adv, v, old_v, ret, mask)[0]

    padded, packed = padded_and_packed(model, loss)
    assert_same(padded, packed)
    assert any(n.startswith("value_head") for n in packed[1])


def test_bf16_autocast_runs_packed_and_stays_close():
    model, batch = tiny(), pad_batch(SEQS, PAD)
    with packing.padded():
        want = lm_loss(model, batch)
    with autocast("bf16", "cpu"):
        got = lm_loss(model, batch)
    assert model.config._attn_implementation == packing.PACKED_SDPA
    assert got.item() == pytest.approx(want.item(), rel=2e-2)


def test_train_packing_false_uses_the_padded_forward(monkeypatch, tiny_config):
    """train.packing=false: the model sees the right-padded batch and its attention mask."""
    seen = []
    model, batch = tiny().eval(), pad_batch(SEQS, PAD)
    model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw), with_kwargs=True)

    def stages_under(packing_on):
        cfg = tiny_config
        cfg.train.packing = packing_on
        monkeypatch.setattr(graph, "build_base", lambda c: final_hidden(model, batch["input_ids"],
                                                                         batch["attention_mask"]))
        monkeypatch.setattr(graph, "build_pi0", lambda c, base: None)
        monkeypatch.setattr(graph, "build_pm", lambda c, init, part: None)
        with packing.use(True):
            graph.build_shared_stages(cfg)
        return seen.pop()

    kw = stages_under(False)
    assert kw["attention_mask"] is batch["attention_mask"] and "position_ids" not in kw
    kw = stages_under(True)
    assert kw["attention_mask"] is None and kw["input_ids"].shape == (1, 71)
    assert "cu_seq_lens_q" in kw and kw["position_ids"][0, 37] == 0


def test_unpackable_model_falls_back_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(packing, "_warned", set())
    model, batch = tiny().eval(), pad_batch(SEQS, PAD)
    model.config._attn_implementation = "eager"
    with caplog.at_level(logging.WARNING, logger="alignbench.packing"):
        got = final_hidden(model, batch["input_ids"], batch["attention_mask"])
        final_hidden(model, batch["input_ids"], batch["attention_mask"])
    assert model.config._attn_implementation == "eager"
    assert sum("'eager'" in r.getMessage() for r in caplog.records) == 1
    with packing.padded():
        assert torch.equal(got, final_hidden(model, batch["input_ids"], batch["attention_mask"]))
