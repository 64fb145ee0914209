"""Deterministic train/eval/test splits of preference pairs, the PM halves of the training split,
the stratified evaluation-prompt sample, and a JSON-able summary of the data.

A pair's split is a pure function of (seed, conversation key, fractions): it never depends on the
other pairs, so adding or removing pairs moves nobody else. The key groups pairs that would leak
into each other:

- ``group_by="conversation"`` (default): the prompt's first Human turn. HH-RLHF holds comparisons
  taken at several depths of the same conversation (in the four test files, 926 of 8,499 valid pairs
  share their first Human turn with another pair, nearly always because one prompt extends the
  other), so a later-turn prompt contains an earlier pair's context and often one of its responses.
  Pairs with equal prompts share their first turn too, so they always land together.
- ``group_by="prompt"``: the exact prompt; only pairs with identical prompts are kept together.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from alignbench.data.types import BAD_ROW_REASONS, PreferencePair, RejectedRow

GROUP_BY = ("conversation", "prompt")
TURN_BUCKETS = ("1", "2", "3", "4", "5+")
N_EXAMPLE_SOURCES = 5


def conversation_key(prompt: str) -> str:
    """The first Human turn of an HH prompt (up to its first ``"\\n\\nAssistant:"``), stripped."""
    i = prompt.find("\n\nAssistant:")
    return (prompt[:i] if i > 0 else prompt).strip()


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for name, frac in dict(fractions).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"data.split: split names must be non-empty strings, got {name!r}")
        try:
            frac = float(frac)
        except (TypeError, ValueError):
            raise ValueError(f"data.split.{name} must be a number, got {frac!r}") from None
        if not (0.0 <= frac <= 1.0):
            raise ValueError(f"data.split.{name} must be in [0, 1], got {frac}")
        out[name] = frac
    if not out:
        raise ValueError("data.split must name at least one split, e.g. {train: 0.8, eval: 0.1, test: 0.1}")
    total = math.fsum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"data.split fractions must sum to 1, got {total:.6g} from {out}")
    return out


def split_pairs(
    pairs: Sequence[PreferencePair],
    fractions: Mapping[str, float],
    seed: int,
    group_by: str = "conversation",
) -> dict[str, list[PreferencePair]]:
    """Assign each pair to a split by a seeded hash of its conversation key (see module doc).

    Splits come back in the order of ``fractions`` (every name present, maybe empty); inside a split
    pairs keep their input order. Sizes follow the fractions up to hashing noise and group sizes.
    """
    fracs = check_fractions(fractions)
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {list(GROUP_BY)}, got {group_by!r}")
    key_of = conversation_key if group_by == "conversation" else (lambda prompt: prompt)
    names = list(fracs)
    bounds, acc = [], 0.0
    for name in names:
        acc += fracs[name]
        bounds.append(acc)
    last = max(i for i, n in enumerate(names) if fracs[n] > 0)  # catches u above a bound < 1 by rounding
    out: dict[str, list[PreferencePair]] = {n: [] for n in names}
    cache: dict[str, str] = {}
    for pair in pairs:
        key = key_of(pair.prompt)
        name = cache.get(key)
        if name is None:
            u = _unit_hash(seed, key)
            i = next((i for i, b in enumerate(bounds) if u < b and fracs[names[i]] > 0), last)
            name = cache[key] = names[i]
        out[name].append(pair)
    return out


PM_PARTS = ("all", "a", "b", "a1", "a2")  # a1/a2: half "a" split again (iterated RLHF on real HH)


def pm_half(pairs: Sequence[PreferencePair], part: str, seed: int) -> list[PreferencePair]:
    """The training comparisons of one PM: ``"all"``, or half ``"a"`` (the proxy PM methods optimise)
    or ``"b"`` (the test PM that judges them; Bai et al. 2022 §4.2); ``"a1"``/``"a2"`` split half "a"
    again by conversation (iterated RLHF on real HH: its PM's start and its annotator PM).

    A pair is in half "a" iff u < 1/2 with u = blake2b(seed, "pm-half", conversation key) in [0, 1):
    keyed by conversation like ``split_pairs`` (salted, so independent of it), the halves never
    share a conversation, hence never a prompt, a transcript or an earlier turn's response.
    """
    if part not in PM_PARTS:
        raise ValueError(f"PM part must be one of {list(PM_PARTS)}, got {part!r}")
    if part == "all":
        return list(pairs)
    if part in ("a1", "a2"):  # half "a" split by conversation again, with an independent salt
        want_1 = part == "a1"
        return [p for p in pm_half(pairs, "a", seed)
                if (_unit_hash(seed, "pm-quarter\x00" + conversation_key(p.prompt)) < 0.5) == want_1]
    want_a = part == "a"
    return [p for p in pairs if (_unit_hash(seed, "pm-half\x00" + conversation_key(p.prompt)) < 0.5) == want_a]


def _largest_remainder(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """Split n over groups in proportion to their sizes (Hamilton's method): floor of each quota,
    then one more to the largest remainders (ties: larger group, then name). Never exceeds a size."""
    total = sum(counts.values())
    n = min(n, total)
    quota = {k: n * c / total for k, c in counts.items()} if total else {}
    out = {k: math.floor(q) for k, q in quota.items()}
    order = sorted(counts, key=lambda k: (-(quota[k] - out[k]), -counts[k], k))
    for k in order[: n - sum(out.values())]:
        out[k] += 1
    return out


def stratified_sample(pairs: Sequence[PreferencePair], n: int, seed: int) -> tuple[list[str], list[dict]]:
    """``n`` distinct prompts sampled per subset in proportion to the subset's distinct prompts
    (largest-remainder allocation), seeded; and per prompt its ``{"subset", "n_turns"}``.

    Inside a subset the prompts with the smallest blake2b(seed, prompt) are taken, and the result is
    ordered by that hash, so subsets interleave and the sample depends only on (seed, the set of
    prompts), never on file order. A prompt found in two subsets counts for its first one.
    """
    first: dict[str, PreferencePair] = {}
    for p in pairs:
        first.setdefault(p.prompt, p)
    by_subset: dict[str, list[str]] = defaultdict(list)
    for prompt, p in first.items():
        by_subset[p.subset].append(prompt)
    rank = {prompt: _unit_hash(seed, "eval-prompt\x00" + prompt) for prompt in first}
    take = _largest_remainder({s: len(ps) for s, ps in by_subset.items()}, max(n, 0))
    chosen = [q for s, ps in by_subset.items() for q in sorted(ps, key=rank.__getitem__)[: take[s]]]
    chosen.sort(key=rank.__getitem__)
    return chosen, [{"subset": first[q].subset, "n_turns": first[q].n_turns} for q in chosen]


def prompt_mix(meta: Sequence[Mapping], split: str) -> dict:
    """The evaluation prompts' mix for metrics.json: ``{"split", "n", "by_subset", "by_turns"}``
    (Human turns bucketed "1".."4", "5+" as in ``data_stats``)."""
    return {"split": split, "n": len(meta), "by_subset": dict(sorted(Counter(m["subset"] for m in meta).items())),
            "by_turns": _turn_counts(m["n_turns"] for m in meta)}


def _turn_bucket(n_turns: int) -> str:
    return "5+" if n_turns >= 5 else str(n_turns)


def _turn_counts(n_turns: Iterable[int]) -> dict[str, int]:
    counts = Counter(_turn_bucket(n) for n in n_turns)
    out = {b: counts.pop(b, 0) for b in TURN_BUCKETS}
    out.update(sorted(counts.items()))  # "0" (a prompt that opens with Assistant) only if present
    return out


def data_stats(splits: Mapping[str, Sequence[PreferencePair]], rejected: Sequence[RejectedRow], bad_rows: str) -> dict:
    """A JSON-able summary of split pairs and rejected rows.

    Keys: ``total_pairs``, ``by_subset``, ``by_split``, ``by_subset_split`` ({subset: {split: n}}),
    ``by_turns`` (Human turns in the prompt, "1".."4", "5+"), ``by_turns_per_subset``,
    ``rejected`` ({"total", "by_reason": every known reason, "examples": first sources per reason}),
    ``bad_rows`` ("skipped" or "error": what was done with bad rows).
    """
    if bad_rows not in ("skip", "error"):
        raise ValueError(f"data.bad_rows must be one of ['error', 'skip'], got {bad_rows!r}")
    every = [p for ps in splits.values() for p in ps]
    subsets = list(dict.fromkeys(p.subset for p in every))
    by_subset_split = {s: {name: 0 for name in splits} for s in subsets}
    for name, ps in splits.items():
        for p in ps:
            by_subset_split[p.subset][name] += 1
    reasons = Counter(r.reason for r in rejected)
    examples: dict[str, list[str]] = {}
    for r in rejected:
        ex = examples.setdefault(r.reason, [])
        if len(ex) < N_EXAMPLE_SOURCES:
            ex.append(r.source)
    return {
        "total_pairs": len(every),
        "by_subset": {s: sum(by_subset_split[s].values()) for s in subsets},
        "by_split": {name: len(ps) for name, ps in splits.items()},
        "by_subset_split": by_subset_split,
        "by_turns": _turn_counts(p.n_turns for p in every),
        "by_turns_per_subset": {s: _turn_counts(p.n_turns for p in every if p.subset == s) for s in subsets},
        "rejected": {
            "total": len(rejected),
            "by_reason": {**{r: reasons.pop(r, 0) for r in BAD_ROW_REASONS}, **dict(reasons)},
            "examples": examples,
        },
        "bad_rows": "skipped" if bad_rows == "skip" else "error",
    }
