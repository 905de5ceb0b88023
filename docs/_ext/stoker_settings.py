"""The ``stoker-settings`` directive: the configuration reference, from the code.

It renders ``celery_stoker.settings_reference.SETTINGS`` (what each setting
takes, its default, what it does, written with ``settings.py``'s own constants)
as a summary table and one ``confval`` entry per setting, so pages link to a
setting with ``{confval}`stoker_lease_ttl```.

So that the page cannot fall behind the code, the directive also reads the
package's source: any ``stoker_*`` setting it reads (``conf.get("stoker_x")``,
``setting_name(conf, "stoker_x")``) without a declaration is a warning, which
the docs build (``-W``) turns into an error naming the file and line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

PACKAGE = Path(__file__).resolve().parents[2] / "celery_stoker"
logger = logging.getLogger(__name__)


def settings_read(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Every ``stoker_*`` setting name the package's source reads, with where (file:line).

    A read is ``<anything>.get("stoker_...")`` or ``setting_name(conf, "stoker_...")``:
    the two ways the package looks a setting up.
    """
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            position = {"get": 0, "setting_name": 1}.get(callee)
            if position is None or len(node.args) <= position:
                continue
            arg = node.args[position]
            value = arg.value if isinstance(arg, ast.Constant) else None
            if isinstance(value, str) and value.startswith("stoker_"):
                where = f"{path.relative_to(package.parent)}:{node.lineno}"
                found.setdefault(value, []).append(where)
    return found


def undeclared(declared: set[str], package: Path = PACKAGE) -> dict[str, list[str]]:
    """The settings the package reads that ``SETTINGS`` does not declare."""
    return {name: where for name, where in settings_read(package).items() if name not in declared}


def _entry(setting: Any) -> list[str]:
    lines = [
        f".. confval:: {setting.name}",
        f"   :type: {setting.accepts}",
        f"   :default: {setting.default}",
        "",
        f"   {setting.doc}",
    ]
    if setting.overridable:
        key = setting.name.removeprefix("stoker_")
        lines += ["", f"   A Stoker may override it: ``@stoker(app, {key}=...)``."]
    if setting.see:
        lines += ["", f"   See :ref:`{setting.see}`."]
    return [*lines, ""]


class StokerSettingsDirective(SphinxDirective):
    """``{stoker-settings}``: the table and entries of every declared ``stoker_*`` setting."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from celery_stoker.settings_reference import SETTINGS, Setting

        names = [setting.name for setting in SETTINGS]
        for name in sorted({n for n in names if names.count(n) > 1}):
            logger.warning(
                "setting %s is declared twice in SETTINGS", name, location=self.get_location()
            )
        for name, where in sorted(undeclared(set(names)).items()):
            logger.warning(
                "the package reads setting %s (%s) but celery_stoker/settings_reference.py "
                "declares no Setting for it: add one there",
                name,
                ", ".join(where),
                location=self.get_location(),
            )
        here = self.get_source_info()
        table = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 30 40 30",
            "",
            "   * - setting",
            "     - takes",
            "     - default",
        ]
        for setting in SETTINGS:
            table += [
                f"   * - :confval:`{setting.name}`",
                f"     - {setting.accepts}",
                f"     - {setting.default}",
            ]
        content = StringList([*table, ""], items=[here] * (len(table) + 1))
        # Each entry's lines point at its declaration, so a warning names that line.
        reference = Path(sys.modules[Setting.__module__].__file__ or "")
        source = reference.read_text().splitlines()
        for setting in SETTINGS:
            line = next((i for i, text in enumerate(source) if f'"{setting.name}",' in text), 0)
            entry = _entry(setting)
            content.extend(StringList(entry, items=[(str(reference), line)] * len(entry)))
        container = nodes.container()
        self.state.nested_parse(content, self.content_offset, container)
        return list(container.children)


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("stoker-settings", StokerSettingsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
