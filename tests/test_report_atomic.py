"""A report directory is replaced whole: a build that fails at any point, or is killed between its
two renames, leaves the previous report byte for byte; files the build does not write stay."""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matplotlib.figure import Figure

from alignbench.report import atomic
from alignbench.report.build import build_report
from tests.test_report_views import make_sweep


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    sweep = make_sweep(root / "sweep")
    out = root / "report"
    build_report(sweep, out, n_boot=50)
    (out / "NOTES.md").write_text("kept by hand\n")  # not the build's
    (out / "sub").mkdir()
    (out / "sub" / "report.md").write_text("# a companion report\n")
    return sweep, out


class Boom(Exception):
    pass


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(failing=st.integers(0, 14))
def test_a_build_that_fails_anywhere_leaves_the_old_report(built, monkeypatch, failing):
    """The build raises at its ``failing``-th write of a file (a figure or a table), or after all of
    them: the previous report is untouched and no temporary directory is left beside it."""
    sweep, out = built
    before = _snapshot(out)
    calls = {"n": 0}
    save = Figure.savefig

    def flaky(fig, path, *a, **k):
        calls["n"] += 1
        if calls["n"] > failing:
            raise Boom(path)
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", flaky)
    try:
        build_report(sweep, out, n_boot=50)
    except Boom:
        assert _snapshot(out) == before
    else:  # fewer figures than ``failing``: the build finished, the hand-kept files survived
        assert (out / "NOTES.md").read_text() == "kept by hand\n" and (out / "sub" / "report.md").exists()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".report")) == []


def test_a_build_killed_between_its_renames_is_recovered_by_the_next(built, tmp_path):
    sweep, out = built
    copy = tmp_path / "report"
    os.system(f"cp -a {out} {copy}")
    before = _snapshot(copy)
    os.replace(copy, tmp_path / ".report.old")  # the state between the two renames: no report, old aside
    atomic.recover(copy)
    assert _snapshot(copy) == before and not (tmp_path / ".report.old").exists()
    md = build_report(sweep, copy, n_boot=50)
    assert md == copy / "report.md" and "(sub/report.md)" in md.read_text()  # the companion, linked
    assert (copy / "NOTES.md").read_text() == "kept by hand\n"
    assert (copy / "sub" / "report.md").read_text() == "# a companion report\n"
