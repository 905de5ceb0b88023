"""Sphinx configuration of the celery-stoker docs: ``python -m sphinx -W -b html docs <out>``.

The pages are Markdown (MyST), as README.md and BENCHMARKS.md are, so a README
section moves here unchanged and BENCHMARKS.md is included, not copied; the API
reference is autodoc of the public names' docstrings.  No intersphinx: the build
reads nothing from the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# This checkout's package, not whatever ``celery_stoker`` is installed.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))

from celery_stoker import __version__  # noqa: E402

project = "celery-stoker"
author = "the celery-stoker authors"
copyright = "the celery-stoker authors"
release = __version__
version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosectionlabel",
    "stoker_settings",
    "repo_links",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext"]

# ``[text](page.md#a-heading)`` links, as README's own ``(#a-heading)`` ones.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

# Every page title and section is a label, ``{ref}`redis:TLS``` / ``:ref:`redis:TLS```:
# a heading renamed under a reference fails the build.  Two levels: CHANGELOG.md
# repeats its "### Added" under every release.
autosectionlabel_prefix_document = True
autosectionlabel_maxdepth = 2

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"

html_theme = "furo"
html_title = f"celery-stoker {release}"
html_theme_options = {"navigation_with_keys": True}
html_static_path: list[str] = []
