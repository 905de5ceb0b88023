"""Releases that say who they are: one version source, announced by every worker.

No workers here: the version's source, what a worker's heartbeat announces,
and how ``dump()`` / ``celery stoker status`` show a worker of 0.1.0 (which
announced neither its version nor its app) beside newer ones.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
from pathlib import Path

from celery import Celery

import celery_stoker
from celery_stoker import _version, cli, control
from celery_stoker.membership import SCOPE_FIELD, Membership, Scope, announce

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_comes_from_the_package_metadata_and_setup_cfg_is_its_only_literal() -> None:
    assert celery_stoker.__version__ == importlib.metadata.version("celery-stoker")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert re.fullmatch(r"\d+\.\d+\.\d+", config["metadata"]["version"])
    literal = re.compile(r"^\s*__version__\s*=\s*['\"]\d+\.\d+", re.M)
    for path in (ROOT / "celery_stoker").rglob("*.py"):
        assert not literal.search(path.read_text()), f"{path} spells a version of its own"


def test_a_changelog_section_names_the_release_setup_cfg_says() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    version = config["metadata"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{version}] - " in changelog
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{version}]")


def test_heartbeats_carry_the_release_and_a_scope_without_one_is_still_a_member() -> None:
    from celery.worker.state import SOFTWARE_INFO

    saved = dict(SOFTWARE_INFO)
    try:
        announce(Scope("proj", frozenset({"stoker"})))
        sent = SOFTWARE_INFO[SCOPE_FIELD]
    finally:
        SOFTWARE_INFO.clear()
        SOFTWARE_INFO.update(saved)
    assert sent == {"app": "proj", "prefixes": ["stoker"], "version": celery_stoker.__version__}

    fleet = Membership("w1@h", "proj", ["stoker"])
    fleet.change("w2@h", "joined", Scope.of_event_fields(sent))
    # A scope with no version (a release that sent the scope but not its version).
    fleet.change("w3@h", "joined", Scope.of_event_fields({"app": "proj", "prefixes": ["stoker"]}))
    # 0.1.0 sent no scope at all: not told apart from a worker without Stokers.
    fleet.change("old@h", "joined", Scope.of_event_fields(None))
    assert fleet.members("stoker") == {"w1@h", "w2@h", "w3@h"}
    assert Scope.of_event_fields(sent) == Scope("proj", frozenset({"stoker"}))


def _activator(state: str) -> dict[str, object]:
    return {"name": "poller", "state": state, "key_prefix": "stoker", "eligible": True}


def test_status_names_each_workers_release_and_a_0_1_0_worker_as_old() -> None:
    app = Celery("proj", broker="redis://127.0.0.1:9/0")  # never connected
    replies = {
        "new@h": {
            "hostname": "new@h",
            "version": "0.2.0",
            "app": "proj",
            "activators": {"poller": _activator("leader")},
        },
        # What a 0.1.0 worker answers to inspect stoker: no version, no app.
        "old@h": {"hostname": "old@h", "activators": {"poller": _activator("follower")}},
    }
    views = control._worker_views(app, replies, "poller")
    assert views["new@h"]["version"] == "0.2.0" and not views["new@h"]["old_release"]
    assert views["old@h"]["version"] == _version.UNANNOUNCED and views["old@h"]["old_release"]
    line = cli._versions_line([{"name": "poller", "workers": views}])
    assert line.startswith("workers: new@h 0.2.0, old@h 0.1.0 (old: ")
    assert "not counted as a member" in line
