"""train.precision=bf16 against fp32 on the tiny model (tests/conftest.py TINY sizes), same weights
and batches: losses, gradients, response log-probs and the sampler's token frequencies agree within
the tolerances stated below, each with why. bf16 keeps 8 significant bits: one rounding is off by
at most 2⁻⁹ ≈ 0.2% relative, so any single bf16 matmul output is within ~0.4%, and sums over many
terms average those errors out (they are not all one sign).

Torch emulates bf16 on a CPU without native bf16: the numbers are the same as native, only slower,
so these tests run on any CPU (the preflight's refusal is about speed, see alignbench.precision)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignbench.models import train_tokenizer
from alignbench.precision import precision_scope
from alignbench.sampling import sample
from alignbench.stages.preference import pm_loss
from alignbench.encoding import Encoded, pad_batch
from alignbench.train import lm_loss, response_logprobs
from alignbench_methods.dpo import dpo_loss
from tests.test_sampler import ALPHA, CORPUS, KW, PROMPTS, _chi2_pvalue, _features, peaked_lm

# tests/conftest.py TINY: vocab 512, hidden 48, 2 layers, 2 heads, MLP 96
TINY = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
BETA = 0.1

# Tolerances (observed on the seeds below, in brackets; each bound leaves ~5x or more of room):
LOSS_REL = 2e-3  # LM and PM loss, relative: a mean over ~600 token losses / 16 pair margins [2e-5, 1.3e-4]
LOGP_SEQ_REL = 2e-3  # a response's summed log-prob, relative: ~0.2% per logit, averaged over its tokens [5e-4]
LOGP_TOK_MEAN = 0.03  # mean |Δ log p| per response token, nats: logits of ~±20 rounded to 8 bits [0.009]
LOGP_TOK_MAX = 0.2  # the worst token, nats: one logit of ~20 rounds by up to 20·2⁻⁹ ≈ 0.04, plus the rest [0.04]
GRAD_REL = 0.03  # ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ over all parameters [0.005-0.01]
GRAD_COS = 0.999  # cosine(g_bf16, g_fp32): the update direction, which is what training follows [0.99998]


@pytest.fixture(scope="module")
def lm():
    """A random tiny Llama with a peaked head (logit std ~2-20, as after training: a few tokens carry
    most mass), so log-probs and their bf16 rounding are not those of a near-uniform law."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _sequences(n: int, seed: int) -> list[Encoded]:
    """Random ids of 24-63 tokens (right-padded batches), the response from a random start."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(24, 64, (1,), generator=g))
        start = int(torch.randint(4, length // 2, (1,), generator=g))
        out.append(Encoded(torch.randint(2, TINY["vocab_size"], (length,), generator=g).tolist(), start))
    return out


def _loss_and_grad(model, loss_fn, precision: str) -> tuple[float, torch.Tensor]:
    """loss_fn(model) under ``precision``, backward, and every parameter's gradient, flattened (fp32:
    the weights are fp32 under bf16 autocast, and so are their gradients)."""
    model.zero_grad(set_to_none=True)
    with precision_scope(precision, "cpu"):
        loss = loss_fn(model)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(g.dtype == torch.float32 for g in grads)  # fp32 master weights and gradients
    return loss.item(), torch.cat([g.flatten() for g in grads])


def _assert_close(model, loss_fn):
    a, ga = _loss_and_grad(model, loss_fn, "fp32")
    b, gb = _loss_and_grad(model, loss_fn, "bf16")
    assert a != b and not torch.equal(ga, gb)  # bf16 did run: the numbers moved
    assert abs(b - a) <= LOSS_REL * abs(a), (a, b)
    assert (gb - ga).norm() <= GRAD_REL * ga.norm(), float((gb - ga).norm() / ga.norm())
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) >= GRAD_COS


def test_lm_loss_and_gradients(lm):
    batch = pad_batch(_sequences(16, seed=1), pad_id=0)
    _assert_close(lm, lambda m: lm_loss(m, batch))


def test_pm_loss_and_gradients():
    torch.manual_seed(2)
    pm = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=1))
    batch = pad_batch(_sequences(32, seed=3), pad_id=0)  # 16 pairs: chosen rows first, then rejected
    _assert_close(pm, lambda m: pm_loss(m, batch))


def test_response_logprobs(lm):
    batch = pad_batch(_sequences(16, seed=4), pad_id=0)
    with torch.no_grad():
        seq32, tok32 = response_logprobs(lm, batch)
        with precision_scope("bf16", "cpu"):
            seq16, tok16 = response_logprobs(lm, batch)
    assert seq16.dtype == torch.float32  # the log-softmax runs in fp32 on bf16 logits
    assert ((seq16 - seq32).abs() <= LOGP_SEQ_REL * seq32.abs()).all()
    n_tokens = batch["response_mask"][:, 1:].sum()
    assert (tok16 - tok32).abs().sum() / n_tokens <= LOGP_TOK_MEAN
    assert (tok16 - tok32).abs().max() <= LOGP_TOK_MAX


def test_dpo_loss_and_gradients(lm):
    """Policy and a perturbed reference, both at the same precision (as in a run). DPO's margin
    h = (log π_c − log ref_c) − (log π_r − log ref_r) is a difference of four sums of ~-300 nats, so
    its bf16 error does not shrink with h. Since |d log σ(x)/dx| ≤ 1, the mean loss moves by at most
    β · mean over pairs of Σ|Δ log p| over its four sums: the bound, from the measured log-prob
    errors (each within LOGP_SEQ_REL, test_response_logprobs)."""
    g = torch.Generator().manual_seed(5)
    reference = copy.deepcopy(lm).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    batch = pad_batch(_sequences(32, seed=6), pad_id=0)  # 16 pairs: chosen rows first, then rejected

    def loss_fn(policy):
        lp, _ = response_logprobs(policy, batch)
        with torch.no_grad():
            lr, _ = response_logprobs(reference, batch)
        return dpo_loss(*lp.chunk(2), *lr.chunk(2), beta=BETA).loss

    with torch.no_grad():
        errors = []
        for model in (lm, reference):
            exact = response_logprobs(model, batch)[0]
            with precision_scope("bf16", "cpu"):
                errors.append((response_logprobs(model, batch)[0] - exact).abs())
            assert (errors[-1] <= LOGP_SEQ_REL * exact.abs()).all()
    bound = BETA * float(sum(e.view(2, -1).sum(0) for e in errors).mean()) + 1e-5  # + fp32 rounding
    a, ga = _loss_and_grad(lm, loss_fn, "fp32")
    b, gb = _loss_and_grad(lm, loss_fn, "bf16")
    assert a != b and abs(b - a) <= bound, (a, b, bound)
    assert (gb - ga).norm() <= GRAD_REL * ga.norm() and torch.nn.functional.cosine_similarity(ga, gb, 0) >= GRAD_COS


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def sampler_lm(tok):
    """tests/test_sampler.py's peaked tiny Llama (logit std ~2, an EOS bias so rows end now and then)."""
    return peaked_lm(tok)


def test_sampling_distribution_under_bf16_matches_fp32(tok, sampler_lm):
    """Token frequencies (first and second token, length) of bf16 samples against fp32 ones, by
    tests/test_sampler.py's two-sample chi-square at its family-wise level ALPHA: bf16 moves each
    next-token probability by ~0.2-1% relative, far below what 800 rows per side can detect, while
    that test rejects T = 0.8 against T = 1 (tests/test_sampler.py) by a wide margin."""
    with torch.no_grad(), precision_scope("bf16", "cpu"):  # the sampler's forwards did run in bf16
        assert sampler_lm(torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16
    fp32 = sample(sampler_lm, tok, PROMPTS, seed=1, **KW)
    with precision_scope("bf16", "cpu"):
        bf16 = sample(sampler_lm, tok, PROMPTS, seed=2, **KW)
    assert 0.1 < sum(bf16.finished) / len(bf16) < 0.9
    for name in ("token 0", "token 1", "length"):
        a, b = _features(fp32)[name], _features(bf16)[name]
        assert _chi2_pvalue(a, b) > ALPHA, (name, a.most_common(8), b.most_common(8))
