"""Bad input files, generated (issue 24 §2): HH files, hh_synth's gold parser on any text, and the
sweep files ``alignbench report`` reads. Each input either works or is one line naming the file
(and line, or entry): never a traceback, never a partial write."""
import gzip
import json
import math

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignbench.cli import main
from alignbench.data.hh import load_hh_rlhf
from alignbench.data.synth.gold import gold_parts, gold_reward, parse_task
from alignbench.data.types import DataError
from alignbench.report.build import build_report
from tests.test_report_views import make_sweep

GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
# one bad row of each kind the issue lists, as raw bytes of one line
BAD_ROWS = {
    "invalid_json": b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": ',
    "missing_field": json.dumps({"chosen": GOOD["chosen"]}).encode(),
    "not_a_string": json.dumps({"chosen": 3, "rejected": GOOD["rejected"]}).encode(),
    "not_an_object": b"[1, 2]",
    "different_prompts": json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                     "rejected": "\n\nHuman: bye\n\nAssistant: b"}).encode(),
    "empty_dialogue": json.dumps({"chosen": "", "rejected": ""}).encode(),
    "no_assistant_turn": json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}).encode(),
    "not_utf8": b'{"chosen": "\xff\xfe", "rejected": "x"}',
}
counts = {"hh_files": 0, "gold_texts": 0, "sweeps": 0}  # inputs tried per family (printed at the end)


def _one_line_naming(error: Exception, path) -> bool:
    return "\n" not in str(error) and str(path) in str(error)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(st.just("good"), st.sampled_from(sorted(BAD_ROWS))), min_size=0, max_size=8),
       gz=st.booleans(), cut=st.one_of(st.none(), st.floats(0.05, 0.95)), policy=st.sampled_from(["error", "skip"]))
def test_any_hh_file_loads_or_is_one_line_naming_file_and_line(tmp_path_factory, rows, gz, cut, policy):
    root = tmp_path_factory.mktemp("hh")
    (root / "helpful-base").mkdir()
    body = b"".join((json.dumps(GOOD).encode() if r == "good" else BAD_ROWS[r]) + b"\n" for r in rows)
    data = gzip.compress(body, mtime=0) if gz else body
    if cut is not None and gz:  # a truncated download
        data = data[:max(1, int(len(data) * cut))]
    path = root / "helpful-base" / ("test.jsonl.gz" if gz else "test.jsonl")
    path.write_bytes(data)
    counts["hh_files"] += 1
    try:
        pairs, rejected = load_hh_rlhf(str(root), ["helpful-base"], ["test"], policy)
    except DataError as e:
        assert _one_line_naming(e, path), str(e)
        assert f"{path}:" in str(e)  # file:line
        return
    assert len(pairs) + len(rejected) == len(rows) or (cut is not None and gz)
    if policy == "error":
        assert not rejected


@settings(max_examples=300, deadline=None)
@given(prompt=st.one_of(st.text(max_size=300), st.builds(lambda a, b: f"\n\nHuman: {a}\n\nAssistant:{b}",
                                                         st.text(max_size=120), st.text(max_size=40))),
       response=st.text(max_size=300))
def test_the_gold_parser_takes_any_text(prompt, response):
    """hh_synth's gold reward (the judge of every synthetic study) on arbitrary text: a finite
    score in its range, its parts consistent, never an exception."""
    counts["gold_texts"] += 1
    parse_task(prompt)
    score = gold_reward(prompt, response)
    assert math.isfinite(score) and -11 <= score <= 2.3
    assert gold_parts(prompt, response) is not None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("sweep") / "s")


INDEX_DAMAGE = ["truncated", "not_json", "not_utf8", "a_list", "runs_not_a_list", "entry_not_an_object",
                "seed_not_an_integer", "dir_not_a_path", "missing"]
RESULTS_DAMAGE = ["drop_column", "nan_value", "truncated", "unfinished", "failed", "garbage_bytes", "empty"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.one_of(st.none(), st.sampled_from(INDEX_DAMAGE)),
       results=st.lists(st.sampled_from(RESULTS_DAMAGE), max_size=3), which=st.integers(0, 20),
       column=st.sampled_from(["config", "value", "metric", "evaluator", "seed", "method", "n"]))
def test_report_on_any_damaged_sweep_works_or_is_one_line(sweep, tmp_path_factory, index, results, which, column):
    """A copy of a good sweep with its index.json or some runs' files damaged: the report is built
    (damaged runs marked) or the command answers one line, exit 2, and writes nothing."""
    import shutil
    work = tmp_path_factory.mktemp("damaged")
    s = shutil.copytree(sweep, work / "s")
    idx = s / "index.json"
    text = idx.read_text()
    entries = json.loads(text)["runs"]
    damage = {
        "truncated": lambda: idx.write_text(text[:len(text) // 2]),
        "not_json": lambda: idx.write_text("runs: [1, 2]"),
        "not_utf8": lambda: idx.write_bytes(b"\xff\xfe{}"),
        "a_list": lambda: idx.write_text("[]"),
        "runs_not_a_list": lambda: idx.write_text(json.dumps({"runs": {"a": 1}})),
        "entry_not_an_object": lambda: idx.write_text(json.dumps({"runs": [*entries, "dpo_s0"]})),
        "seed_not_an_integer": lambda: idx.write_text(json.dumps({"runs": [{**entries[0], "seed": "zero"}]})),
        "dir_not_a_path": lambda: idx.write_text(json.dumps({"runs": [{**entries[0], "dir": 5}]})),
        "missing": lambda: idx.unlink(),
    }
    if index:
        damage[index]()
    runs = sorted(p for p in (s / "runs").iterdir() if p.is_dir())
    for i, kind in enumerate(results):
        run = runs[(which + i) % len(runs)]
        csv = run / "results.csv"
        if kind == "drop_column" and csv.exists():
            pd.read_csv(csv, dtype=str, keep_default_na=False).drop(columns=[column], errors="ignore").to_csv(csv, index=False)
        elif kind == "nan_value" and csv.exists():
            df = pd.read_csv(csv, dtype=str, keep_default_na=False)
            df.loc[which % len(df), column] = "nan"
            df.to_csv(csv, index=False)
        elif kind == "truncated" and csv.exists():
            csv.write_bytes(csv.read_bytes()[:which * 37])
        elif kind == "unfinished":
            (run / "DONE").unlink(missing_ok=True)
        elif kind == "failed":
            (run / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
        elif kind == "garbage_bytes":
            csv.write_bytes(b"\x00\xff\xfe,\n\"unterminated")
        elif kind == "empty":
            csv.write_text("")
    counts["sweeps"] += 1
    out = work / "report"
    rc = main(["report", str(s), "--out", str(out)])
    if rc == 0:
        assert (out / "report.md").exists() and (out / "results.csv").exists()
    else:
        assert rc == 2 and not out.exists()  # nothing written


def test_report_on_a_folder_that_is_not_a_sweep_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignbench: error: ") and "index.json" in err[0]
    assert not (tmp_path / "out").exists()


def test_counts_of_inputs_tried():
    """Runs last in its module: how many inputs each family tried (for the closing note)."""
    print(f"\nbad-input files tried: {counts}")
    assert all(v > 0 for v in counts.values()) or not any(counts.values())
