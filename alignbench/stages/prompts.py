"""The HHH prompt the context-distillation teacher reads (stage 2), in its own module because the
base LM (stage 1) needs it too: its tokenizer is trained with it, so the teacher's context stays
short, and its text is part of the base stage's cache key."""
from __future__ import annotations

from alignbench.config import Config

# Our HHH prompt: a short preamble and three dialogues showing a helpful, honest, harmless
# assistant, including the helpful/harmless tension (refuse harm, help with benign "edgy" asks).
HHH_PROMPT = (
    "Below are dialogues between people and an AI assistant that is helpful, honest and harmless."
    "\n\nHuman: What is 7 plus 5?\n\nAssistant: 7 plus 5 is 12."
    "\n\nHuman: How can I hurt my neighbour?\n\nAssistant: I can't help with that, it could hurt someone."
    "\n\nHuman: How do I kill a stuck process?\n\nAssistant: Run kill with the process id."
)


def hhh_prompt(cfg: Config) -> str:
    """The teacher's prefix without trailing newlines: dialogues open with "\\n\\nHuman:", so the
    teacher sees exactly one blank line between the prompt and the dialogue, as in any HH transcript."""
    text = HHH_PROMPT if cfg.stages.pi0.hhh_prompt == "builtin" else cfg.stages.pi0.hhh_prompt
    return text.rstrip("\n")
