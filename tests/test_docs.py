"""The docs site: it builds with warnings as errors, and no internal link of it is broken.

``sphinx-build -W`` runs as a user (or CI) would, in a subprocess, on this
checkout's ``docs/``: a broken cross-reference, a docstring autodoc cannot
parse, or a ``stoker_*`` setting the package reads without a declaration in
``settings_reference.py`` (docs/_ext/stoker_settings.py) fails it.  Then every
``href`` and ``src`` of the built pages is followed: the file must exist inside
the site, and its ``#anchor`` must be an id in it (Sphinx itself checks neither
for Markdown links to another page's heading, nor for what an include brings).

The build takes about 3 s on the project's 2-CPU machine; the other tests here
are pure.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.I)


def _load(name: str) -> ModuleType:
    """A module of docs/_ext (not a package: Sphinx loads it from its path too)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "_ext" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Page(HTMLParser):
    """The ids a page defines and the links (``href``, ``src``) it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is None:
                continue
            if key == "id" or (key == "name" and tag == "a"):
                self.ids.add(value)
            elif key in ("href", "src"):
                self.links.append(value)


def _read(page: Path) -> _Page:
    parsed = _Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    return parsed


def broken_links(site: Path) -> list[str]:
    """Every internal link of the HTML pages under ``site`` that leads nowhere, said why.

    Web links (any ``scheme:``) are not followed; a link that leaves the site
    (``../``, an absolute path) is broken, as is a missing file or anchor.
    """
    site = site.resolve()
    pages: dict[Path, _Page] = {}

    def page(path: Path) -> _Page:
        if path not in pages:
            pages[path] = _read(path)
        return pages[path]

    problems = []
    for source in sorted(site.rglob("*.html")):
        for link in page(source).links:
            if EXTERNAL.match(link):
                continue
            parts = urlsplit(link)
            where = f"{source.relative_to(site)}: {link}"
            if parts.path.startswith("/"):
                problems.append(f"{where} (an absolute path)")
                continue
            target = (source.parent / unquote(parts.path)).resolve() if parts.path else source
            if site != target and site not in target.parents:
                problems.append(f"{where} (outside the site)")
            elif target.is_dir():
                if not (target / "index.html").exists():
                    problems.append(f"{where} (a directory without index.html)")
            elif not target.exists():
                problems.append(f"{where} (no such file)")
            elif (
                parts.fragment
                and target.suffix == ".html"
                and unquote(parts.fragment) not in page(target).ids
            ):
                problems.append(f"{where} (no such anchor)")
    return problems


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs-html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "the docs do not build with warnings as errors (pip install -e '.[test]' brings "
        "sphinx, furo and myst-parser):\n" + result.stderr[-6000:] + result.stdout[-2000:]
    )
    return out


def test_the_docs_build_with_warnings_as_errors_and_every_internal_link_resolves(
    site: Path,
) -> None:
    pages = {p.name for p in site.glob("*.html")}
    for expected in ("index.html", "configuration.html", "api.html", "benchmarks.html"):
        assert expected in pages, sorted(pages)
    assert broken_links(site) == []


def test_the_configuration_page_lists_every_declared_setting(site: Path) -> None:
    from celery_stoker.settings_reference import SETTINGS

    ids = _read(site / "configuration.html").ids
    missing = [s.name for s in SETTINGS if f"confval-{s.name}" not in ids]
    assert missing == []


def test_the_link_checker_finds_a_missing_file_anchor_and_a_way_out(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.html").write_text('<h1 id="there">b</h1><a name="old">')
    (tmp_path / "sub" / "a.html").write_text(
        '<a href="../b.html#there">ok</a> <a href="../b.html#old">ok</a>'
        ' <a href="#self">ok</a> <span id="self"></span> <a href="https://x.org/y">web</a>'
        ' <img src="../b.html"> <a href="mailto:a@b">mail</a>'
        ' <a href="../b.html#nowhere">1</a> <a href="c.html">2</a>'
        ' <a href="../../outside.html">3</a> <a href="/etc/passwd">4</a>'
        ' <a href="#gone">5</a>'
    )
    assert broken_links(tmp_path) == [
        "sub/a.html: ../b.html#nowhere (no such anchor)",
        "sub/a.html: c.html (no such file)",
        "sub/a.html: ../../outside.html (outside the site)",
        "sub/a.html: /etc/passwd (an absolute path)",
        "sub/a.html: #gone (no such anchor)",
    ]


def test_every_setting_the_package_reads_is_declared_for_the_docs() -> None:
    from celery_stoker.settings_reference import SETTINGS

    ext = _load("stoker_settings")
    read = ext.settings_read()
    assert {"stoker_url", "stoker_lease_ttl", "stoker_drain", "stoker_metrics_port"} <= set(read)
    assert ext.undeclared({s.name for s in SETTINGS}) == {}


def test_a_setting_read_without_a_declaration_is_found(tmp_path: Path) -> None:
    package = tmp_path / "celery_stoker"
    package.mkdir()
    (package / "new.py").write_text(
        "def f(conf):\n"
        "    conf.get('stoker_url')\n"
        "    return setting_name(conf, 'stoker_balance'), conf.get('broker_url')\n"
    )
    ext = _load("stoker_settings")
    assert ext.undeclared({"stoker_url"}, package) == {"stoker_balance": ["celery_stoker/new.py:3"]}


def test_links_of_included_repository_files_point_into_the_site() -> None:
    rewrite = _load("repo_links").rewrite
    text = (
        "[`bench/results/`](bench/results/) and [the plot](bench/results/full/failover.png), "
        "[CHANGELOG](CHANGELOG.md#added), [web](https://x.org), [here](#tables), "
        "`[code](kept.md)`, ![image](bench/x.png)"
    )
    assert rewrite(text, "BENCHMARKS.md") == (
        "`bench/results/` (in the repository) and the plot "
        "(`bench/results/full/failover.png` in the repository), "
        "[CHANGELOG](changelog.md#added), [web](https://x.org), [here](#tables), "
        "`[code](kept.md)`, ![image](bench/x.png)"
    )
    assert rewrite("[walk-through](../BENCHMARKS.md)", "example_project/README.md") == (
        "[walk-through](benchmarks.md)"
    )
