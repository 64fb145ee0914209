"""The one record every data source produces: a preference pair split into a shared prompt and
two final responses. Concatenating ``prompt + chosen`` gives back the original transcript exactly,
so nothing is lost in parsing."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # every turn up to and including the last "\n\nAssistant:" tag
    chosen: str  # text after that tag (HH responses start with a space)
    rejected: str
    subset: str  # e.g. "helpful-base" or "hh_synth/harmless"
    n_turns: int  # number of Human turns in the prompt
    source: str = ""  # "path:line" for files, "hh_synth:<index>" for generated pairs
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class RejectedRow:
    """A row that failed validation; with bad_rows=skip it is counted, never silently dropped."""

    source: str  # "path:line"
    reason: str  # one of BAD_ROW_REASONS
    detail: str = ""


BAD_ROW_REASONS = (
    "invalid_json",
    "missing_key",
    "no_assistant_turn",
    "identical_pair",
    "divergent_prompts",
    "malformed_transcript",  # text before the first Human:/Assistant: tag
)


class DataError(ValueError):
    """Bad input data. The message always names the file and line."""


# Subsets whose comparisons are about harmlessness (stages.pm.harmless_weight weighs them; the PM
# report splits accuracy by them): hh_synth's harmful requests, real HH's red-teaming data.
HARMLESS_SUBSETS = ("hh_synth/harmless", "harmless-base")


def harm_group(subset: str) -> str:
    """"harmless" for a subset in ``HARMLESS_SUBSETS``, else "helpful"."""
    return "harmless" if subset in HARMLESS_SUBSETS else "helpful"
