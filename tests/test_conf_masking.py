"""No password of a ``stoker_*`` setting in Celery's own views of the configuration.

Celery masks the settings it knows (``broker_url``, ``*PASSWORD*``...) in
``conf.table()``, ``conf.humanize()``, ``celery inspect conf`` and ``celery report``;
the package makes it mask ours.  The commands run for real: a worker whose
``stoker_url`` holds a password, asked by ``celery inspect conf``, and
``celery report`` in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from celery.app import utils
from support.workers import ROOT, Fleet, Records

from celery_stoker.connection import mask_url
from celery_stoker.settings import install_conf_masking
from celery_stoker.testing import RedisServer, wait_for

SECRET = "s3cret-of-stoker"
URL = f"redis://:{SECRET}@redis.example:6379/2"
SENTINELS = f"sentinel://:{SECRET}@s1:26379;sentinel://:{SECRET}@s2:26379/0"


def app_with(**settings: Any) -> Celery:
    app = Celery("masked", broker="redis://:broker-pw@broker.example:6379/0", set_as_current=False)
    app.conf.update(settings)
    return app


def test_stoker_url_is_masked_in_table_and_humanize() -> None:
    app = app_with(stoker_url=URL, stoker_lease_ttl=4)
    table = app.conf.table()
    assert table["stoker_url"] == mask_url(URL) == "redis://:***@redis.example:6379/2"
    assert table["stoker_lease_ttl"] == 4
    text = app.conf.humanize()
    assert SECRET not in text and mask_url(URL) in text
    assert SECRET not in repr(app.conf.table(with_defaults=True))


def test_a_sentinel_list_and_transport_options_are_masked() -> None:
    app = app_with(
        stoker_url=SENTINELS,
        stoker_transport_options={
            "master_name": "mymaster",
            "password": SECRET,
            "sentinel_kwargs": {"password": SECRET, "socket_timeout": 1},
            "fallbacks": [f"redis://:{SECRET}@r2:6379/0"],
        },
    )
    table = app.conf.table()
    assert SECRET not in repr(table)
    assert table["stoker_url"] == mask_url(SENTINELS)
    options = table["stoker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["socket_timeout"] == 1
    assert options["fallbacks"] == ["redis://:***@r2:6379/0"]


@pytest.mark.parametrize("namespace", ["CELERY", "celery"])
def test_namespaced_settings_are_masked(namespace: str) -> None:
    key = f"{namespace}_STOKER_URL" if namespace.isupper() else f"{namespace}_stoker_url"
    config = type("Config", (), {key: URL})
    app = Celery("namespaced", set_as_current=False)
    app.config_from_object(config, namespace=namespace)
    table = app.conf.table()
    assert table[key] == mask_url(URL)
    assert SECRET not in app.conf.humanize()


def test_celerys_own_settings_are_filtered_as_celery_does() -> None:
    app = app_with(stoker_url=URL, result_backend=f"redis://:{SECRET}@b:6379/1", api_token="t")
    original = utils.filter_hidden_settings.__wrapped__  # type: ignore[attr-defined]
    plain = app.conf.table(censored=False)
    ours, celerys = utils.filter_hidden_settings(plain), original(plain)
    assert {k: v for k, v in ours.items() if k != "stoker_url"} == {
        k: v for k, v in celerys.items() if k != "stoker_url"
    }
    assert celerys["stoker_url"] == URL  # what Celery alone would show
    assert app.conf.table(censored=False)["stoker_url"] == URL  # asked for uncensored: as is


def test_installing_twice_wraps_once() -> None:
    installed = utils.filter_hidden_settings
    install_conf_masking()
    install_conf_masking()
    assert utils.filter_hidden_settings is installed
    assert not getattr(installed.__wrapped__, "stoker_masks", False)  # type: ignore[attr-defined]


def test_importing_the_package_installs_it() -> None:
    code = (
        "from celery.app import utils\n"
        "import celery_stoker\n"
        "print(getattr(utils.filter_hidden_settings, 'stoker_masks', False))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.stdout.strip() == "True", out.stderr


def _celery(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", fleet.app, *args],
        cwd=ROOT,
        env={**os.environ, **fleet.env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.workers
def test_inspect_conf_and_report_show_stoker_url_masked(
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
    records: Records,
) -> None:
    guarded = make_redis_server(password=SECRET)
    fleet = fleets("solo", STOKER_TEST_URL=guarded.url)
    worker = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 60, what="w1 leads through the guarded Redis")

    out = _celery(fleet, "inspect", "conf", "--json", "--timeout", "5", "-d", worker.node)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout
    conf = json.loads(out.stdout)[worker.node]
    assert conf["stoker_url"] == mask_url(guarded.url)
    assert conf["stoker_url"] == f"redis://:***@{guarded.host}:{guarded.port}/0"

    report = _celery(fleet, "report")
    assert report.returncode == 0, report.stderr
    assert SECRET not in report.stdout + report.stderr
    assert f"stoker_url: {mask_url(guarded.url)!r}" in report.stdout
