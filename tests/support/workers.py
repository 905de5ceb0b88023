"""Real ``celery worker`` processes for tests, and readers for what their Stokers recorded.

Each worker runs ``celery -A <app> worker -n <name>`` in its own process group
(so a prefork pool's children die with it), logs to a file the test can show
on failure, and can be stopped with SIGTERM, SIGQUIT or SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or predicate!r}")


@dataclass
class WorkerProcess:
    """One ``celery worker`` process."""

    name: str
    app: str
    env: dict[str, str]
    pool: str = "solo"
    concurrency: int = 2
    extra_args: list[str] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="stoker-w-")))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def node(self) -> str:
        """The worker's node name as it reports it (``%h`` expanded)."""
        import socket

        return self.name.replace("%h", socket.gethostname())

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name.replace('%', '_')}.log"

    def start(self) -> WorkerProcess:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "-n",
            self.name,
            "-P",
            self.pool,
            "-l",
            "info",
            "--without-mingle",
        ]
        if self.pool not in ("solo",):
            args += ["-c", str(self.concurrency)]
        args += self.extra_args
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def sigterm(self) -> None:
        self.signal(signal.SIGTERM)

    def sigkill(self) -> None:
        """Kill the worker and its pool children at once, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Fleet:
    """The workers of one test; all are killed at teardown."""

    def __init__(self, app: str, env: dict[str, str], pool: str = "solo") -> None:
        self.app = app
        self.env = env
        self.pool = pool
        self.workers: list[WorkerProcess] = []

    def start(self, name: str, **overrides: Any) -> WorkerProcess:
        env = {**self.env, **overrides.pop("env", {})}
        worker = WorkerProcess(
            name=name, app=self.app, env=env, pool=overrides.pop("pool", self.pool), **overrides
        ).start()
        self.workers.append(worker)
        return worker

    def by_node(self, node: str) -> WorkerProcess:
        """The worker with that node name, the live one if it was restarted."""
        matches = [w for w in self.workers if w.node == node]
        if not matches:
            raise KeyError(node)
        alive = [w for w in matches if w.alive()]
        return (alive or matches)[-1]

    def logs(self) -> str:
        return "\n".join(f"===== {w.node} =====\n{w.log()[-6000:]}" for w in self.workers)

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.cleanup()


@dataclass(frozen=True)
class Record:
    """One callback as the recorder app logged it."""

    event: str
    host: str
    token: int
    at: float
    reason: Any = None
    members: tuple[str, ...] = ()
    events: int = 0
    started: float = 0.0


class Records:
    """Reads the ``rec:*`` lists the recorder app writes."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def events(self) -> list[Record]:
        out = []
        for raw in self.client.lrange("rec:event", 0, -1):
            d = json.loads(raw)
            out.append(
                Record(
                    event=d["event"],
                    host=d["host"],
                    token=int(d["token"]),
                    at=float(d["at"]),
                    reason=d.get("reason"),
                    members=tuple(d.get("members") or ()),
                    events=int(d.get("events") or 0),
                    started=float(d.get("started") or d["at"]),
                )
            )
        return out

    def of(self, event: str, records: Iterable[Record] | None = None) -> list[Record]:
        return [r for r in (records if records is not None else self.events()) if r.event == event]

    def inits(self) -> list[dict[str, Any]]:
        return self.raw("init")

    def raw(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(f"rec:{kind}", 0, -1)]


def check_terms(records: list[Record]) -> dict[int, list[Record]]:
    """Assert the safety invariants on recorded callbacks; return them grouped by token.

    Every term (token) ran on one host only; terms do not overlap in time
    (a term's first callback comes after the previous term's last one); tokens
    grow from term to term.
    """
    terms: dict[int, list[Record]] = {}
    for record in records:
        terms.setdefault(record.token, []).append(record)
    ordered = sorted(terms.items(), key=lambda kv: min(r.at for r in kv[1]))
    previous: tuple[int, float] | None = None
    for token, items in ordered:
        hosts = {r.host for r in items}
        assert len(hosts) == 1, f"term {token} ran on several hosts: {hosts}"
        by_start = sorted(items, key=lambda r: r.started)
        firsts = [r for r in by_start if r.event == "now_leader"]
        if firsts:
            early = [
                r.event
                for r in by_start
                if r.started < firsts[0].started and not r.event.startswith("hook:")
            ]
            assert not early, f"term {token} ran {early} before now_leader"
        first, last = min(r.at for r in items), max(r.at for r in items)
        if previous is not None:
            prev_token, prev_last = previous
            assert token > prev_token, f"token went backwards: {prev_token} then {token}"
            assert first >= prev_last, (
                f"term {token} began at {first:.3f} before term {prev_token} ended "
                f"at {prev_last:.3f}"
            )
        previous = (token, last)
    return terms
