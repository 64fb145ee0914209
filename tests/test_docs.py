"""The documentation: the MkDocs site under docs/ builds strictly (no broken link or anchor, no page
left out of the nav), the README stays a short front page with the two commands CI runs, and the
config page names every key of the typed config schema."""
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignbench.config import Config
from tests.conftest import REPO

DOCS = REPO / "docs"
README_MAX_LINES = 250
COMMANDS = [  # the README's "Two commands", byte for byte; .ci/run runs the second
    "bash scripts/setup.sh && .venv/bin/alignbench run -m experiment=demo && .venv/bin/alignbench report "
    "sweeps/demo --out reports/demo",
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder "
    "--durations=25",
]


def nav_pages(nav) -> list:
    """Every page path in a mkdocs.yml nav (entries are "page.md", {title: "page.md"} or {title: [...]})."""
    if isinstance(nav, str):
        return [] if re.match(r"[a-z]+://", nav) else [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def schema_keys(obj, prefix: str = "") -> list:
    """Dotted keys of every field of a config dataclass instance, nested dataclasses walked."""
    keys = []
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        keys.append(key)
        if dataclasses.is_dataclass(value):
            keys += schema_keys(value, key + ".")
    return keys


def code_identifiers(markdown: str) -> set:
    """Identifiers inside the page's code spans (`stages.pm.lr` gives stages, pm, lr)."""
    spans = re.findall(r"`([^`\n]+)`", markdown)
    return {w for s in spans for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s)}


def test_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]' installs it)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "config" / "index.html").is_file()
    # the figures a page links as ../reports/... are published with the site (scripts/mkdocs_hooks.py)
    assert (tmp_path / "site" / "repo" / "reports" / "synth-frontier" / "frontier.png").is_file()


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    section = re.search(r"^## Two commands\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md lost its '## Two commands' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1).splitlines()
    assert [line for line in block if line and not line.startswith("#")] == COMMANDS
    assert (REPO / ".ci" / "run").read_text().rstrip().splitlines()[-1] == COMMANDS[1]


def test_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)\)", readme))
    assert linked == {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert all((REPO / p).is_file() for p in linked)


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is in the nav twice"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - set(listed) == set(), "pages missing from mkdocs.yml's nav"
    assert set(listed) - pages == set(), "nav entries without a page"


def test_nav_pages_reads_nested_entries():
    nav = ["index.md", {"Guide": ["a.md", {"B": "sub/b.md"}]}, {"Ext": "https://example.org/x.md"}]
    assert nav_pages(nav) == ["index.md", "a.md", "sub/b.md"]


def test_every_config_key_is_documented_on_the_config_page():
    keys = schema_keys(Config())
    assert {"seed", "eval.nlp_seeds", "stages.pm.judgements", "data.synth.rank_k", "model.lora.r"} <= set(keys)
    names = code_identifiers((DOCS / "config.md").read_text())
    missing = [k for k in keys if k.rsplit(".", 1)[-1] not in names]
    assert missing == [], f"config keys not named in a code span of docs/config.md: {missing}"


def test_code_identifiers_reads_only_code_spans():
    assert code_identifiers("the `stages.pm.lr` key and plain words, `a|b`") == {"stages", "pm", "lr", "a", "b"}
