"""Anthropic HH-RLHF: parse transcripts, split rows into preference pairs, load the files.

An HH row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``: two full
transcripts that should share every turn except the final Assistant response.

Turn tags are exact: ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"``, plus a bare ``"Human:"`` /
``"Assistant:"`` as the very first non-whitespace text of a transcript. Responses in the data often
contain "Human:" inline ("...  Human: Why not?"); that is text, not a turn, and the counts in
``../shared/data/README.md`` agree with this rule.

A row becomes a :class:`PreferencePair` by cutting each transcript after its LAST
``"\\n\\nAssistant:"`` tag, so ``pair.prompt + pair.chosen`` is the chosen transcript, byte for byte.
Rows that cannot be split that way raise :class:`DataError` with a ``.reason`` from
``BAD_ROW_REASONS``; ``read_hh_file`` either stops on them or records them as :class:`RejectedRow`.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from alignbench.data.types import BAD_ROW_REASONS, DataError, PreferencePair, RejectedRow

HUB_REPO = "Anthropic/hh-rlhf"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HUB_SPLITS = ("train", "test")
BAD_ROW_POLICIES = ("error", "skip")

HUMAN, ASSISTANT = "Human", "Assistant"
ASSISTANT_TAG = "\n\nAssistant:"
_TAG_RE = re.compile(r"\n\n(Human|Assistant):")
_FIRST_TAG_RE = re.compile(r"(Human|Assistant):")
_OFFLINE_HINT = "data.path=../shared/data/hh-rlhf"


def bad_row(reason: str, source: str, detail: str) -> DataError:
    """A DataError for one bad row, carrying ``reason``, ``source`` and ``detail`` attributes."""
    assert reason in BAD_ROW_REASONS, reason
    err = DataError(f"{source}: bad HH-RLHF row ({reason}): {detail}")
    err.reason, err.source, err.detail = reason, source, detail
    return err


def _snippet(text: str, at: int = 0, width: int = 60) -> str:
    return repr(text[max(0, at - width // 2) : at + width // 2])


def _turn_starts(text: str, source: str, what: str = "transcript") -> list[tuple[str, int, int]]:
    """(role, tag_start, content_start) for each turn tag in ``text``."""
    lead = len(text) - len(text.lstrip())
    first = _FIRST_TAG_RE.match(text, lead)
    if first is None:
        if lead == len(text):
            return []  # empty or whitespace only: no turns
        raise bad_row(
            "malformed_transcript",
            source,
            f"{what} has text before its first Human:/Assistant: tag: {_snippet(text, lead)}",
        )
    tags = [(first.group(1), lead, first.end())]
    tags += [(m.group(1), m.start(), m.end()) for m in _TAG_RE.finditer(text, first.end())]
    return tags


def parse_transcript(text: str, source: str) -> list[tuple[str, str]]:
    """Split an HH transcript into ``(role, text)`` turns, role ``"Human"`` or ``"Assistant"``.

    Each turn's text is what lies between its tag and the next tag, with surrounding whitespace
    stripped (so ``"\\n\\nHuman:hi"`` and ``"\\n\\nHuman: hi "`` both give ``("Human", "hi")``).
    Leading whitespace before the first tag is allowed and the first tag may lack its ``"\\n\\n"``.
    Consecutive turns of the same role are returned as they are. An empty or whitespace-only text
    gives ``[]``. Non-whitespace text before the first tag raises :class:`DataError`
    (reason ``malformed_transcript``) naming ``source``.
    """
    tags = _turn_starts(text, source)
    turns = []
    for i, (role, _, content_start) in enumerate(tags):
        end = tags[i + 1][1] if i + 1 < len(tags) else len(text)
        turns.append((role, text[content_start:end].strip()))
    return turns


def _prompt_end(tags: list[tuple[str, int, int]]) -> int | None:
    """Index just past the last Assistant tag, or None if there is none."""
    for role, _, content_start in reversed(tags):
        if role == ASSISTANT:
            return content_start
    return None


def split_pair(chosen: str, rejected: str, subset: str, source: str) -> PreferencePair:
    """Split a chosen/rejected transcript pair at the last ``"\\n\\nAssistant:"`` tag.

    The prompt is everything up to and including that tag (identical in both transcripts); the
    responses are the remainders, so ``pair.prompt + pair.chosen`` equals the chosen transcript
    exactly. ``n_turns`` is the number of Human turns in the prompt.

    Raises :class:`DataError` with ``.reason``:
      ``identical_pair`` (chosen == rejected, checked first), ``malformed_transcript`` (text before
      the first tag), ``no_assistant_turn`` (either transcript has no Assistant tag),
      ``divergent_prompts`` (the two prompts differ, e.g. one response holds a second
      ``"\\n\\nAssistant:"`` turn).
    """
    if chosen == rejected:
        raise bad_row("identical_pair", source, f"chosen and rejected are the same text ({len(chosen)} chars)")
    tags_c = _turn_starts(chosen, source, "chosen transcript")
    tags_r = _turn_starts(rejected, source, "rejected transcript")
    end_c, end_r = _prompt_end(tags_c), _prompt_end(tags_r)
    if end_c is None or end_r is None:
        which = " and ".join(k for k, e in (("chosen", end_c), ("rejected", end_r)) if e is None)
        raise bad_row("no_assistant_turn", source, f"no Assistant turn in {which} transcript")
    prompt, prompt_r = chosen[:end_c], rejected[:end_r]
    if prompt != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(end_c, end_r))
        n_c = sum(r == ASSISTANT for r, _, s in tags_c if s <= end_c)
        n_r = sum(r == ASSISTANT for r, _, s in tags_r if s <= end_r)
        raise bad_row(
            "divergent_prompts",
            source,
            f"prompts before the last Assistant turn differ at char {at} (chosen prompt: {end_c} chars, "
            f"{n_c} Assistant tags; rejected prompt: {end_r} chars, {n_r} Assistant tags); "
            f"chosen {_snippet(prompt, at)} vs rejected {_snippet(prompt_r, at)}",
        )
    n_turns = sum(role == HUMAN for role, _, content_start in tags_c if content_start <= end_c)
    return PreferencePair(
        prompt=prompt,
        chosen=chosen[end_c:],
        rejected=rejected[end_r:],
        subset=subset,
        n_turns=n_turns,
        source=source,
    )


def check_bad_rows_policy(bad_rows: str) -> str:
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"data.bad_rows must be one of {list(BAD_ROW_POLICIES)}, got {bad_rows!r}")
    return bad_rows


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a plain or gzip file (detected by its magic bytes)."""
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    lineno = 0
    try:
        with (gzip.open(path, "rb") if is_gzip else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}:{lineno + 1}: cannot read the file past line {lineno}: {e}") from e


def _row(raw: bytes, source: str) -> tuple[str, str]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad_row("invalid_json", source, f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        where = _snippet(raw.decode("utf-8"), e.pos)
        raise bad_row("invalid_json", source, f"{e.msg} at column {e.colno}: {where}") from None
    if not isinstance(obj, dict):
        raise bad_row("invalid_json", source, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise bad_row("missing_key", source, f"missing {missing}; keys present: {sorted(obj)}")
    for k in ("chosen", "rejected"):
        if not isinstance(obj[k], str):
            raise bad_row("missing_key", source, f"{k!r} is not a string (got {type(obj[k]).__name__})")
    return obj["chosen"], obj["rejected"]


def read_hh_file(
    path: str | Path, subset: str, bad_rows: str = "error"
) -> tuple[list[PreferencePair], list[RejectedRow]]:
    """Read one HH-RLHF ``.jsonl`` or ``.jsonl.gz`` file into preference pairs.

    ``bad_rows="error"`` raises :class:`DataError` at the first bad row (message: ``file:line``, the
    reason and what is wrong); ``"skip"`` records it as a :class:`RejectedRow` and goes on. Blank
    lines are not rows and are passed over; line numbers count every physical line.
    """
    check_bad_rows_policy(bad_rows)
    path = Path(path)
    pairs: list[PreferencePair] = []
    rejected: list[RejectedRow] = []
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            chosen, rej = _row(raw, source)
            pairs.append(split_pair(chosen, rej, subset, source))
        except DataError as e:
            if bad_rows == "error":
                err = DataError(f"{e} (data.bad_rows=skip skips such rows and reports them)")
                err.reason, err.source, err.detail = e.reason, e.source, e.detail
                raise err from None
            rejected.append(RejectedRow(source=source, reason=e.reason, detail=e.detail))
    return pairs, rejected


def check_hh_folder(path: str | None, subsets: Sequence[str], splits: Sequence[str]) -> None:
    """Before anything trains: a one-line DataError unless the local HH folder ``path`` (data.path;
    None reads the Hub) holds every ``<subset>/<split>.jsonl.gz`` (or ``.jsonl``) the config reads.
    The message names ALIGNBENCH_HH_PATH, the variable the HH presets read data.path from."""
    if path is None:
        return
    root = Path(path).expanduser()
    where = f"data.path={path}" + (f" = {root.resolve()}" if not root.is_absolute() else "")
    fix = "set ALIGNBENCH_HH_PATH (or data.path) to the HH-RLHF folder"
    if not root.is_dir():
        raise DataError(f"data.path: no HH-RLHF folder at {path}; {fix} ({where})")
    missing = [f"{s}/{sp}.jsonl.gz" for s in subsets for sp in splits
               if not any((root / s / f"{sp}{ext}").is_file() for ext in (".jsonl.gz", ".jsonl"))]
    if missing:
        raise DataError(f"data.path: {path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                        f"(expected <subset>/<split>.jsonl.gz); {fix} ({where})")


class MissingDataFile(DataError, FileNotFoundError):
    """An HH folder or file that is not there: bad input (one line from the CLI), and still a
    FileNotFoundError for callers that catch that."""


def _local_file(root: Path, subset: str, split: str) -> Path:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (root / subset / name).is_file():
            return root / subset / name
    there = sorted(p.name for p in (root / subset).iterdir()) if (root / subset).is_dir() else None
    raise MissingDataFile(
        f"HH-RLHF file not found: {root / subset / f'{split}.jsonl.gz'} (nor .jsonl) under data.path={root}; "
        + (f"{root / subset} holds {there}" if there is not None else f"no folder {root / subset}")
    )


def _hub_file(subset: str, split: str) -> Path:
    filename = f"{subset}/{split}.jsonl.gz"
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_REPO, repo_type="dataset", filename=filename))
    except Exception as e:  # network, auth, missing entry: all end the same way
        raise RuntimeError(
            f"could not download {filename} of the Hugging Face dataset {HUB_REPO} "
            f"({type(e).__name__}: {e}). Offline, point at a local copy with the Hub layout "
            f"<subset>/<split>.jsonl.gz, e.g. {_OFFLINE_HINT}"
        ) from e


def load_hh_rlhf(
    path: str | None, subsets: Sequence[str], splits: Sequence[str], bad_rows: str
) -> tuple[list[PreferencePair], list[RejectedRow]]:
    """Load HH-RLHF subsets/splits from ``path`` (Hub layout ``<subset>/<split>.jsonl[.gz]``) or,
    with ``path=None``, from the Hub dataset ``Anthropic/hh-rlhf``.

    Pairs come in the order subsets x splits x lines; each carries ``meta={"hub_split": split}``.
    """
    check_bad_rows_policy(bad_rows)
    subsets = [subsets] if isinstance(subsets, str) else list(subsets)
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not subsets or not splits:
        raise ValueError(f"data.subsets and data.splits must not be empty (got {subsets}, {splits})")
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown HH-RLHF subset(s) {unknown} in data.subsets; valid: {', '.join(SUBSETS)}")
    unknown = [s for s in splits if s not in HUB_SPLITS]
    if unknown:
        raise ValueError(f"unknown HH-RLHF split(s) {unknown} in data.splits; valid: {', '.join(HUB_SPLITS)}")
    for name, values in (("data.subsets", subsets), ("data.splits", splits)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} lists an entry twice: {values}")
    root = None
    if path is not None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise MissingDataFile(f"data.path={path} is not a directory (expected <subset>/<split>.jsonl.gz inside)")
    pairs: list[PreferencePair] = []
    rejected: list[RejectedRow] = []
    for subset in subsets:
        for split in splits:
            file = _local_file(root, subset, split) if root is not None else _hub_file(subset, split)
            got, bad = read_hh_file(file, subset, bad_rows)
            pairs += [dataclasses.replace(p, meta={"hub_split": split}) for p in got]
            rejected += bad
    return pairs, rejected
