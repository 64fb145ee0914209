"""Score what was sampled (issue 9 §3), one temperature (§4), the PM read point (§9).

Unit tests on a tiny tokenizer and random models, then tests on the session's tiny π0 and PM.
Module-level imports are those the code before the fix also had (so each test fails on its own
there); the new interfaces are imported in the tests that use them."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignbench.config import ConfigError
from alignbench.data.types import PreferencePair
from alignbench.models import train_tokenizer
from alignbench.sampling import STOP, SampleBatch
from alignbench.stages.preference import PMScorer, pair_batch
from alignbench.encoding import pad_batch
from alignbench.train import response_logprobs, token_logprobs

CORPUS = ["\n\nHuman: how do I bake bread? \n\nAssistant: Mix flour, water and yeast, then wait.",
          "\n\nHuman: thanks!\n\nAssistant: You are welcome. Anything else?"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def _lm(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- one prompt window per pair
def test_chosen_and_rejected_share_the_prompt_window(tok):
    prompt = "\n\nHuman: " + "how do I bake bread? " * 30 + "\n\nAssistant:"
    pair = PreferencePair(prompt=prompt, chosen="Mix flour.", rejected="Mix flour, water and yeast, then wait. " * 4,
                          subset="s", n_turns=1)
    batch = pair_batch(tok, [pair], [0], max_len=96)
    starts = batch["response_mask"].long().argmax(-1).tolist()
    chosen, rejected = (batch["input_ids"][i, :starts[i]].tolist() for i in (0, 1))
    assert chosen == rejected  # the old encode gave the short response a longer prompt window
    assert len(chosen) <= 96 and batch["attention_mask"].sum(-1).max() <= 96
    from alignbench.encoding import prompt_window
    assert chosen == prompt_window(tok(prompt, add_special_tokens=False)["input_ids"], 96, 96 - len(chosen))


def test_dpo_pairs_share_the_prompt_window(tok):
    from alignbench_methods.dpo import encode_pairs
    prompt = "\n\nHuman: " + "thanks! " * 60 + "\n\nAssistant:"
    enc = encode_pairs(tok, [PreferencePair(prompt=prompt, chosen="Yes.", rejected="You are welcome. " * 8, subset="s", n_turns=1)], 80)[0]
    assert enc.chosen.input_ids[:enc.chosen.response_start] == enc.rejected.input_ids[:enc.rejected.response_start]


# --------------------------------------------------------------------------- the sampler's ids
def test_stop_string_is_cut_on_ids(tok):
    from alignbench.sampling import cut_ids
    said = tok("Mix flour, water", add_special_tokens=False)["input_ids"]
    stop = tok(STOP + " thanks!", add_special_tokens=False)["input_ids"]
    ids, finished = cut_ids(tok, said + stop + [tok.eos_token_id])
    assert finished and tok.eos_token_id not in ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert STOP not in text and "Mix flour, water".startswith(text) and len(text) >= len("Mix flour")
    ids, finished = cut_ids(tok, said)  # cut at max_new_tokens: unfinished, nothing appended
    assert ids == said and not finished
    ids, finished = cut_ids(tok, said + [tok.eos_token_id, 7, 7])  # the sampled EOS stays
    assert ids == said + [tok.eos_token_id] and finished


def test_sample_batch_carries_what_was_sampled(tok):
    model = _lm(tok)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 2.0  # a model that sometimes ends: both kinds of response appear
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    prompts = ["\n\nHuman: " + "how do I bake bread? " * 20 + "\n\nAssistant:", "\n\nHuman: thanks!\n\nAssistant:"]
    from alignbench.sampling import sample
    from alignbench.encoding import prompt_window
    out = sample(model, tok, prompts, n=3, max_new_tokens=12, temperature=0.7, seed=3, max_len=64)
    assert out.temperature == 0.7 and len(out) == 6 and out.prompt_index == [0, 0, 0, 1, 1, 1]
    assert 0 < sum(out.finished) < 6, out.finished
    for i, (p, r, done) in enumerate(zip(out.prompt_ids, out.response_ids, out.finished)):
        assert p == prompt_window(tok(out.prompts[i], add_special_tokens=False)["input_ids"], 64, 12)
        assert tok.decode(r, skip_special_tokens=True) == out.responses[i]
        assert tok.eos_token_id not in r[:-1]
        if r and r[-1] == tok.eos_token_id:
            assert done
        if not done:  # cut at max_new_tokens: all 12 tokens kept, no EOS added
            assert len(r) == 12 and tok.eos_token_id not in r
    assert out.n_tokens == sum(map(len, out.response_ids))  # no stop string here: all sampled tokens kept
    assert out.truncation_rate == sum(not f for f in out.finished) / 6
    assert len(prompts[0]) > 64 and len(out.prompt_ids[0]) == 64 - 12  # the long prompt kept its end


# --------------------------------------------------------------------------- temperature
def test_logprobs_are_tempered(tok):
    from alignbench.encoding import encode_samples
    model = _lm(tok)
    batch = pad_batch(encode_samples(_fixed_samples(tok, temperature=0.7)), tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, batch["input_ids"], 0.7), want, atol=1e-6)
    total, _ = response_logprobs(model, batch, temperature=0.7)
    untempered, _ = response_logprobs(model, batch)
    assert torch.allclose(total, (want * batch["response_mask"][:, 1:]).sum(-1), atol=1e-5)
    assert not torch.allclose(total, untempered)


def test_kl_of_pi0_against_itself_is_zero_at_any_temperature(tok):
    from alignbench.context import kl_estimates
    model = _lm(tok)
    samples = _fixed_samples(tok, temperature=0.7)
    kl = kl_estimates(model, model, samples, tok.pad_token_id, "cpu")
    assert kl == {"kl_k1": 0.0, "kl_k3": 0.0}


def test_truncated_sample_has_no_phantom_eos_in_its_kl(tok):
    """A reference that never ends (EOS crushed) is no further from π on a response that did not
    end: the old re-encoding appended an EOS there and k3 exploded."""
    from alignbench.context import kl_estimates
    policy = _lm(tok)
    reference = _lm(tok)
    reference.load_state_dict(policy.state_dict())
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = -200.0  # log π0(EOS) ≈ −200 nats
    reference.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    samples = _fixed_samples(tok, temperature=1.0)
    assert not any(samples.finished)
    kl = kl_estimates(policy, reference, samples, tok.pad_token_id, "cpu")
    assert kl["kl_k3"] < 1.0, kl  # with a phantom EOS: ≈ 200 nats per response


def _fixed_samples(tok, temperature: float) -> SampleBatch:
    prompts = ["\n\nHuman: how do I bake bread? \n\nAssistant:", "\n\nHuman: thanks!\n\nAssistant:"]
    responses = [" Mix flour, water and yeast", " You are"]
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    return SampleBatch(prompts, responses, [0, 1], sum(map(len, r_ids)), p_ids, r_ids, [False, False], temperature)


# --------------------------------------------------------------------------- the PM read point
def test_pm_reads_the_appended_eos_when_pad_is_eos(tok, tmp_path):
    tok_eos = train_tokenizer(CORPUS, vocab_size=300)
    tok_eos.pad_token = tok_eos.eos_token  # as for GPT-2, Pythia, SmolLM2
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok_eos), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tok_eos.pad_token_id, eos_token_id=tok_eos.eos_token_id)
    pm = LlamaForSequenceClassification(cfg).eval()
    pm.save_pretrained(tmp_path)
    tok_eos.save_pretrained(tmp_path)
    scorer = PMScorer(tmp_path)
    prompts = ["\n\nHuman: how do I bake bread? \n\nAssistant:", "\n\nHuman: thanks!\n\nAssistant:"]
    responses = [" Mix flour.", " You are welcome. Anything else?"]
    got = scorer.score(prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = tok_eos(p + r, add_special_tokens=False)["input_ids"] + [tok_eos.eos_token_id]
        with torch.no_grad():
            hidden = pm.model(input_ids=torch.tensor([ids])).last_hidden_state
            at_eos, before = pm.score(hidden[0, -1]).item(), pm.score(hidden[0, -2]).item()
        assert got[i].item() == pytest.approx(at_eos, abs=1e-5)
        assert abs(at_eos - before) > 1e-4  # reading one token early would be a different score


# --------------------------------------------------------------------------- on the tiny π0 and PM
@pytest.fixture
def ctx(tiny_config, tmp_path):
    from alignbench.run_evaluation import build_context
    from alignbench.methods import method_config
    from alignbench_methods.ppo import PPO
    tiny_config.train.temperature = 0.7
    return build_context(tiny_config, method_config(PPO, {"name": "ppo"}), tmp_path)


def test_ppo_first_minibatch_ratio_is_exactly_one_at_temperature(ctx):
    from alignbench_methods.ppo import ActorCritic, collect_rollout
    cfg = ctx.method_cfg
    policy, reference = ctx.policy().eval(), ctx.reference()
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    prompts = ctx.train_prompts[:12]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))
    roll = collect_rollout(ctx, policy, head, reference, prompts, seed=5, cfg=cfg, kl_coef=0.1,
                           layout=list(order.split(4)))
    assert roll.temperature == 0.7
    mb = roll.minibatch(order[:4])
    logprobs, _, _ = ActorCritic(policy, head)(mb["input_ids"], mb["attention_mask"], roll.temperature)
    ratio = torch.exp(logprobs - mb["logprobs"]) * mb["mask"] + (1 - mb["mask"])
    assert (ratio - 1).abs().max().item() == 0.0
    # the rollout holds the sampled ids themselves: same seed, same samples, nothing re-encoded
    again = ctx.sample(policy, prompts, seed=5, max_new_tokens=cfg.max_new_tokens)
    for row, (p, r) in enumerate(zip(again.prompt_ids, again.response_ids)):
        n = int(roll.attention_mask[row].sum())
        assert roll.input_ids[row, :n].tolist() == p + r and int(roll.mask[row].sum()) == len(r)
    assert roll.unfinished.tolist() == [float(not f) for f in again.finished]
    # π0's KL against itself, measured at the rollout's temperature, is exactly 0
    from alignbench.context import kl_estimates
    assert kl_estimates(reference, reference, again, ctx.tokenizer.pad_token_id, ctx.device) == {"kl_k1": 0.0, "kl_k3": 0.0}


def test_pm_scores_samples_by_their_ids(ctx):
    samples = ctx.sample(ctx.reference(), ctx.eval_prompts[:8], seed=1)
    calls = ctx.cost.pm_calls
    by_ids = ctx.score(samples)
    assert ctx.cost.pm_calls == calls + 8
    eos = ctx.tokenizer.eos_token_id
    expected = [ctx.pm.score_ids([p], [r + ([eos] if done and (not r or r[-1] != eos) else [])]).item()
                for p, r, done in zip(samples.prompt_ids, samples.response_ids, samples.finished)]
    assert by_ids.tolist() == pytest.approx(expected, abs=1e-5)
    truncated = [i for i, f in enumerate(samples.finished) if not f]
    assert truncated  # at 16 new tokens the tiny π0 rarely ends
    # the old path re-encoded the text and appended an EOS to every response
    text = ctx.pm.score([samples.prompts[i] for i in truncated], [samples.responses[i] for i in truncated])
    assert not torch.allclose(by_ids[truncated], text)


def test_bad_temperatures_name_the_key(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.config import to_config
    from alignbench.methods import method_config
    from alignbench_methods.rejection_sampling import RejectionSampling
    with pytest.raises(ConfigError, match=r"eval\.temperature"):
        to_config(compose(tiny_overrides + ["eval.temperature=0"]))
    with pytest.raises(ConfigError, match=r"method\.temperature.*eval\.temperature"):
        method_config(RejectionSampling, {"name": "rejection_sampling", "mode": "best_of_n", "temperature": 0.7})
    method_config(RejectionSampling, {"name": "rejection_sampling", "mode": "finetune", "temperature": 0.7})


def test_final_evaluation_reports_truncation_at_eval_temperature(tiny_overrides):
    from alignbench.cli import compose
    from alignbench.runner import run_job
    over = ["method=context_distilled", "eval.temperature=0.5"]
    metrics = run_job(compose(tiny_overrides + over), over)
    sweep = next(o for o in tiny_overrides if o.startswith("paths.sweep_dir=")).split("=", 1)[1]
    run = next((__import__("pathlib").Path(sweep) / "runs").glob("context_distilled_s0*"))
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    rate = sum(not r["finished"] for r in rows) / len(rows)
    assert 0 < rate < 1 and metrics["final"]["truncation_rate"] == pytest.approx(rate)
    csv = (run / "results.csv").read_text().splitlines()
    header = csv[0].split(",")
    trunc = [dict(zip(header, line.split(","))) for line in csv[1:] if ",truncation_rate," in line]
    assert len(trunc) == 1 and trunc[0]["evaluator"] == "policy" and trunc[0]["slice"] == "heldout"
    assert float(trunc[0]["value"]) == pytest.approx(rate)
