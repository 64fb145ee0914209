"""One pass over the frozen blocks that the policy, π0 and the PMs share (``shared_trunk``): the
scores and log-probs are bitwise those of separate forwards, the shared blocks run once per batch,
and nothing is shared that is not bitwise the same."""
import copy
import json

import pytest
import torch

from alignbench import freeze, packing, shared_trunk
from alignbench.cli import compose
from alignbench.config import ModelConfig
from alignbench.models import tiny_lm, train_tokenizer
from alignbench.runner import run_job
from alignbench.stages.preference import pm_scores
from alignbench.train import final_hidden, selected_logprobs
from transformers import LlamaForSequenceClassification

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["Human: hi there\n\nAssistant: hello, how can I help you today?"] * 8, 300)


def _pair(arch: str, tokenizer, layers: int = 3):
    """A policy with its top block trained (perturbed), and a deep copy of the untrained model as π0."""
    cfg = ModelConfig(arch=arch, vocab_size=300, hidden_size=32, num_layers=layers, num_heads=4,
                      intermediate_size=64, max_seq_len=64)
    pi0 = tiny_lm(cfg, tokenizer, seed=0).eval()
    policy = freeze.freeze_below(copy.deepcopy(pi0), 1).eval()
    with torch.no_grad():
        for p in freeze.decoder_layers(policy)[2][-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, pi0


def _batch(seed: int = 0, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 14, 5, 12]
    ids = torch.zeros(4, 14, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, :n] = 1
    return ids, mask, (mask[:, 1:] * (torch.arange(13) >= 3)).bool()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("packed", [True, False])
@torch.no_grad()
def test_shared_blocks_give_bitwise_the_numbers_of_separate_forwards(arch, packed, tokenizer):
    policy, pi0 = _pair(arch, tokenizer)
    ids, mask, positions = _batch()
    with packing.use(packed):
        apart = [selected_logprobs(m, ids, mask, positions)[0] for m in (policy, pi0, policy)]
        with shared_trunk.sharing([policy, pi0]) as memo:
            shared = [selected_logprobs(m, ids, mask, positions)[0] for m in (policy, pi0, policy)]
            other = selected_logprobs(pi0, *_batch(seed=1))[0]  # another batch: computed, not reused
        again = selected_logprobs(pi0, *_batch(seed=1))[0]
    assert shared_trunk.shared_depth([policy, pi0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(apart, shared))
    assert torch.equal(other, again)
    assert not torch.equal(apart[0], apart[1])  # the top block differs: the models do differ
    assert (memo.misses, memo.hits) == (2, 2)  # the first batch once for three forwards, the second once
    # the models are as they were: no wrapper left behind
    assert all("forward" not in b.__dict__ for m in (policy, pi0) for b in freeze.decoder_layers(m)[2])


@torch.no_grad()
def test_a_pm_trained_from_the_same_base_shares_its_trunk_with_the_policy_and_pi0(tokenizer):
    """The measurement's order: the PM scores the batch (its pass is kept), then the policy and π0
    read the same sequences from the kept pass; every number bitwise as apart."""
    policy, pi0 = _pair("llama", tokenizer)
    pm = LlamaForSequenceClassification(copy.deepcopy(pi0.config))
    pm.model.load_state_dict(pi0.model.state_dict())
    pm = freeze.freeze_below(pm, 1).eval()
    with torch.no_grad():
        for p in freeze.decoder_layers(pm)[2][-1].parameters():
            p.mul_(1.01)
    ids, mask, positions = _batch()

    def read():
        return [pm_scores(pm, ids, mask)] + [selected_logprobs(m, ids, mask, positions)[0] for m in (policy, pi0)]

    apart = read()
    with shared_trunk.sharing(shared_trunk.scoring_models(policy, pi0, _Scorer(pm))) as memo:
        shared = read()
    assert all(torch.equal(a, b) for a, b in zip(apart, shared)) and (memo.misses, memo.hits) == (1, 2)


class _Scorer:
    """A scorer as the context holds it (PMScorer, the PM judge): it names its models."""

    def __init__(self, model):
        self.model = model

    def trunk_models(self):
        return [self.model]


@torch.no_grad()
def test_nothing_is_shared_that_differs_and_grad_forwards_never_reuse(tokenizer):
    policy, pi0 = _pair("llama", tokenizer)
    other = copy.deepcopy(pi0)
    with torch.no_grad():
        next(freeze.decoder_layers(other)[2][0].parameters()).view(-1)[0] += 1e-6  # one weight, bottom block
    assert shared_trunk.shared_depth([policy, other]) == 0
    assert shared_trunk.shared_depth([policy, pi0, other]) == 0
    assert shared_trunk.shared_depth([policy]) == 0
    train_mode = copy.deepcopy(pi0).train()
    assert shared_trunk.shared_depth([pi0, train_mode]) == 0  # dropout may differ: never shared
    ids, mask, _ = _batch()
    with shared_trunk.sharing([policy, pi0]) as memo:
        with torch.enable_grad():
            final_hidden(policy, ids, mask)
            final_hidden(pi0, ids, mask)
    assert (memo.hits, memo.misses) == (0, 0)


def test_a_run_measures_the_same_points_with_and_without_the_shared_trunk(tiny_overrides, tmp_path, monkeypatch):
    """DPO with the top block trained: every point (KL to π0, proxy and judge rewards) is bitwise
    the same, and the policy, π0 and both PMs read the shared blocks once per batch."""
    hits = []
    find = shared_trunk.TrunkMemo.find

    def counted(self, args):
        out = find(self, args)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(shared_trunk.TrunkMemo, "find", counted)
    over = ["method=dpo", "method.max_steps=2", "method.eval_every=1", "method.probe_pairs=4",
            "model.trainable_layers=1"]
    logs = []
    for name, block in (("shared", shared_trunk.sharing), ("apart", None)):
        run_over = [o for o in tiny_overrides if not o.startswith("paths.sweep_dir")] + over + [
            f"paths.sweep_dir={tmp_path / name}"]
        if block is None:
            with shared_trunk.disabled():
                m = run_job(compose(run_over), over)
        else:
            m = run_job(compose(run_over), over)
        run = tmp_path / name / "runs" / m["run_id"]
        logs.append([{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                     for line in (run / "train_log.jsonl").read_text().splitlines()])
    assert logs[0] == logs[1] and len(logs[0]) >= 3 and logs[0][-1]["kl_k3"] > 0
    # per trained point π0 reads the policy's pass (the tiny config's PM reads its raw-format samples with
    # an EOS appended where they ended at the stop string, so not always the same sequences)
    assert sum(hits) >= 2
