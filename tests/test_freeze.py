"""model.trainable_layers: train only the top K blocks, the final norm and the head (issue 23 §2)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignbench import freeze
from alignbench.cli import compose
from alignbench.config import ConfigError, ModelConfig, check, to_config
from alignbench.run_evaluation import build_context
from alignbench.methods import method_config
from alignbench.models import TINY_CLASSES, count_params, tiny_config as arch_config, train_tokenizer
from alignbench.runner import run_job
from alignbench.stages.base import model_key
from alignbench.cache import lora_key
from alignbench.stages.graph import build_shared_stages
from alignbench.train import make_optimizer
from methods.dpo import DPO

IDS = torch.tensor([[5, 9, 2, 33, 7, 1], [3, 3, 8, 40, 12, 6]])


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        pad_token_id=0, tie_word_embeddings=True))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_below_keeps_the_top_blocks_norm_and_an_untied_head_trainable():
    model = tiny_llama(layers=3)
    with torch.no_grad():
        before = model(IDS).logits
    freeze.prepare(model, ModelConfig(trainable_layers=1))
    assert trainable(model) == {n for n, _ in model.named_parameters()
                                if n.startswith(("model.layers.2.", "model.norm.", "lm_head."))}
    assert "model.embed_tokens.weight" not in trainable(model)
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    assert head is not emb and torch.equal(head, emb) and not model.config.tie_word_embeddings
    model.tie_weights()  # transformers' own re-tying leaves the untied head alone
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)  # the same function, bitwise
    # the optimiser gets the trainable tensors only: weight decay cannot reach a frozen one
    opt, _ = make_optimizer(model, 1e-3, weight_decay=0.1)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()
                                                                      if p.requires_grad}


@pytest.mark.parametrize("k, want", [(0, set()), (2, {"model.layers.1.", "model.layers.2."}),
                                     (3, {"model.layers.0.", "model.layers.1.", "model.layers.2."})])
def test_k_counts_blocks_from_the_top(k, want):
    model = freeze.prepare(tiny_llama(layers=3), ModelConfig(trainable_layers=k))
    blocks = {n[:len("model.layers.0.")] for n in trainable(model) if n.startswith("model.layers.")}
    assert blocks == want
    assert {"model.norm.weight", "lm_head.weight"} <= trainable(model)
    assert "model.embed_tokens.weight" not in trainable(model)


def test_frozen_params_get_no_grad_and_nothing_below_the_cut_is_saved_for_backward():
    """Counts the tensors autograd saves for backward while each module runs (a pre-hook names
    the running module): with K=1 of 3 nothing is saved under the embeddings and blocks 0-1, and
    the hidden states they output do not require grad; the full model saves under every block."""

    def saved_per_module(model) -> dict:
        running, counts = ["other"], {}
        for name, mod in model.named_modules():
            if name in ("model.embed_tokens", "model.norm", "lm_head") or name.count(".") == 2 and ".layers." in name:
                mod.register_forward_pre_hook(lambda m, a, name=name: running.append(name))
                mod.register_forward_hook(lambda m, a, o: running.pop() and None)  # output unchanged

        def pack(t):
            counts[running[-1]] = counts.get(running[-1], 0) + 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(IDS, output_hidden_states=True)
        out.logits.float().logsumexp(-1).mean().backward()
        return counts, out.hidden_states

    full, _ = saved_per_module(tiny_llama(layers=3))
    assert all(full.get(f"model.layers.{i}", 0) > 0 for i in range(3)) and full.get("model.embed_tokens", 0) > 0

    model = freeze.prepare(tiny_llama(layers=3), ModelConfig(trainable_layers=1))
    counts, hidden = saved_per_module(model)
    assert [counts.get(m, 0) for m in ("model.embed_tokens", "model.layers.0", "model.layers.1")] == [0, 0, 0]
    # block 2 saves what its weights' gradients need (less than in the full model: its input needs no grad)
    assert 0 < counts["model.layers.2"] < full["model.layers.2"] and counts["lm_head"] == full["lm_head"]
    # hidden_states[i] is block i's input: the embeddings' and blocks 0-1's outputs carry no graph
    assert [h.requires_grad for h in hidden] == [False, False, False, True]
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("arch, frozen, kept", [
    ("gpt2", ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"],
     ["transformer.h.1.attn.c_attn.weight", "transformer.ln_f.weight", "lm_head.weight"]),
    ("gpt_neox", ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight"],
     ["gpt_neox.layers.1.attention.query_key_value.weight", "gpt_neox.final_layer_norm.weight", "lm_head.weight"]),
    ("qwen2", ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"],
     ["model.layers.1.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight"]),
    ("gemma", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"],
     ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]),
])
def test_every_tiny_architecture_freezes_its_embeddings_and_lower_blocks(arch, frozen, kept):
    mc = ModelConfig(arch=arch, vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     trainable_layers=1)
    tok = train_tokenizer(["hello there, how are you"] * 4, mc.vocab_size, pad_token=arch not in ("gpt2", "gpt_neox"))
    torch.manual_seed(0)
    model = freeze.prepare(TINY_CLASSES[arch](arch_config(mc, tok)), mc)
    names = trainable(model)
    assert not names & set(frozen) and set(kept) <= names
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_pm_keeps_its_score_head_trainable():
    torch.manual_seed(0)
    pm = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                                    num_labels=1, pad_token_id=0))
    freeze.prepare(pm, ModelConfig(trainable_layers=1), task="SEQ_CLS")
    assert trainable(pm) == {n for n, _ in pm.named_parameters()
                             if n.startswith(("model.layers.1.", "model.norm.", "score."))}


def test_untied_model_saves_and_reloads_both_tensors(tmp_path):
    model = freeze.prepare(tiny_llama(), ModelConfig(trainable_layers=1))
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # the head moves away from the embeddings (as training does)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_stage_keys_name_k_only_when_set(tiny_config):
    frozen = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, trainable_layers=2))
    assert lora_key(tiny_config) == {} and lora_key(frozen) == {"trainable_layers": 2}
    assert model_key(frozen.model) == model_key(tiny_config.model)  # the base LM's key never has it


def test_bad_k_and_lora_fail_with_the_key():
    too_many = r"^model.trainable_layers: must be between 0 and the model's 3 layers, got 4$"
    with pytest.raises(ConfigError, match=too_many):
        freeze.prepare(tiny_llama(layers=3), ModelConfig(trainable_layers=4))
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: must be >= 0, got -1"):
        check(ModelConfig(trainable_layers=-1), "model")
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: must be between 0 and the model's 4 layers"):
        check(ModelConfig(trainable_layers=5), "model")  # tiny: known from model.num_layers before anything loads
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: cannot be combined with model.peft=lora"):
        check(ModelConfig(trainable_layers=1, peft="lora"), "model")
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: cannot be combined with model.peft=lora"):
        freeze.prepare(tiny_llama(), ModelConfig(trainable_layers=1, peft="lora"))
    model = tiny_llama()
    assert freeze.prepare(model, ModelConfig()) is model and len(trainable(model)) == len(list(model.parameters()))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # null: untouched, still tied


def test_frozen_copy_and_share_frozen_share_only_equal_frozen_tensors():
    policy = freeze.prepare(tiny_llama(), ModelConfig(trainable_layers=1))
    teacher = freeze.frozen_copy(policy)
    ptr = {n: p.data_ptr() for n, p in policy.named_parameters()}
    for n, p in teacher.named_parameters():
        assert (p.data_ptr() == ptr[n]) == (n not in trainable(policy)), n
    assert not trainable(teacher) and trainable(policy)  # the copy is frozen, the policy is not
    # a reference loaded apart: its equal frozen tensors (the tied head follows the embeddings) now
    # read the policy's; a model with other weights shares nothing
    same, other = tiny_llama(seed=0), tiny_llama(seed=1)
    n_frozen = len(freeze.frozen_names(policy))
    assert freeze.share_frozen(policy, same) == n_frozen
    assert same.model.embed_tokens.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert same.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()  # still tied
    assert same.model.layers[2].mlp.up_proj.weight.data_ptr() != policy.model.layers[2].mlp.up_proj.weight.data_ptr()
    # another seed: only the frozen blocks' norm weights (ones at init: equal in every fresh model) are shared
    assert freeze.share_frozen(policy, other) == 4
    ptr = {n: p.data_ptr() for n, p in policy.named_parameters()}
    assert {n for n, p in other.named_parameters() if p.data_ptr() == ptr[n]} == {
        f"model.layers.{i}.{norm}.weight" for i in (0, 1) for norm in ("input_layernorm", "post_attention_layernorm")}


# --------------------------------------------------------------------------- through the pipeline (tiny stages)
FROZEN = ["model.trainable_layers=1"]  # of the tiny model's 2 layers


def _tensors(path) -> dict:
    return load_file(path / "model.safetensors")


def _frozen_and_trained(saved: dict, start: dict, prefix: str = "model.") -> tuple[list, list]:
    """(names that must equal the start bitwise, names that must have moved) for K=1 of 2 layers."""
    frozen = [n for n in saved if n.startswith((f"{prefix}embed_tokens.", f"{prefix}layers.0."))]
    trained = [n for n in saved if n.startswith((f"{prefix}layers.1.", f"{prefix}norm.")) and n in start]
    return frozen, trained


def test_dpo_and_the_pm_stage_leave_the_frozen_tensors_bitwise_unchanged(tiny_overrides, tmp_path):
    over = FROZEN + ["method=dpo", "method.max_steps=4", "method.eval_every=2"]
    metrics = run_job(compose(tiny_overrides + over), over)
    assert metrics["final"]["kl_k3"] > 0
    stages = build_shared_stages(to_config(compose(tiny_overrides + FROZEN)))  # cached by the run
    # the keys of the stages it trains name K; the base LM (trained in full either way) does not
    assert stages.pi0.record["trainable_layers"] == stages.pm.record["trainable_layers"] == 1
    assert "trainable_layers" not in stages.base.record and "trainable_layers" not in stages.base.record["model"]
    base, pi0 = _tensors(stages.base.path), _tensors(stages.pi0.path)
    policy = _tensors(next((tmp_path / "sweep" / "runs").glob("dpo_s0*")) / "policy")
    pm = _tensors(stages.pm.path)
    # π0's own stage trained its top layer: embeddings and block 0 are still the base LM's
    frozen, trained = _frozen_and_trained(pi0, base)
    assert frozen and all(torch.equal(pi0[n], base[n]) for n in frozen)
    assert all(not torch.equal(pi0[n], base[n]) for n in trained)
    # the tied head was untied for training: π0's head moved away from its (frozen) embeddings
    assert "lm_head.weight" not in base and not torch.equal(pi0["lm_head.weight"], pi0["model.embed_tokens.weight"])
    for saved in (policy, pm):  # DPO's policy and the PM: frozen tensors bitwise π0's, the top moved
        frozen, trained = _frozen_and_trained(saved, pi0)
        assert frozen and trained and all(torch.equal(saved[n], pi0[n]) for n in frozen)
        assert all(not torch.equal(saved[n], pi0[n]) for n in trained), [n for n in trained
                                                                         if torch.equal(saved[n], pi0[n])]
    assert not torch.equal(policy["lm_head.weight"], pi0["lm_head.weight"])
    assert "score.weight" in pm


def test_reference_shares_the_policys_frozen_trunk(tiny_overrides, tmp_path):
    cfg = to_config(compose(tiny_overrides + FROZEN + ["method=dpo"]))
    ctx = build_context(cfg, method_config(DPO, {"name": "dpo"}), tmp_path / "run")
    early = ctx.reference()  # loaded before any policy (the runner's π0 point does this)
    policy = ctx.policy()
    frozen = freeze.frozen_names(policy)
    assert frozen and "lm_head.weight" not in frozen
    ptr = {n: p.data_ptr() for n, p in policy.named_parameters()}
    sub = ctx.derive()  # a chain stage / iterated round: its own models, its reference loaded before its policy
    sub_ref, sub_policy = sub.reference(), sub.policy()
    for ref, pol in ((early, policy), (ctx.reference(), policy), (sub_ref, sub_policy)):
        mine = {n: p.data_ptr() for n, p in pol.named_parameters()}
        got = {n: p.data_ptr() for n, p in ref.named_parameters()}
        assert all(got[n] == mine[n] for n in frozen) and all(got[n] != mine[n] for n in mine if n not in frozen)
    assert ptr["model.embed_tokens.weight"] != sub_policy.model.embed_tokens.weight.data_ptr()
    # N of the policy is π0's as loaded: the untied head copy is not counted twice
    assert ctx._policy_params == count_params(ctx.pi0())
