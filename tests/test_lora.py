"""LoRA (model.peft=lora), gradient checkpointing and the chunked response log-probs (issue 10 §3, §4)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import alignbench.encoding as encoding
import alignbench.train as train
from alignbench import lora
from alignbench.config import ConfigError, LoraConfig, ModelConfig
from alignbench.encoding import pad_batch
from alignbench.train import lm_loss, response_logprobs, selected_logprobs, token_logprobs

SEQS = [encoding.Encoded(list(range(3, 15)), 5), encoding.Encoded(list(range(20, 29)), 2), encoding.Encoded([7, 8, 9, 10], 3)]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def old_response_logprobs(model, batch, temperature=1.0):
    """The previous implementation: full logits, fp32 log-softmax over [B, T, V]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["response_mask"][:, 1:].float()
    per_tok = token_logprobs(logits, batch["input_ids"], temperature) * mask
    return per_tok.sum(-1), per_tok


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1024, 4])  # one chunk, and several (a chunk boundary inside a row)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_full_log_softmax_values_and_grads(monkeypatch, chunk, temperature):
    monkeypatch.setattr(train, "LOGIT_CHUNK", chunk)
    model, batch = tiny_llama(), pad_batch(SEQS, 0)
    want_total, want = old_response_logprobs(model, batch, temperature)
    want_total.sum().backward()
    want_grads = grads(model)
    model.zero_grad()
    total, per_tok = response_logprobs(model, batch, temperature=temperature)
    total.sum().backward()
    assert torch.allclose(per_tok, want, atol=1e-5) and torch.allclose(total, want_total, atol=1e-5)
    assert (per_tok[~batch["response_mask"][:, 1:]] == 0).all()
    got = grads(model)
    assert got.keys() == want_grads.keys()
    for name in got:
        assert torch.allclose(got[name], want_grads[name], atol=1e-5), name


def test_entropy_per_chunk_equals_full_softmax_entropy(monkeypatch):
    monkeypatch.setattr(train, "LOGIT_CHUNK", 5)
    model, batch = tiny_llama(), pad_batch(SEQS, 0)
    positions = batch["attention_mask"][:, 1:]
    _, ent, _ = selected_logprobs(model, batch["input_ids"], batch["attention_mask"], positions, temperature=0.7,
                                  with_entropy=True)
    logp = torch.log_softmax(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1] / 0.7, -1)
    want = -(logp.exp() * logp).sum(-1) * positions
    assert torch.allclose(ent, want, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    batch = pad_batch(SEQS, 0)
    results = []
    for on in (False, True):
        model = lora.set_gradient_checkpointing(tiny_llama(), on).train()
        loss = lm_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    assert results[1][0].item() == pytest.approx(results[0][0].item(), abs=1e-5)
    for name, g in results[0][1].items():
        assert torch.allclose(results[1][1][name], g, atol=1e-5), name
    assert not tiny_llama().model.gradient_checkpointing  # off unless asked


def lora_cfg(**kw) -> ModelConfig:
    return ModelConfig(peft="lora", lora=LoraConfig(r=4, alpha=8, **kw))


def test_bad_target_module_names_the_key():
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: no module named \['q_projj'\]"):
        lora.wrap(tiny_llama(), lora_cfg(target_modules=["q_projj", "v_proj"]))
    model = tiny_llama()
    model.config.model_type = "my_arch"
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: no default LoRA target modules"):
        lora.wrap(model, lora_cfg())
    lora.check_targets(ModelConfig(peft="none", lora=LoraConfig(target_modules=["nope"])), tiny_llama())  # unused


def test_lora_under_gradient_checkpointing_trains_the_adapter_only():
    model = lora.set_gradient_checkpointing(lora.wrap(tiny_llama(), lora_cfg()), True).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt, sched = train.make_optimizer(model, 1e-2)
    for _ in range(3):
        train.optimizer_step(lm_loss(model, pad_batch(SEQS, 0)), model.parameters(), opt, sched, 1.0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


# --------------------------------------------------------------------------- through the pipeline (tiny stages)
LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8"]


@pytest.fixture
def lora_ctx(tiny_overrides, tmp_path):
    """A RunContext whose π0 and PMs were trained with LoRA (cached for the session)."""
    from alignbench.cli import compose
    from alignbench.config import to_config
    from alignbench.run_evaluation import build_context
    from alignbench.methods import method_config
    from methods.dpo import DPO
    cfg = to_config(compose(tiny_overrides + LORA + ["method=dpo"]))
    return build_context(cfg, method_config(DPO, {"name": "dpo"}), tmp_path / "run")


def test_lora_policy_reference_and_merged_save(lora_ctx):
    from alignbench.models import load_lm
    ctx = lora_ctx
    assert (ctx.stages.pi0.path / "adapter" / "adapter_config.json").exists()  # π0's stage trained an adapter
    assert (ctx.stages.pm.path / "adapter" / "adapter_config.json").exists()
    pi0 = load_lm(ctx.stages.pi0.path).eval()  # the merged π0, loaded on its own
    policy = ctx.policy()
    assert lora.is_peft(policy)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    pairs = ctx.pairs[:8]
    batch = pad_batch([encoding.encode(ctx.tokenizer, p.prompt, p.chosen, ctx.max_len) for p in pairs],
                      ctx.tokenizer.pad_token_id)
    opt, sched = train.make_optimizer(policy, 1e-2)
    for _ in range(3):
        train.optimizer_step(lm_loss(policy, batch), policy.parameters(), opt, sched, 1.0)
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n  # base weights bitwise unchanged in memory

    with torch.no_grad():
        ref = ctx.reference()
        assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in pi0.parameters())
        want, _ = response_logprobs(pi0, batch)
        got, _ = response_logprobs(ref, batch)
        assert torch.allclose(got, want, atol=1e-6)
        trained, _ = response_logprobs(policy.eval(), batch)
        assert (trained - want).abs().max() > 1e-3  # the policy did move away from π0
        path = ctx.save_policy(policy)
        assert (path / "adapter" / "adapter_model.safetensors").exists()
        reloaded = load_lm(path).eval()
        assert not lora.is_peft(reloaded)
        ids = {k: batch[k] for k in ("input_ids", "attention_mask")}
        assert torch.allclose(reloaded(**ids).logits, policy(**ids).logits, atol=1e-5)


def test_lora_pm_learns_and_its_merged_save_scores_the_same(lora_ctx, tmp_path):
    from alignbench.models import load_pm, pm_from_lm
    from alignbench.stages.preference import pair_batch, pm_loss, pm_scores
    ctx = lora_ctx
    tok, pairs = ctx.tokenizer, ctx.pairs[:64]
    model = lora.wrap(pm_from_lm(ctx.stages.pi0.path, tok, 0), ctx.cfg.model, task="SEQ_CLS")
    head = lora.unwrap(model).score
    assert head.weight.requires_grad  # the scalar head trains with the adapter
    batches = train.batch_schedule(len(pairs), 16, 4, seed=0)
    res = train.supervised_loop(model, batches, lambda idx: pair_batch(tok, pairs, idx, 128), pm_loss, 5e-3, "pm")
    assert sum(res.losses[-4:]) / 4 < res.losses[0] - 0.05, res.losses
    lora.save(model, tmp_path / "pm")
    loaded = load_pm(tmp_path / "pm").eval()
    batch = pair_batch(tok, pairs, list(range(16)), 128)
    with torch.no_grad():
        assert torch.allclose(pm_scores(loaded, batch["input_ids"], batch["attention_mask"]),
                              pm_scores(model.eval(), batch["input_ids"], batch["attention_mask"]), atol=1e-5)


@pytest.mark.parametrize("method", [
    ["method=dpo", "method.max_steps=4", "method.eval_every=2"],
    ["method=ppo", "method.steps=2", "method.rollout_batch_size=16", "method.ent_coef=0.01",
     "train.gradient_checkpointing=true"],
])
def test_methods_run_with_lora(tiny_overrides, method):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    over = LORA + method
    metrics = run_job(compose(tiny_overrides + over), over)
    assert metrics["final"]["kl_k3"] > 0  # it trained: the policy is no longer π0
    assert metrics["cost"]["tokens_trained"] > 0
