"""Links of the Markdown files the docs include from the repository (BENCHMARKS.md, ...).

Those files are written for the repository: ``[tables](bench/results/x/tables.md)``
points at a file beside them.  Included into a page, such a link would point
nowhere in the built site.  So, as each is read (Sphinx's ``include-read``
event), a link to a file the site also has as a page becomes a link to that
page, and a link to any other repository file becomes its text and the path
(``bench/results/`` in the repository); web links and anchors are kept.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
#: Repository files that are pages of the site (included whole by these pages).
PAGES = {
    "BENCHMARKS.md": "benchmarks.md",
    "CHANGELOG.md": "changelog.md",
    "example_project/README.md": "example.md",
}
# [text](target) outside code spans: the text holds no ], the target no ) or space.
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def rewrite(text: str, source: str) -> str:
    """``text`` of the repository file ``source`` (a path from the root), links fixed."""
    base = posixpath.dirname(source)
    spans = [match.span() for match in CODE_SPAN.finditer(text)]

    def fix(match: re.Match[str]) -> str:
        if any(start <= match.start() < end for start, end in spans):
            return match.group(0)
        label, target = match.group(1), match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        path = posixpath.normpath(posixpath.join(base, path)) + ("/" if path.endswith("/") else "")
        if path in PAGES:
            return f"[{label}]({PAGES[path]}{'#' + anchor if anchor else ''})"
        if path.rstrip("/") in label:
            return f"{label} (in the repository)"
        return f"{label} (`{path}` in the repository)"

    return LINK.sub(fix, text)


def _include_read(app: Any, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    source = (DOCS / relative_path).resolve()
    if DOCS in source.parents:
        return
    content[0] = rewrite(content[0], source.relative_to(ROOT).as_posix())


def setup(app: Any) -> dict[str, Any]:
    app.connect("include-read", _include_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
