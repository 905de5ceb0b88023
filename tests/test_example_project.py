"""example_project, run as its README says: three ``celery -A example_project worker``.

The commands are the README's (``celery -A example_project worker -n wN@%h -l
info`` from the repository root, ``celery -A example_project stoker status``);
only the broker URL and the two intervals come from the environment, so the
test is quick and uses its own Redis.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.workers import ROOT

from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

_CELERY_BIN = Path(sys.executable).with_name("celery")
CELERY = [str(_CELERY_BIN)] if _CELERY_BIN.exists() else [sys.executable, "-m", "celery"]
STOKER = "example.queue_watch"


def start_worker(name: str, env: dict[str, str], log_dir: Path) -> WorkerProcess:
    """``celery -A example_project worker -n <name>@%h -l info``, as the README says: Celery's
    own pool, concurrency and mingle, run from the repository root."""
    return WorkerProcess(
        f"{name}@%h",
        "example_project",
        env,
        pool=None,
        concurrency=None,
        without_mingle=False,
        celery=CELERY,
        cwd=ROOT,
        log_dir=log_dir,
    ).start()


def status(env: dict[str, str]) -> str:
    """``celery -A example_project stoker status``."""
    out = subprocess.run(
        [*CELERY, "-A", "example_project", "stoker", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "EXAMPLE_BROKER_URL": redis_server.url_for(0),
        "EXAMPLE_CHECK_EVERY": "0.5",
        "EXAMPLE_PURGE_EVERY": "1",
    }


@pytest.fixture
def workers(
    env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[dict[str, WorkerProcess]]:
    """Start ``w1``..``w3`` into the dict; all killed at teardown, their logs shown on failure."""
    started: dict[str, WorkerProcess] = {}
    failed_before = request.session.testsfailed
    yield started
    for worker in started.values():
        worker.cleanup()
    if request.session.testsfailed > failed_before:
        for name, worker in started.items():
            print(f"===== {name} =====\n{worker.log()[-5000:]}")


def summary(client: Any) -> dict[str, Any] | None:
    raw = client.hget("example:queue-depth", "summary")
    return json.loads(raw) if raw else None


def status_row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name + " "))


def test_queue_depths_counts_every_priority_list(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's measurement, on a real Redis broker with messages waiting and no worker."""
    monkeypatch.setenv("EXAMPLE_BROKER_URL", redis_server.url_for(0))
    monkeypatch.syspath_prepend(str(ROOT))
    for module in [m for m in sys.modules if m.split(".")[0] == "example_project"]:
        monkeypatch.delitem(sys.modules, module)
    stokers = importlib.import_module("example_project.stokers")
    app = stokers.app
    try:
        for priority in (0, 0, 9):
            app.send_task("example_project.tasks.build_report", args=["acme"], priority=priority)
        app.send_task("example_project.tasks.purge_expired_reports")
        assert stokers.queue_depths() == {"celery": 1, "reports": 3}
    finally:
        app.pool.force_close_all()


def test_three_workers_one_leader_then_a_handover(
    workers: dict[str, WorkerProcess],
    env: dict[str, str],
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    for name in ("w1", "w2", "w3"):
        workers[name] = start_worker(name, env, tmp_path)
    nodes = {name: worker.node for name, worker in workers.items()}
    first = wait_for(lambda: summary(client), 60, what="the first queue summary")
    leader = first["by"]
    assert set(first["depths"]) == {"celery", "reports"}
    wait_for(
        lambda: all(worker.ready() for worker in workers.values()),
        60,
        what="three workers ready",
    )
    # One leader; the other two follow it.
    row = wait_for(
        lambda: (r := status_row(status(env), STOKER)).count("@") == 3 and r,
        30,
        interval=0.5,
        what="status listing the leader and two followers",
    )
    assert row.split()[1] == leader, row
    elected = [n for n in nodes if f"Stoker {STOKER}: {nodes[n]} became leader" in workers[n].log()]
    assert elected == [leader.split("@")[0]]
    # Beat on the leader sends the periodic task.
    wait_for(lambda: client.get("example:last-purge"), 30, what="a purge sent by beat")

    # Stop the leader as a user would (SIGTERM, like Ctrl-C); another takes over at once.
    name = leader.split("@")[0]
    workers[name].sigterm()
    stopped_at = time.time()
    second = wait_for(
        lambda: (s := summary(client)) and s["by"] != leader and s,
        30,
        what="a summary from a new leader",
    )
    assert second["token"] > first["token"]
    assert second["at"] - stopped_at < 2.0, f"handover took {second['at'] - stopped_at:.2f} s"
    assert workers[name].wait_exit(30) == 0
    assert "became leader" in workers[second["by"].split("@")[0]].log()
    wait_for(
        lambda: (p := client.get("example:last-purge")) and json.loads(p)["at"] > stopped_at,
        30,
        what="beat sending again after the handover",
    )
    row = status_row(status(env), STOKER)
    assert row.split()[1] == second["by"], row
    assert leader not in row
