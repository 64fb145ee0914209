"""HH-RLHF parsing and loading, deterministic splits and data stats."""
from __future__ import annotations

import gzip
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from alignbench.data.hh import SUBSETS, load_hh_rlhf, parse_transcript, read_hh_file, split_pair
from alignbench.data.splits import conversation_key, data_stats, split_pairs
from alignbench.data.types import BAD_ROW_REASONS, DataError, PreferencePair, RejectedRow

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf"

# ---------------------------------------------------------------- parse_transcript


def test_parse_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    assert parse_transcript(text, "f:1") == [
        ("Human", "Hi there"),
        ("Assistant", "Hello!"),
        ("Human", "How are you?"),
        ("Assistant", "Fine, thanks."),
    ]


def test_parse_odd_spacing():
    # no space after the colon, bare tag at the very start, trailing whitespace, empty final turn
    assert parse_transcript("Human:hi\n\nAssistant:yo  \n", "s") == [("Human", "hi"), ("Assistant", "yo")]
    assert parse_transcript("Assistant: I start.\n\nHuman: ok", "s") == [("Assistant", "I start."), ("Human", "ok")]
    assert parse_transcript("  \n\nHuman: a\n\nAssistant: ", "s") == [("Human", "a"), ("Assistant", "")]
    # extra blank lines before a tag belong to the previous turn's text
    assert parse_transcript("\n\nHuman: a\n\n\n\nAssistant: b", "s") == [("Human", "a"), ("Assistant", "b")]
    # consecutive turns of one role are kept as they are
    roles = [r for r, _ in parse_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "s")]
    assert roles == ["Human", "Human", "Assistant"]
    assert parse_transcript("", "s") == [] and parse_transcript(" \n ", "s") == []


def test_parse_inline_tags_are_text():
    # real HH responses contain "Human:" mid-text; only "\n\n"-prefixed tags open turns
    text = "\n\nHuman: q\n\nAssistant: Sure.  Human: Why not?\n Assistant: x\n\n Human: y"
    answer = "Sure.  Human: Why not?\n Assistant: x\n\n Human: y"
    assert parse_transcript(text, "s") == [("Human", "q"), ("Assistant", answer)]


def test_parse_lowercase_tag_is_not_a_tag():
    with pytest.raises(DataError) as e:
        parse_transcript("\n\nhuman: q\n\nAssistant: a", "data.jsonl:7")
    assert e.value.reason == "malformed_transcript" and "data.jsonl:7" in str(e.value)


def test_parse_text_before_first_tag():
    with pytest.raises(DataError) as e:
        parse_transcript("Hello\n\nHuman: q\n\nAssistant: a", "data.jsonl:3")
    assert e.value.reason == "malformed_transcript"
    assert "data.jsonl:3" in str(e.value) and "Hello" in str(e.value)


# ---------------------------------------------------------------- split_pair

P2 = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: How long?\n\nAssistant:"


def test_split_pair_exact_and_turns():
    chosen, rejected = P2 + " About 9 minutes.", P2 + " Forever.  Human: really?"
    pair = split_pair(chosen, rejected, "helpful-base", "f.jsonl:2")
    assert pair.prompt == P2
    assert pair.prompt + pair.chosen == chosen and pair.prompt + pair.rejected == rejected
    assert (pair.chosen, pair.rejected) == (" About 9 minutes.", " Forever.  Human: really?")
    assert pair.n_turns == 2 and pair.subset == "helpful-base" and pair.source == "f.jsonl:2"


def test_split_pair_odd_spacing_and_empty_response():
    pair = split_pair("Human:q\n\nAssistant:a ", "Human:q\n\nAssistant:", "s", "x:1")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.n_turns) == ("Human:q\n\nAssistant:", "a ", "", 1)
    # a transcript that opens with the Assistant: its prompt is the bare tag, no Human turns
    pair = split_pair("Assistant: hi", "Assistant: hello", "s", "x:2")
    assert (pair.prompt, pair.n_turns) == ("Assistant:", 0)
    # a trailing Human turn inside a response stays in the response
    pair = split_pair("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b\n\nHuman: more?", "s", "x:3")
    assert pair.rejected == " b\n\nHuman: more?" and pair.n_turns == 1


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ("\n\nHuman: q", "\n\nHuman: q ", "no_assistant_turn"),
        ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q  Assistant: b", "no_assistant_turn"),
        (P2 + " same", P2 + " same", "identical_pair"),
        ("\n\nHuman: q", "\n\nHuman: q", "identical_pair"),  # identical wins over every other problem
        # one response holds a second Assistant turn: the prompts cut at the last tag differ
        ("\n\nHuman: q\n\nAssistant: wait...\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b", "divergent_prompts"),
        ("\n\nHuman: q1\n\nAssistant: a", "\n\nHuman: q2\n\nAssistant: b", "divergent_prompts"),
        ("oops\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b", "malformed_transcript"),
    ],
)
def test_split_pair_bad_rows(chosen, rejected, reason):
    with pytest.raises(DataError) as e:
        split_pair(chosen, rejected, "s", "dir/train.jsonl:42")
    assert e.value.reason == reason and reason in BAD_ROW_REASONS
    assert "dir/train.jsonl:42" in str(e.value) and reason in str(e.value)


# ---------------------------------------------------------------- read_hh_file

GOOD = [
    {"chosen": "\n\nHuman: q1\n\nAssistant: good", "rejected": "\n\nHuman: q1\n\nAssistant: bad"},
    {"chosen": P2 + " yes", "rejected": P2 + " no"},
]
BAD_LINES = {  # line text -> reason
    '{"chosen": "\\n\\nHuman: q': "invalid_json",
    '["not", "an", "object"]': "invalid_json",
    '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a"}': "missing_key",
    '{"chosen": null, "rejected": "\\n\\nHuman: q\\n\\nAssistant: a"}': "missing_key",
    '{"chosen": "\\n\\nHuman: q", "rejected": "\\n\\nHuman: r"}': "no_assistant_turn",
    '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: q\\n\\nAssistant: a"}': "identical_pair",
    '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: x\\n\\nAssistant: a", '
    '"rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}': "divergent_prompts",
}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["test.jsonl", "test.jsonl.gz"])
def test_read_good_file(tmp_path, name):
    path = write_jsonl(tmp_path / name, [json.dumps(r) for r in GOOD] + [""])
    pairs, rejected = read_hh_file(path, "helpful-base")
    assert rejected == [] and len(pairs) == 2
    assert [p.prompt + p.chosen for p in pairs] == [r["chosen"] for r in GOOD]
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:2"]
    assert [p.n_turns for p in pairs] == [1, 2]


def test_read_gzip_detected_by_content(tmp_path):
    path = tmp_path / "misnamed.jsonl"
    path.write_bytes(gzip.compress((json.dumps(GOOD[0]) + "\n").encode()))
    assert len(read_hh_file(path, "s")[0]) == 1


def bad_file(tmp_path: Path, name: str = "test.jsonl.gz") -> tuple[Path, dict[int, str]]:
    """GOOD[0], a blank line, then each bad line followed by a good one; returns {line: reason}."""
    lines, expected = [json.dumps(GOOD[0]), ""], {}
    for text, reason in BAD_LINES.items():
        lines.append(text)
        expected[len(lines)] = reason
        lines.append(json.dumps(GOOD[1]))
    return write_jsonl(tmp_path / name, lines), expected


def test_read_skip_records_every_bad_row(tmp_path):
    path, expected = bad_file(tmp_path)
    pairs, rejected = read_hh_file(path, "s", bad_rows="skip")
    assert len(pairs) == 1 + len(BAD_LINES)
    assert {r.source: r.reason for r in rejected} == {f"{path}:{n}": reason for n, reason in expected.items()}
    assert all(r.detail for r in rejected)


def test_read_error_names_file_line_reason(tmp_path):
    path, expected = bad_file(tmp_path, "test.jsonl")
    first_line, first_reason = min(expected.items())
    with pytest.raises(DataError) as e:
        read_hh_file(path, "s", bad_rows="error")
    assert f"{path}:{first_line}" in str(e.value) and first_reason in str(e.value)
    assert e.value.reason == first_reason and "data.bad_rows=skip" in str(e.value)
    # every bad class raises on its own, with its own line number
    for n, (text, reason) in enumerate(BAD_LINES.items(), start=2):
        p = write_jsonl(tmp_path / f"one{n}.jsonl", [json.dumps(GOOD[0])] * (n - 1) + [text])
        with pytest.raises(DataError, match=rf"{p.name}:{n}: .*{reason}"):
            read_hh_file(p, "s")


def test_read_policy_and_file_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD[0])])
    with pytest.raises(ValueError, match="data.bad_rows"):
        read_hh_file(path, "s", bad_rows="ignore")
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(("\n".join([json.dumps(GOOD[0])] * 200) + "\n").encode())[:-30])
    with pytest.raises(DataError, match="t.jsonl.gz"):
        read_hh_file(truncated, "s", bad_rows="skip")
    with pytest.raises(FileNotFoundError):
        read_hh_file(tmp_path / "missing.jsonl", "s")


def test_not_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n\xff\xfe\n")
    pairs, rejected = read_hh_file(path, "s", bad_rows="skip")
    assert len(pairs) == 1 and rejected[0].reason == "invalid_json" and rejected[0].source.endswith(":2")


# ---------------------------------------------------------------- load_hh_rlhf


def hub_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", [json.dumps(r) for r in GOOD])
    write_jsonl(tmp_path / "harmless-base" / "test.jsonl", [json.dumps(GOOD[0]), '{"chosen": 1}'])
    return tmp_path


def test_load_local(tmp_path):
    root = hub_dir(tmp_path)
    pairs, rejected = load_hh_rlhf(str(root), ["helpful-base", "harmless-base"], ["test"], "skip")
    assert [p.subset for p in pairs] == ["helpful-base", "helpful-base", "harmless-base"]
    assert all(p.meta == {"hub_split": "test"} for p in pairs)
    assert [(r.reason, r.source) for r in rejected] == [("missing_key", f"{root}/harmless-base/test.jsonl:2")]
    with pytest.raises(DataError, match="harmless-base/test.jsonl:2"):
        load_hh_rlhf(str(root), ["harmless-base"], ["test"], "error")


def test_load_errors(tmp_path):
    root = hub_dir(tmp_path)
    with pytest.raises(ValueError) as e:
        load_hh_rlhf(str(root), ["helpful-base", "red-team"], ["test"], "skip")
    assert "red-team" in str(e.value) and all(s in str(e.value) for s in SUBSETS)
    with pytest.raises(FileNotFoundError, match=r"helpful-base/train\.jsonl\.gz"):
        load_hh_rlhf(str(root), ["helpful-base"], ["train"], "skip")
    with pytest.raises(FileNotFoundError, match=r"helpful-online"):
        load_hh_rlhf(str(root), ["helpful-online"], ["test"], "skip")
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_hh_rlhf(str(root / "nope"), ["helpful-base"], ["test"], "skip")
    with pytest.raises(ValueError, match="data.splits"):
        load_hh_rlhf(str(root), ["helpful-base"], ["validation"], "skip")
    with pytest.raises(ValueError, match="data.bad_rows"):
        load_hh_rlhf(str(root), ["helpful-base"], ["test"], "warn")


def fake_hub(monkeypatch, fn):
    mod = types.ModuleType("huggingface_hub")
    mod.hf_hub_download = fn
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)


def test_load_from_hub_calls_download(tmp_path, monkeypatch):
    root, calls = hub_dir(tmp_path), []

    def download(**kw):
        calls.append(kw)
        return str(root / kw["filename"])

    fake_hub(monkeypatch, download)
    pairs, _ = load_hh_rlhf(None, ["helpful-base"], ["test"], "error")
    assert len(pairs) == 2
    assert calls == [{"repo_id": "Anthropic/hh-rlhf", "repo_type": "dataset", "filename": "helpful-base/test.jsonl.gz"}]


def test_load_from_hub_network_error(monkeypatch):
    def download(**kw):
        raise ConnectionError("no route to host")

    fake_hub(monkeypatch, download)
    with pytest.raises(RuntimeError) as e:
        load_hh_rlhf(None, ["helpful-base"], ["test"], "skip")
    msg = str(e.value)
    assert "Anthropic/hh-rlhf" in msg and "no route to host" in msg and "data.path=../shared/data/hh-rlhf" in msg


# ---------------------------------------------------------------- split_pairs


def make_pairs(n: int, tag: str = "") -> list[PreferencePair]:
    return [
        PreferencePair(f"\n\nHuman: question {tag}{i}\n\nAssistant:", " a", " b", "s", 1, f"f:{tag}{i}")
        for i in range(n)
    ]


FRACS = {"train": 0.8, "eval": 0.1, "test": 0.1}


def test_split_deterministic_ordered_and_sized():
    pairs = make_pairs(4000)
    a, b = split_pairs(pairs, FRACS, seed=1), split_pairs(list(pairs), dict(FRACS), seed=1)
    assert list(a) == ["train", "eval", "test"] and a == b
    assert sorted(p.source for ps in a.values() for p in ps) == sorted(p.source for p in pairs)
    order = {p.source: i for i, p in enumerate(pairs)}
    for ps in a.values():
        assert [order[p.source] for p in ps] == sorted(order[p.source] for p in ps)
    sizes = {k: len(v) / len(pairs) for k, v in a.items()}
    assert abs(sizes["train"] - 0.8) < 0.03 and abs(sizes["eval"] - 0.1) < 0.02
    assert split_pairs(pairs, FRACS, seed=2) != a


def where(splits: dict[str, list[PreferencePair]]) -> dict[str, str]:
    return {p.source: name for name, ps in splits.items() for p in ps}


def test_split_stable_when_pairs_added_or_removed():
    pairs = make_pairs(1000)
    before = where(split_pairs(pairs, FRACS, seed=0))
    after = where(split_pairs(pairs[::3] + make_pairs(500, tag="new"), FRACS, seed=0))
    assert all(after[s] == before[s] for s in after if not s.startswith("f:new"))
    assert len([s for s in after if s in before]) > 300


def test_split_no_prompt_leakage():
    base = make_pairs(300)
    dup = [PreferencePair(p.prompt, " c", " d", "other", 1, p.source + "dup") for p in base]
    # later turns of the same conversations: prompts that extend the first turn
    deeper = [
        PreferencePair(p.prompt + " a\n\nHuman: and then?\n\nAssistant:", " e", " f", "s", 2, p.source + "deep")
        for p in base
    ]
    for group_by, families in (("conversation", [dup, deeper]), ("prompt", [dup])):
        loc = where(split_pairs(base + dup + deeper, FRACS, seed=3, group_by=group_by))
        for fam in families:
            assert all(loc[p.source] == loc[q.source] for p, q in zip(base, fam))
    assert len(set(loc.values())) == 3
    assert conversation_key(base[0].prompt + " a\n\nHuman: x\n\nAssistant:") == conversation_key(base[0].prompt)


def test_split_fraction_errors():
    for bad in ({"train": 0.8, "test": 0.1}, {"train": 1.2, "test": -0.2}, {}, {"train": "x"}):
        with pytest.raises(ValueError, match="data.split"):
            split_pairs(make_pairs(3), bad, seed=0)
    got = split_pairs(make_pairs(200), {"train": 0.5, "eval": 0.0, "test": 0.5}, seed=0)
    assert got["eval"] == [] and len(got["train"]) + len(got["test"]) == 200


# ---------------------------------------------------------------- data_stats


def test_data_stats():
    pairs = [
        PreferencePair("\n\nHuman: a\n\nAssistant:", " x", " y", "helpful-base", n, f"f:{n}")
        for n in (1, 1, 2, 3, 4, 5, 7)
    ] + [PreferencePair("\n\nHuman: b\n\nAssistant:", " x", " y", "harmless-base", 2, "g:1")]
    splits = {"train": pairs[:5], "test": pairs[5:]}
    rejected = [RejectedRow(f"h:{i}", "identical_pair") for i in range(7)] + [RejectedRow("h:9", "divergent_prompts")]
    st = data_stats(splits, rejected, "skip")
    assert json.loads(json.dumps(st)) == st
    assert st["total_pairs"] == 8
    assert st["by_subset"] == {"helpful-base": 7, "harmless-base": 1}
    assert st["by_split"] == {"train": 5, "test": 3}
    assert st["by_subset_split"] == {"helpful-base": {"train": 5, "test": 2}, "harmless-base": {"train": 0, "test": 1}}
    assert st["by_turns"] == {"1": 2, "2": 2, "3": 1, "4": 1, "5+": 2}
    assert st["by_turns_per_subset"]["harmless-base"] == {"1": 0, "2": 1, "3": 0, "4": 0, "5+": 0}
    assert st["rejected"]["total"] == 8
    assert st["rejected"]["by_reason"]["identical_pair"] == 7 and st["rejected"]["by_reason"]["missing_key"] == 0
    assert st["rejected"]["examples"] == {"identical_pair": [f"h:{i}" for i in range(5)], "divergent_prompts": ["h:9"]}
    assert st["bad_rows"] == "skipped" and data_stats(splits, [], "error")["bad_rows"] == "error"
    with pytest.raises(ValueError, match="data.bad_rows"):
        data_stats(splits, [], "drop")


# ---------------------------------------------------------------- the real test files

README_ROWS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}
README_TURNS = {  # by number of Human turns, counted over all raw rows (../shared/data/README.md)
    "harmless-base": [662, 584, 590, 354, 122],
    "helpful-base": [700, 613, 574, 333, 134],
    "helpful-online": [374, 364, 256, 110, 33],
    "helpful-rejection-sampled": [876, 801, 681, 310, 81],
}


@pytest.fixture(scope="module")
def real():
    if not all((REAL / s / "test.jsonl.gz").is_file() for s in SUBSETS):
        pytest.skip(f"real HH-RLHF test files not found under {REAL}")
    return load_hh_rlhf(str(REAL), list(SUBSETS), ["test"], "skip")


def test_real_counts_match_readme(real):
    pairs, rejected = real
    kept = Counter(p.subset for p in pairs)
    dropped = Counter(next(s for s in SUBSETS if f"/{s}/" in r.source) for r in rejected)
    assert {s: kept[s] + dropped[s] for s in SUBSETS} == README_ROWS
    assert Counter(r.reason for r in rejected) == {"identical_pair": 36, "divergent_prompts": 17}


def test_real_pairs_round_trip_and_turns(real):
    pairs, _ = real
    for s in SUBSETS:
        raw = [json.loads(line) for line in gzip.open(REAL / s / "test.jsonl.gz", "rt", encoding="utf-8")]
        by_line = {int(p.source.rsplit(":", 1)[1]): p for p in pairs if p.subset == s}
        for n, p in by_line.items():
            assert p.prompt + p.chosen == raw[n - 1]["chosen"] and p.prompt + p.rejected == raw[n - 1]["rejected"]
            assert p.n_turns == sum(r == "Human" for r, _ in parse_transcript(p.prompt, p.source))
        # the README's turn table counts every raw row by the Human turns before its last Assistant tag
        turns = Counter()
        for row in raw:
            chosen = row["chosen"]
            prompt = chosen[: chosen.rfind("\n\nAssistant:")]
            turns[min(sum(r == "Human" for r, _ in parse_transcript(prompt, s)), 5)] += 1
        assert [turns[k] for k in range(1, 6)] == README_TURNS[s]


def test_real_error_policy_stops_at_first_bad_row():
    if not (REAL / "harmless-base" / "test.jsonl.gz").is_file():
        pytest.skip(f"real HH-RLHF test files not found under {REAL}")
    with pytest.raises(DataError, match=r"harmless-base/test\.jsonl\.gz:1255: .*divergent_prompts"):
        load_hh_rlhf(str(REAL), ["harmless-base"], ["test"], "error")


def test_real_split_has_no_conversation_leakage(real):
    pairs, rejected = real
    splits = split_pairs(pairs, FRACS, seed=0)
    keys = {name: {conversation_key(p.prompt) for p in ps} for name, ps in splits.items()}
    assert not (keys["train"] & keys["eval"] or keys["train"] & keys["test"] or keys["eval"] & keys["test"])
    st = data_stats(splits, rejected, "skip")
    assert st["total_pairs"] == 8499 and st["rejected"]["total"] == 53
    assert abs(st["by_split"]["train"] / 8499 - 0.8) < 0.02
