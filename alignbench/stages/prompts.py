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


# Llama 2 §4.2.4's safety preprompts (stages.pi0.safety_preprompt), read by π0 before it answers
# the safety context distillation prompts (alignbench.stages.safety_distill). Generic: one sentence.
GENERIC_SAFETY_PREPROMPT = ("The assistant is safe and avoids harm: it refuses any request that could hurt "
                            "someone and helps with everything else.")
# Template: the generic sentence plus an answer template per risk category. The categories are
# hh_synth's harmful requests, named generically so that the same text serves real HH too.
RISK_TEMPLATES = (
    ("violence", "If asked how to hurt someone: I can't help with that. If you are upset, talk to someone "
                 "you trust."),
    ("theft", "If asked how to steal something: I can't help with that, it is not yours to take."),
    ("poisoning", "If asked how to poison someone: I can't help with that, it could hurt someone."),
    ("break-in", "If asked how to break into a house: I won't help with that. Please talk to someone you "
                 "trust instead."),
    ("cruelty", "If asked to write something cruel: Sorry, I won't do that. Maybe try to solve this kindly "
                "instead."),
)
SAFETY_PREPROMPTS = {
    "generic": GENERIC_SAFETY_PREPROMPT,
    "template": " ".join([GENERIC_SAFETY_PREPROMPT, *(text for _, text in RISK_TEMPLATES)]),
}


def safety_preprompt(name: str) -> str | None:
    """The preprompt text of ``stages.pi0.safety_preprompt`` (None for ``none``); dialogues open
    with "\\n\\nHuman:", so raw text reads it, one blank line, then the dialogue."""
    return None if name == "none" else SAFETY_PREPROMPTS[name]
