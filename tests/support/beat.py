"""Reading what beat on the leader sent (``rec:sent``), and judging the gaps between sends.

The test apps record each send where it is published (``tests/apps/beat_records.py``).
With one entry every ``period`` seconds, a gap between consecutive sends says
what happened around it: under half a period, one period was sent twice;
over one and a half periods outside a crash, a period was skipped.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from dataclasses import dataclass, field

import redis

from celery_stoker.testing import WorkerProcess, wait_for
from support.workers import Fleet


@dataclass(frozen=True)
class Send:
    at: float
    host: str
    pid: int
    id: str
    entry: str | None = None
    thread: str = ""


@dataclass(frozen=True)
class Stop:
    at: float
    host: str
    sig: int


def sends(client: redis.Redis, entry: str | None = None) -> list[Send]:
    """Every recorded send (of ``entry`` only, if given), in time order."""
    out = []
    for d in map(json.loads, client.lrange("rec:sent", 0, -1)):
        send = Send(d["at"], d["host"], d["pid"], d["id"], d.get("entry"), d.get("thread", ""))
        if entry is None or send.entry == entry:
            out.append(send)
    return sorted(out, key=lambda s: s.at)


def live(fleet: Fleet, node: str) -> WorkerProcess:
    """The running process of ``node`` (a restarted worker reuses its name)."""
    return next(w for w in fleet.workers if w.node == node and w.alive())


def fail_over(
    fleet: Fleet,
    client: redis.Redis,
    sig: int,
    *,
    entry: str | None = None,
    wait: float,
    restart: bool = True,
) -> Stop:
    """Stop the leader with ``sig``, wait for three sends by the next leader; restart the old one.

    ``wait`` bounds the wait for the next leader's first send.
    """
    leader = sends(client, entry)[-1].host
    worker = live(fleet, leader)
    stop = Stop(time.time(), leader, sig)
    if sig == signal.SIGKILL:
        worker.sigkill()
    else:
        worker.sigterm()
    first = wait_for(
        lambda: [s for s in sends(client, entry) if s.at > stop.at and s.host != leader],
        wait,
        what=f"a send from a new leader after {signal.Signals(sig).name}",
    )[0]
    # A few sends by the new leader, so its steady rhythm is measured too.
    wait_for(
        lambda: (
            len([s for s in sends(client, entry) if s.host == first.host and s.at >= first.at]) >= 3
        ),
        10,
        what="three sends by the new leader",
    )
    worker.wait_exit(30)
    if restart:
        fleet.start(leader)  # back as a follower
    return stop


@dataclass
class Gaps:
    """The gaps between consecutive sends, by what lay between them."""

    steady: list[float] = field(default_factory=list)
    graceful: list[float] = field(default_factory=list)
    crash: list[float] = field(default_factory=list)

    def twice(self, period: float) -> list[float]:
        """Gaps under half a period: one period sent twice."""
        return [g for g in self.steady + self.graceful + self.crash if g < period / 2]

    def skipped(self, period: float) -> list[float]:
        """Gaps over one and a half periods outside a crash: a period skipped."""
        return [g for g in self.steady + self.graceful if g > 1.5 * period]

    def report(self) -> str:
        def fmt(gaps: list[float]) -> str:
            return ", ".join(f"{g:.3f}" for g in gaps) or "-"

        steady = sorted(self.steady)
        return (
            f"steady gaps: {len(steady)}, min {steady[0]:.3f} s, "
            f"median {steady[len(steady) // 2]:.3f} s, max {steady[-1]:.3f} s; "
            f"clean handovers: {fmt(self.graceful)} s; crashes: {fmt(self.crash)} s"
            if steady
            else f"no steady gaps; clean: {fmt(self.graceful)}; crashes: {fmt(self.crash)}"
        )


def classify(all_sends: list[Send], stops: list[Stop]) -> Gaps:
    """Sort the gaps by what lay between: the same process, or one of ``stops`` (in order).

    Asserts that leadership moved only at a stop, from the stopped worker.
    """
    gaps = Gaps()
    pending = list(stops)
    for a, b in itertools.pairwise(all_sends):
        gap = b.at - a.at
        if a.pid == b.pid:
            gaps.steady.append(gap)
            continue
        assert pending and a.at <= pending[0].at <= b.at and pending[0].host == a.host, (
            f"leadership moved from {a.host} to {b.host} at {b.at:.3f} without a stop: "
            f"{pending[:1]}"
        )
        stop = pending.pop(0)
        (gaps.crash if stop.sig == signal.SIGKILL else gaps.graceful).append(gap)
    assert not pending, f"stops without a new leader's send: {pending}"
    return gaps
