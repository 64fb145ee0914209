"""Every common architecture through the whole pipeline (issue 10 §2): tiny random-init GPT-2,
GPT-NeoX (Pythia), Qwen2, Llama and Gemma, each with the quirks its family ships (pad = EOS for
GPT-2 and Pythia, learned absolute positions, partial rotary, attention bias, untied or tied
embeddings, Gemma's embedding scale). Per architecture: the shared stages, the read points and
padding invariances the methods rely on, and every built-in method for a step or two through the
runner's own entry (``run_job``)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from alignbench.cli import compose
from alignbench.config import ConfigError, to_config
from alignbench.models import PAD_IS_EOS, disable_dropout, load_lm, load_pm, load_tokenizer
from alignbench.runner import run_job
from alignbench.sampling import sample
from alignbench.stages.graph import build_shared_stages
from alignbench.stages.preference import PMScorer
from alignbench.encoding import encode, pad_batch
from alignbench.train import response_logprobs
from tests.conftest import shared_dir

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"]
# head_dim 16: even (rotary) and a multiple of 8 (NeoX rotates a quarter of it)
TINY = [
    "model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=64", "model.max_seq_len=128",
    "data.synth.n_pairs=240", "stages.pi0.hhh_prompt=Be_helpful_honest_and_harmless.", "stages.base.max_steps=6", "stages.base.batch_size=16",
    "stages.pi0.max_steps=2", "stages.pi0.batch_size=8", "stages.pm.max_steps=4", "stages.pm.batch_size=8",
    "eval.n_prompts=4", "eval.bootstrap=100", "train.max_new_tokens=8", "train.batch_size=8", "train.num_threads=1",
]
METHODS = {
    "context_distilled": ["method=context_distilled"],
    "dpo": ["method=dpo", "method.max_steps=2", "method.eval_every=1", "method.probe_pairs=8", "method.lr=1e-3"],
    "ppo": ["method=ppo", "method.steps=1", "method.rollout_batch_size=8", "method.ppo_epochs=1", "method.lr=1e-3"],
    "rrhf": ["method=rrhf", "method.steps=2", "method.prompts_per_step=2", "method.k_samples=2", "method.lr=1e-3"],
    "best_of_n": ["method=rejection_sampling", "method.n=2", "method.kl_pool=4"],
    "rs_finetune": ["method=rejection_sampling", "method.mode=finetune", "method.n=2", "method.rounds=1",
                    "method.prompts_per_round=4", "method.batch_size=4"],
}


@pytest.fixture(scope="module")
def arch_cache(tmp_path_factory):
    return shared_dir(tmp_path_factory, "arch-cache")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run several times faster on one thread than on contended cores
    (train.num_threads=1 in the runs); the session's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def overrides(arch, cache, *extra):
    return TINY + [f"model.arch={arch}", f"paths.cache_dir={cache}", *extra]


def stages_for(arch, cache):
    cfg = to_config(compose(overrides(arch, cache)))
    return cfg, build_shared_stages(cfg)


def tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


EXPECTED = {  # arch -> (tied embeddings, pad = EOS)
    "llama": (True, False), "gpt2": (True, True), "gpt_neox": (False, True), "qwen2": (True, False),
    "gemma": (True, False),
}


def test_llama_is_the_default_and_its_stage_key_is_unchanged(tmp_path):
    """arch=llama is the tiny model as it always was: its base-stage key leaves ``arch`` out, so
    caches (and the committed demo) built before the key existed stay valid."""
    from alignbench.stages.base import model_key
    cfg = to_config(compose([]))
    assert cfg.model.arch == "llama" and "arch" not in model_key(cfg.model)
    gpt2 = to_config(compose(["model.arch=gpt2"]))
    assert model_key(gpt2.model)["arch"] == "gpt2"


@pytest.mark.parametrize("over, key", [
    (["model.arch=bert"], "model.arch"),
    (["model.arch=gemma", "model.hidden_size=30", "model.num_heads=2"], "model.hidden_size"),  # head_dim 15
    (["model.arch=gpt_neox", "model.hidden_size=24", "model.num_heads=2"], "model.hidden_size"),  # 12: 3 rotary dims
    # GPT-2 has no position past max_seq_len: 8 prompt tokens + 30 new ones would fail mid-sampling
    (["model.arch=gpt2", "model.max_seq_len=32", "train.max_new_tokens=30"], "train.max_new_tokens"),
])
def test_bad_architecture_settings_name_the_key(over, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        to_config(compose(over))


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_quirks_survive_the_stages_and_save_load(arch, arch_cache):
    cfg, st = stages_for(arch, arch_cache)
    tok = load_tokenizer(st.base.path)
    want_tied, want_pad_eos = EXPECTED[arch]
    assert (tok.pad_token_id == tok.eos_token_id) == want_pad_eos == (arch in PAD_IS_EOS)
    for path in (st.base.path, st.pi0.path):
        model = load_lm(path)
        assert model.config.model_type == arch and model.config.pad_token_id == tok.pad_token_id
        assert tied(model) == want_tied  # the tie survives save_pretrained / from_pretrained
        if not want_tied:  # untied: two trained matrices, not one
            assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    c = model.config
    policy = disable_dropout(load_lm(st.pi0.path))  # as RunContext.load: train mode computes the eval function
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    with torch.no_grad():
        assert torch.equal(policy.train()(input_ids=ids).logits, policy.eval()(input_ids=ids).logits)
    if arch == "gpt2":  # learned absolute positions, sized by model.max_seq_len
        assert model.transformer.wpe.weight.shape == (cfg.model.max_seq_len, cfg.model.hidden_size)
    if arch == "gpt_neox":  # partial rotary: a quarter of each 16-dim head
        assert model.gpt_neox.rotary_emb.inv_freq.numel() * 2 == 4
    if arch == "qwen2":  # biased q/k/v, unbiased o; grouped-query attention (2 heads share 1 k/v head)
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None and c.num_key_value_heads == 1
    if arch == "gemma":  # embeddings scaled by sqrt(hidden_size), multi-query attention
        emb = model.model.embed_tokens
        ids = torch.tensor([[5, 6]])
        assert torch.allclose(emb(ids), torch.nn.functional.embedding(ids, emb.weight) * math.sqrt(c.hidden_size))
        assert c.head_dim == cfg.model.hidden_size // cfg.model.num_heads and c.num_key_value_heads == 1
    # every stage learned something and produced finite numbers
    assert math.isfinite(st.base.record["metrics"]["heldout_nll"])
    assert st.base.record["metrics"]["final_loss"] < math.log(len(tok))
    pm = st.pm.record["metrics"]["train"]
    assert math.isfinite(pm["first_loss"]) and math.isfinite(pm["final_loss"])


@pytest.mark.parametrize("arch", ARCHS)
def test_pm_reads_the_last_attended_token_whatever_the_padding(arch, arch_cache):
    """PM scores of a padded batch equal a manual forward of each unpadded sequence, read at its
    last token (the EOS the dataset response ends with), also where pad = EOS."""
    cfg, st = stages_for(arch, arch_cache)
    scorer = PMScorer(st.pm.path, max_len=cfg.model.max_seq_len, batch_size=64)
    tok, model = scorer.tokenizer, load_pm(st.pm.path).eval()
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: How do I bake bread at home?\n\nAssistant:",
               "\n\nHuman: Tell me a story about a cat.\n\nAssistant:"]
    responses = [" Hello there, friend! How can I help you today?", " Knead it.", " Once."]
    batch = scorer.score(prompts, responses)
    for p, r, got in zip(prompts, responses, batch.tolist()):
        ids = torch.tensor([encode(tok, p, r, cfg.model.max_seq_len).input_ids])
        assert ids[0, -1] == tok.eos_token_id  # the read point is the appended EOS (== pad for GPT-2/NeoX)
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
            alone = model.score(hidden).item()
        assert got == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 6) for x in batch.tolist())) == 3  # a real head, not a constant


@pytest.mark.parametrize("arch", ARCHS)
def test_position_ids_under_left_and_right_padding(arch, arch_cache):
    """Left padding (the sampler): a batch of prompts of different lengths samples, greedily, the
    same tokens as each prompt alone. Right padding (training): per-sequence log-probs of a padded
    batch equal each sequence's alone."""
    cfg, st = stages_for(arch, arch_cache)
    tok, model = load_tokenizer(st.pi0.path), load_lm(st.pi0.path).eval()
    if arch == "gpt2":  # amplify the learned positions so that a wrong position id changes the tokens
        with torch.no_grad():
            model.transformer.wpe.weight.mul_(30)
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is the capital of France, please?\n\nAssistant:",
               "\n\nHuman: Can you help me write a short poem about the sea and the sky?\n\nAssistant:"]
    kw = dict(max_new_tokens=8, greedy=True, max_len=cfg.model.max_seq_len)
    together = sample(model, tok, prompts, **kw)
    assert len({len(p) for p in together.prompt_ids}) == 3  # really padded
    for i, p in enumerate(prompts):
        assert sample(model, tok, [p], **kw).response_ids[0] == together.response_ids[i], (arch, i)
    seqs = [encode(tok, p, r, cfg.model.max_seq_len)
            for p, r in zip(prompts, [" Sure, here it is.", " Paris.", " The sea is wide and the sky is blue."])]
    with torch.no_grad():
        padded, _ = response_logprobs(model, pad_batch(seqs, tok.pad_token_id))
        alone = torch.cat([response_logprobs(model, pad_batch([s], tok.pad_token_id))[0] for s in seqs])
    assert torch.allclose(padded, alone, atol=1e-4), (padded, alone)


def _numbers(obj):
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [obj] if isinstance(obj, float) else []


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_runs_on_every_architecture(arch, method, arch_cache, tmp_path):
    over = overrides(arch, arch_cache, f"paths.sweep_dir={tmp_path}", *METHODS[method])
    metrics = run_job(compose(over), METHODS[method])
    run = next((tmp_path / "runs").glob("*_s0*"))
    assert (run / "DONE").exists()
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in _numbers(log) + _numbers(metrics["info"])), (log, metrics["info"])
    final = metrics["final"]
    assert all(math.isfinite(final[k]) for k in ("proxy_reward", "judge_reward"))
    stages = build_shared_stages(to_config(compose(over)))
    info = metrics["info"]
    if method == "context_distilled":  # π0 against itself: KL exactly 0
        assert final["kl_k1"] == pytest.approx(0, abs=1e-6) and final["kl_k3"] == pytest.approx(0, abs=1e-6)
        return
    if method == "best_of_n":  # an inference-time policy over π0: no weights of its own
        assert info["mode"] == "best_of_n" and info["n"] == 2 and metrics["cost"]["pm_calls"] > 0
        assert final["kl_estimate"] >= 0
        return
    losses = {"dpo": lambda: [info["final_probe_loss"]], "ppo": lambda: [p["policy_loss"] for p in log[1:-1]],
              "rrhf": lambda: [info["loss_first"], info["loss_last"]],
              "rs_finetune": lambda: [info["rounds"][0]["loss_first"]]}[method]()
    assert losses and all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    policy, pi0 = load_lm(run / "policy"), load_lm(stages.pi0.path)
    assert tied(policy) == EXPECTED[arch][0]  # the saved policy keeps the family's embedding tie
    moved = [n for (n, a), b in zip(policy.named_parameters(), pi0.parameters()) if not torch.equal(a, b)]
    assert moved, f"{method} on {arch} did not change the policy"
    assert final["kl_k3"] > 0
