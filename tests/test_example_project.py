"""example_project, run as its README says: three ``celery -A example_project worker``.

The commands are the README's (``celery -A example_project worker -n wN@%h -l
info`` from the repository root, ``celery -A example_project stoker status``);
only the broker URL and the two intervals come from the environment, so the
test is quick and uses its own Redis.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.redis_server import RedisServer
from support.workers import ROOT, wait_for

pytestmark = pytest.mark.workers

_CELERY_BIN = Path(sys.executable).with_name("celery")
CELERY = [str(_CELERY_BIN)] if _CELERY_BIN.exists() else [sys.executable, "-m", "celery"]
STOKER = "example.queue_watch"


class UserWorkers:
    """``celery worker`` processes started exactly as the README says, killed at teardown."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.logdir = Path(tempfile.mkdtemp(prefix="stoker-example-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> str:
        with open(self.logdir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [*CELERY, "-A", "example_project", "worker", "-n", f"{name}@%h", "-l", "info"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return f"{name}@{socket.gethostname()}"

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def status(self) -> str:
        out = subprocess.run(
            [*CELERY, "-A", "example_project", "stoker", "status"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def cleanup(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "EXAMPLE_BROKER_URL": redis_server.url_for(0),
        "EXAMPLE_CHECK_EVERY": "0.5",
        "EXAMPLE_PURGE_EVERY": "1",
    }


@pytest.fixture
def workers(env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[UserWorkers]:
    fleet = UserWorkers(env)
    failed_before = request.session.testsfailed
    yield fleet
    fleet.cleanup()
    if request.session.testsfailed > failed_before:
        for name in fleet.procs:
            print(f"===== {name} =====\n{fleet.log(name)[-5000:]}")
    shutil.rmtree(fleet.logdir, ignore_errors=True)


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
    workers: UserWorkers, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    nodes = {name: workers.start(name) for name in ("w1", "w2", "w3")}
    first = wait_for(lambda: summary(client), 60, what="the first queue summary")
    leader = first["by"]
    assert set(first["depths"]) == {"celery", "reports"}
    wait_for(
        lambda: all(f"{node} ready." in workers.log(name) for name, node in nodes.items()),
        60,
        what="three workers ready",
    )
    # One leader; the other two follow it.
    row = wait_for(
        lambda: (r := status_row(workers.status(), STOKER)).count("@") == 3 and r,
        30,
        interval=0.5,
        what="status listing the leader and two followers",
    )
    assert row.split()[1] == leader, row
    elected = [n for n in nodes if f"Stoker {STOKER}: {nodes[n]} became leader" in workers.log(n)]
    assert elected == [leader.split("@")[0]]
    # Beat on the leader sends the periodic task.
    wait_for(lambda: client.get("example:last-purge"), 30, what="a purge sent by beat")

    # Stop the leader as a user would (SIGTERM, like Ctrl-C); another takes over at once.
    name = leader.split("@")[0]
    os.kill(workers.procs[name].pid, signal.SIGTERM)
    stopped_at = time.time()
    second = wait_for(
        lambda: (s := summary(client)) and s["by"] != leader and s,
        30,
        what="a summary from a new leader",
    )
    assert second["token"] > first["token"]
    assert second["at"] - stopped_at < 2.0, f"handover took {second['at'] - stopped_at:.2f} s"
    assert workers.procs[name].wait(30) == 0
    assert "became leader" in workers.log(second["by"].split("@")[0])
    wait_for(
        lambda: (p := client.get("example:last-purge")) and json.loads(p)["at"] > stopped_at,
        30,
        what="beat sending again after the handover",
    )
    row = status_row(workers.status(), STOKER)
    assert row.split()[1] == second["by"], row
    assert leader not in row
