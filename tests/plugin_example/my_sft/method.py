"""The worked example of a method plugin in docs/methods.md (kept identical to it by tests/test_plugin.py)."""
from dataclasses import dataclass

from alignbench.config import opt
from alignbench.methods import Method, MethodConfig, PolicyArtifact
from alignbench.encoding import encode, pad_batch
from alignbench.train import batch_schedule, lm_loss, supervised_loop


@dataclass
class SFTConfig(MethodConfig):
    epochs: float = opt(1.0, gt=0)


class SFT(Method):
    """Supervised fine-tuning on the chosen responses."""
    name = "my_sft"
    config_class = SFTConfig

    def train(self, ctx) -> PolicyArtifact:
        policy, tok = ctx.policy(), ctx.tokenizer
        data = [encode(tok, p.prompt, p.chosen, ctx.max_len, fmt=ctx.fmt) for p in ctx.pairs]  # data.format
        batches = batch_schedule(len(data), ctx.batch_size, ctx.method_cfg.epochs, ctx.seed)
        res = supervised_loop(policy, batches, lambda idx: pad_batch([data[i] for i in idx], tok.pad_token_id),
                              lm_loss, ctx.lr, "my_sft", device=ctx.device, log_step=ctx.log_step)
        ctx.charge_step(res.tokens)  # its training tokens and their FLOPs (6·N per token)
        ctx.log_point(res.steps, model=policy)
        return PolicyArtifact(path=ctx.save_policy(policy))  # safetensors + tokenizer
