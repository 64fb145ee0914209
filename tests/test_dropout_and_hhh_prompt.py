"""Every method's policy trains without dropout (in train mode), and π0's teacher sees the HHH
prompt and the dialogue separated by exactly one blank line."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignbench.config import Config, ModelConfig, Pi0StageConfig
from alignbench.context import RunContext
from alignbench.data import load_data
from alignbench.methods import Budget, method_config
from alignbench.models import load_lm, load_tokenizer, tiny_lm, train_tokenizer
from alignbench.stages import distill
from alignbench.stages.base import dialogue_corpus


def gpt2_with_dropout(path: Path) -> Path:
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5,
                               embd_pdrop=0.5, attn_pdrop=0.5)).save_pretrained(path)
    return path


def llama_with_dropout(path: Path) -> Path:
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=32, attention_dropout=0.5,
                                 attn_implementation="eager")).save_pretrained(path)
    return path


def context_with_pi0(path: Path, out: Path) -> RunContext:
    stages = SimpleNamespace(pi0=SimpleNamespace(path=path, record={"max_len": 32}))
    return RunContext(cfg=Config(), method_cfg=None, stages=stages, tokenizer=None, device=torch.device("cpu"),
                      train_prompts=[], eval_prompts=[], pairs=[], pm=None, judge=None, judge_name="gold",
                      out_dir=out, budget=None)


@pytest.mark.parametrize("build", [gpt2_with_dropout, llama_with_dropout])
def test_the_policy_every_method_gets_trains_without_dropout(tmp_path, build):
    path = build(tmp_path / "pi0")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    raw = load_lm(path).train()
    assert not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)  # the model has dropout

    policy = context_with_pi0(path, tmp_path).policy()
    assert policy.training  # methods train in train mode (PPO included)
    first, second = policy(input_ids=ids).logits, policy(input_ids=ids).logits
    assert torch.equal(first, second)
    assert torch.allclose(first, policy.eval()(input_ids=ids).logits, atol=1e-6)
    policy.save_pretrained(tmp_path / "saved")  # a saved policy reloads without dropout too
    again = context_with_pi0(tmp_path / "saved", tmp_path).policy()
    assert torch.equal(again(input_ids=ids).logits, again(input_ids=ids).logits)


class FakePM:
    """A deterministic stand-in for the proxy PM (the reward's value is not what is tested); it
    scores samples by their ids, like the real one."""
    calls, tokens, batch_size = 0, 0, 64

    def __init__(self, tokenizer):
        self.tokenizer, self.model = tokenizer, torch.nn.Linear(1, 1)  # a model for the FLOPs count

    def score(self, prompts, responses):
        return torch.tensor([float(len(r) % 3) for r in responses])

    def score_ids(self, prompt_ids, response_ids):
        return torch.tensor([float(len(r) % 3) for r in response_ids])


def test_ppo_trains_in_train_mode_with_first_ratios_exactly_one(tmp_path, monkeypatch):
    from alignbench_methods.ppo import PPO, ActorCritic
    texts = dialogue_corpus(load_data(Config().data).train[:40])
    tok = train_tokenizer(texts, 300)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5,
                               embd_pdrop=0.5, attn_pdrop=0.5, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "pi0")
    tok.save_pretrained(tmp_path / "pi0")
    modes = []
    forward = ActorCritic.forward

    def spy(self, *args, **kwargs):
        modes.append(self.policy.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ActorCritic, "forward", spy)
    cfg = Config()
    cfg.train.max_new_tokens = 8
    prompts = [t[: t.index("Assistant:") + len("Assistant:")] for t in texts[:8]]
    ctx = context_with_pi0(tmp_path / "pi0", tmp_path)
    ctx.cfg, ctx.tokenizer, ctx.stages.pi0.record["max_len"] = cfg, load_tokenizer(tmp_path / "pi0"), 64
    ctx.train_prompts, ctx.eval_prompts, ctx.pm, ctx.budget = prompts, prompts[:2], FakePM(tok), Budget()
    ctx.judge = lambda ps, rs, samples=None: [0.0] * len(ps)
    ctx.method_cfg = method_config(PPO, {"name": "ppo", "steps": 1, "rollout_batch_size": 4, "ppo_epochs": 1,
                                         "batch_size": 4, "eval_every": 1})
    PPO().train(ctx)
    assert modes == [True]  # one minibatch, in train mode
    point = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()][-1]
    assert point["approx_kl"] == 0.0  # the rollout's own samples: ratio exactly 1, dropout or not


class Recorder(torch.nn.Module):
    """Stands in for the teacher: records the sequences it reads (right-padded rows, or packed ones
    at ``cu_seq_lens_q``: alignbench.packing), answers as the real teacher."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    @property
    def config(self):
        return self.model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:  # packed: one row of sequences
            cu = kwargs["cu_seq_lens_q"].tolist()
            self.inputs += [input_ids[0, a:b].tolist() for a, b in zip(cu, cu[1:])]
        else:
            self.inputs += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("custom", [None, "Be helpful, honest and harmless.\n\n\n"])
def test_teacher_sees_one_blank_line_between_hhh_prompt_and_dialogue(monkeypatch, custom):
    cfg = Config()
    if custom:
        cfg.stages.pi0.hhh_prompt = custom
    texts = dialogue_corpus(load_data(cfg.data).train[:6])
    tok = train_tokenizer(texts + [distill.HHH_PROMPT], 300)
    student = tiny_lm(ModelConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  max_seq_len=512), tok, seed=0)
    teachers = []

    frozen_copy = distill.freeze.frozen_copy

    def recorded_copy(model):  # the teacher: π0's frozen copy, recording what it reads
        teachers.append(Recorder(frozen_copy(model)))
        return teachers[-1]

    monkeypatch.setattr(distill.freeze, "frozen_copy", recorded_copy)
    prompt = distill.hhh_prompt(cfg)
    distill._distill(student, tok, prompt, texts, 512, Pi0StageConfig(batch_size=len(texts), max_steps=1), cfg, "cpu")
    seen = [tok.decode(ids, skip_special_tokens=True) for ids in teachers[0].inputs]
    assert len(seen) == len(texts)
    head = (custom or distill.HHH_PROMPT).rstrip("\n")
    assert sorted(seen) == sorted(head + t for t in texts)
    assert all(t.startswith("\n\nHuman:") for t in texts)  # so exactly one blank line follows the prompt
    assert not any("\n\n\n\n" in s for s in seen)
