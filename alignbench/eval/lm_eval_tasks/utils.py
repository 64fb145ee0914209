"""Parsers and lm-eval ``custom_dataset`` loaders for alignbench's local NLP tasks.

This file is loaded in two ways: by lm-eval's YAML loader (``!function utils.load_local`` in the
task YAMLs next to it, imported by file path) and as ``alignbench.eval.lm_eval_tasks.utils``. It
therefore imports nothing from alignbench at module level (the optional ``world_facts`` import is
guarded and done lazily).

Every multiple-choice loader returns documents with one schema, so all MC tasks share one template
(``_local_mc_template_yaml``)::

    {"id": str, "source": "path:line", "context": str, "choices": list[str], "label": int}

lm-eval scores ``context + " " + choice`` (target_delimiter " "), so choices carry no leading space.
Prompts follow lm-eval's built-in templates for the same tasks (arc_easy, arc_challenge, boolq,
copa, piqa, openbookqa, sst2), so numbers are comparable, with one deliberate difference: lm-eval's
COPA choices start with a space *and* get the delimiter (two spaces); ours get one.

Data directory: ``data_dir`` argument (lm-eval passes TaskManager metadata as keyword arguments),
else the env var ``ALIGNBENCH_NLP_DATA``, else ``<repo root>/../shared/data/nlp``.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

ENV_DATA_DIR = "ALIGNBENCH_NLP_DATA"
# alignbench/eval/lm_eval_tasks/utils.py -> parents[3] is the repository root
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "nlp"

# Synthetic items never depend on the run seed: every run of a sweep (and pi0) must see the same
# items in the same order, otherwise paired deltas are meaningless.
SYNTH_DATA_SEED = 1234
N_ARITH_ITEMS = 200


class NLPDataError(ValueError):
    """Bad or missing NLP benchmark data; the message names the file (and line)."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_DIR


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"NLP task data file not found: {path} (pass data_dir=..., or set ${ENV_DATA_DIR}; "
            f"default is {DEFAULT_DATA_DIR})"
        )
    return path


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    with _need(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise NLPDataError(f"{path}:{i}: invalid JSON ({e})") from e
    return out


def _get(rec: dict, key: str, path: Path, line: int):
    try:
        return rec[key]
    except (KeyError, TypeError):
        raise NLPDataError(f"{path}:{line}: missing key {key!r}") from None


def _mc(id_: str, source: str, context: str, choices: Sequence[str], label: int) -> dict:
    if not 0 <= label < len(choices):
        raise NLPDataError(f"{source}: label {label} out of range for {len(choices)} choices")
    return {"id": str(id_), "source": source, "context": context,
            "choices": [str(c) for c in choices], "label": int(label)}


# ---------------------------------------------------------------- parsers (one per file format)

def parse_arc(path: Path) -> list[dict]:
    """AI2 ARC jsonl. Prompt as lm-eval's arc_easy: 'Question: {stem}\\nAnswer:'."""
    docs = []
    for line, r in _read_jsonl(path):
        q = _get(r, "question", path, line)
        stem, choices = _get(q, "stem", path, line), _get(q, "choices", path, line)
        labels = [c["label"] for c in choices]
        key = str(_get(r, "answerKey", path, line)).strip()
        if key not in labels:
            raise NLPDataError(f"{path}:{line}: answerKey {key!r} not among labels {labels}")
        docs.append(_mc(r.get("id", line), f"{path}:{line}", f"Question: {stem}\nAnswer:",
                        [c["text"] for c in choices], labels.index(key)))
    return docs


def _as_bool(v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise NLPDataError(f"{where}: label {v!r} is not a boolean")


def parse_boolq(path: Path) -> list[dict]:
    """BoolQ jsonl (label may be a bool or the string 'true'/'false'). lm-eval's boolq prompt."""
    docs = []
    for line, r in _read_jsonl(path):
        src = f"{path}:{line}"
        label = _as_bool(_get(r, "label", path, line), src)
        ctx = f"{_get(r, 'passage', path, line)}\nQuestion: {_get(r, 'question', path, line)}?\nAnswer:"
        docs.append(_mc(r.get("idx", line), src, ctx, ["no", "yes"], int(label)))
    return docs


def _copa_choice(text: str) -> str:
    return text[0].lower() + text[1:]


def parse_copa(path: Path) -> list[dict]:
    """SuperGLUE COPA jsonl. Prompt as lm-eval's copa: premise without its final period +
    ' because' / ' therefore'; choices with a lower-cased first letter."""
    docs = []
    for line, r in _read_jsonl(path):
        src = f"{path}:{line}"
        kind = _get(r, "question", path, line)
        if kind not in ("cause", "effect"):
            raise NLPDataError(f"{src}: question must be 'cause' or 'effect', got {kind!r}")
        connector = {"cause": "because", "effect": "therefore"}[kind]
        premise = _get(r, "premise", path, line).strip()
        ctx = premise[:-1] + f" {connector}"
        choices = [_copa_choice(_get(r, "choice1", path, line)), _copa_choice(_get(r, "choice2", path, line))]
        docs.append(_mc(r.get("idx", line), src, ctx, choices, int(_get(r, "label", path, line))))
    return docs


def parse_piqa(path: Path, labels_path: Path) -> list[dict]:
    """PIQA valid.jsonl + valid-labels.lst (one 0/1 per line). lm-eval's piqa prompt."""
    recs = _read_jsonl(path)
    with _need(labels_path).open(encoding="utf-8") as fh:
        labels = [ln.strip() for ln in fh if ln.strip()]
    if len(labels) != len(recs):
        raise NLPDataError(f"{labels_path}: {len(labels)} labels but {path} has {len(recs)} records")
    docs = []
    for (line, r), lab in zip(recs, labels):
        if lab not in ("0", "1"):
            raise NLPDataError(f"{labels_path}:{line}: label {lab!r} is not 0/1")
        docs.append(_mc(line - 1, f"{path}:{line}", f"Question: {_get(r, 'goal', path, line)}\nAnswer:",
                        [_get(r, "sol1", path, line), _get(r, "sol2", path, line)], int(lab)))
    return docs


_OBQA_SPLIT = re.compile(r"\(([A-Z])\)\s")


def parse_openbookqa(path: Path) -> list[dict]:
    """OpenBookQA TSV (ID, Question Stem, Choices '(A) .. (B) ..', Complete Question, Answer Key).
    Prompt as lm-eval's openbookqa: the bare question stem."""
    docs = []
    with _need(path).open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0] if rows else []
    if header[:5] != ["ID", "Question Stem", "Choices", "Complete Question", "Answer Key"]:
        raise NLPDataError(f"{path}:1: unexpected header {header}")
    for line, row in enumerate(rows[1:], 2):
        if not row:
            continue
        src = f"{path}:{line}"
        if len(row) != 5:
            raise NLPDataError(f"{src}: expected 5 tab-separated fields, got {len(row)}")
        id_, stem, choices_s, _, key = row
        parts = _OBQA_SPLIT.split(choices_s)
        labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
        if parts[0].strip() or labels != [chr(ord("A") + i) for i in range(len(labels))] or len(labels) < 2:
            raise NLPDataError(f"{src}: cannot parse choices {choices_s!r}")
        key = key.strip()
        if key not in labels:
            raise NLPDataError(f"{src}: answer key {key!r} not among {labels}")
        docs.append(_mc(id_, src, stem, texts, labels.index(key)))
    return docs


def parse_sst2(path: Path) -> list[dict]:
    """GLUE SST-2 dev.tsv (header 'text<TAB>label'; no quoting). lm-eval's sst2 prompt."""
    docs = []
    with _need(path).open(encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if not lines or lines[0].split("\t") != ["text", "label"]:
        raise NLPDataError(f"{path}:1: expected header 'text<TAB>label', got {lines[:1]}")
    for line, s in enumerate(lines[1:], 2):
        if not s.strip():
            continue
        src = f"{path}:{line}"
        text, sep, lab = s.rpartition("\t")
        if not sep or lab.strip() not in ("0", "1"):
            raise NLPDataError(f"{src}: expected 'text<TAB>0|1', got {s[:80]!r}")
        docs.append(_mc(line - 2, src,
                        f"{text}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                        ["negative", "positive"], int(lab)))
    return docs


def parse_gsm8k(path: Path) -> list[dict]:
    """GSM8K jsonl; keeps question/answer (lm-eval's gsm8k fields) and the final number."""
    docs = []
    for line, r in _read_jsonl(path):
        ans = _get(r, "answer", path, line)
        if "####" not in ans:
            raise NLPDataError(f"{path}:{line}: answer has no '####' final answer")
        docs.append({"id": str(line - 1), "source": f"{path}:{line}",
                     "question": _get(r, "question", path, line), "answer": ans,
                     "final": ans.split("####")[-1].strip().replace(",", "")})
    return docs


# ---------------------------------------------------------------- synthetic (hh_synth world) tasks

def hh_context(question: str) -> str:
    """HH dialogue format; lm-eval appends ' ' + choice, so the scored text is ' <answer>'."""
    return f"\n\nHuman: {question}\n\nAssistant:"


def synth_mc_docs(items: Sequence[Sequence[Any]], name: str) -> list[dict]:
    """(question, answer, distractors) triples -> MC docs with the choices shuffled by a fixed,
    per-item seed (independent of the run seed), so the gold answer is not always first."""
    docs = []
    for i, it in enumerate(items):
        try:
            q, a, distractors = it
        except (TypeError, ValueError):
            raise NLPDataError(f"{name}[{i}]: expected (question, answer, distractors), got {it!r}") from None
        choices = [str(a)] + [str(d) for d in distractors if str(d) != str(a)]
        choices = list(dict.fromkeys(choices))  # drop duplicate distractors, keep order
        if len(choices) < 2:
            raise NLPDataError(f"{name}[{i}]: needs at least one distractor different from the answer")
        order = list(range(len(choices)))
        random.Random(f"{SYNTH_DATA_SEED}:{name}:{i}").shuffle(order)
        shuffled = [choices[j] for j in order]
        docs.append(_mc(f"{name}:{i}", f"{name}:{i}", hh_context(str(q)), shuffled, order.index(0)))
    return docs


def arithmetic_items(n: int = N_ARITH_ITEMS, seed: int = SYNTH_DATA_SEED,
                     max_operand: int = 20) -> list[tuple[str, str, list[str]]]:
    """Unique 'What is a + b?' / 'What is a - b?' items (non-negative results) with 3 near-miss
    numeric distractors; deterministic in (n, seed, max_operand)."""
    rng = random.Random(seed)
    seen, items = set(), []
    cap = 2 * (max_operand + 1) ** 2
    while len(items) < min(n, cap):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        ans = a + b if op == "+" else a - b
        pool = [ans + d for d in (-3, -2, -1, 1, 2, 3, 10, -10) if ans + d >= 0]
        distractors = rng.sample(pool, 3)
        items.append((f"What is {a} {op} {b}?", str(ans), [str(d) for d in distractors]))
    return items


def default_world_facts() -> list:
    """``alignbench.data.synth.world_facts()`` if that module exists (guarded import)."""
    try:
        from alignbench.data.synth import world_facts  # type: ignore
    except ImportError as e:
        raise NLPDataError(
            "local_synth_facts needs (question, answer, distractors) items: pass synth_facts=... "
            f"or provide alignbench.data.synth.world_facts() (import failed: {e})"
        ) from e
    return list(world_facts())


# ---------------------------------------------------------------- registry + lm-eval loader

# name -> (files relative to the data dir, parser taking those paths)
FILE_TASKS: dict[str, tuple[tuple[str, ...], Callable[..., list[dict]]]] = {
    "arc_easy": (("arc/ARC-Easy-Test.jsonl",), parse_arc),
    "arc_challenge": (("arc/ARC-Challenge-Test.jsonl",), parse_arc),
    "boolq": (("boolq/val.jsonl",), parse_boolq),
    "copa": (("copa/val.jsonl",), parse_copa),
    "piqa": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), parse_piqa),
    "openbookqa": (("openbookqa/test.tsv",), parse_openbookqa),
    "sst2": (("sst2/dev.tsv",), parse_sst2),
    "gsm8k": (("gsm8k/test.jsonl",), parse_gsm8k),
}
SYNTH_TASKS = ("synth_facts", "synth_arith")


def required_files(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    if name in SYNTH_TASKS:
        return []
    if name not in FILE_TASKS:
        raise KeyError(f"unknown local task {name!r}; known: {sorted(FILE_TASKS) + list(SYNTH_TASKS)}")
    root = resolve_data_dir(data_dir)
    return [root / f for f in FILE_TASKS[name][0]]


def local_docs(name: str, data_dir: str | os.PathLike | None = None,
               synth_facts: Sequence | None = None) -> list[dict]:
    """All documents of local task ``name`` (without the 'local_' prefix), in file order."""
    if name == "synth_facts":
        return synth_mc_docs(synth_facts if synth_facts is not None else default_world_facts(),
                             "synth_facts")
    if name == "synth_arith":
        return synth_mc_docs(arithmetic_items(), "synth_arith")
    paths = required_files(name, data_dir)
    return FILE_TASKS[name][1](*paths)


def load_local(local_name: str, data_dir: str | None = None, synth_facts: Sequence | None = None,
               **_ignored) -> Any:
    """lm-eval ``custom_dataset`` hook: called with the task's metadata (TaskManager metadata:
    data_dir, synth_facts) and its dataset_kwargs (local_name). Returns a DatasetDict({"test"})."""
    import datasets

    docs = local_docs(local_name, data_dir, synth_facts)
    if not docs:
        raise NLPDataError(f"local task {local_name!r} has no documents")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
