"""MkDocs hooks (mkdocs.yml `hooks:`): publish the repository files that docs pages link to with ``../``.

A page links a committed figure the way GitHub resolves it from ``docs/``, e.g.
``![frontier](../reports/synth-frontier/frontier.png)``. MkDocs only knows the files under ``docs/``,
so ``mkdocs build --strict`` would reject that link; these hooks copy each such file that exists into
the site under ``repo/<path in the repository>`` and point the link there. A link to a file that does
not exist is left alone, so strict mode still fails on it.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

# a Markdown link or image target that climbs out of docs/: "](../reports/demo/x.png"
OUTSIDE = re.compile(r"(?<=\]\()\.\./[^)\s#]+")
PREFIX = "repo"  # site folder of the published repository files


def _repo_path(config, page_uri: str, link: str) -> str | None:
    """The linked file's path in the repository, when the link leaves docs/ and the file exists."""
    root = Path(config.config_file_path).parent
    docs = Path(config.docs_dir).relative_to(root).as_posix()
    target = posixpath.normpath(posixpath.join(docs, posixpath.dirname(page_uri), link))
    if target.startswith("../") or target.startswith(docs + "/") or not (root / target).is_file():
        return None
    return target


def on_files(files, config):
    for page in [f for f in files if f.is_documentation_page()]:
        for link in OUTSIDE.findall(Path(page.abs_src_path).read_text(encoding="utf-8")):
            target = _repo_path(config, page.src_uri, link)
            if target and files.get_file_from_path(f"{PREFIX}/{target}") is None:
                root = Path(config.config_file_path).parent
                files.append(File.generated(config, f"{PREFIX}/{target}", abs_src_path=str(root / target)))
    return files


def on_page_markdown(markdown, page, config, files):
    def relink(m: re.Match) -> str:
        target = _repo_path(config, page.file.src_uri, m.group(0))
        if target is None:
            return m.group(0)
        return posixpath.relpath(f"{PREFIX}/{target}", posixpath.dirname(page.file.src_uri) or ".")

    return OUTSIDE.sub(relink, markdown)
