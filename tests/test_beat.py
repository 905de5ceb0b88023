"""Beat on the leader, with real workers: one 0.5 s entry, repeated failovers, every send counted.

The workers run ``tests/apps/beat_app.py``: ``install(app)`` plus one schedule
entry every ``PERIOD`` seconds.  The process that publishes each run records
it (``rec:sent``), the task records each run (``rec:ran``).  The test stops the
leader again and again, alternately with SIGTERM (a clean handover) and SIGKILL
(a crash), restarts it as a follower, and then counts, over the gaps between
consecutive sends:

* within one term, and across clean handovers: every gap is between half a
  period and one and a half periods (nothing sent twice, nothing skipped);
* across crashes: the gap is at most TTL + renew interval + one period, and
  never under half a period (nothing sent twice within a period).
"""

from __future__ import annotations

import itertools
import json
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from support.workers import Fleet

from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.beat_app"
TTL = 1.5
RENEW = TTL / 3
PERIOD = 0.5
#: The stops, in order: clean handovers and crashes, alternating.
STOPS = [signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]


@dataclass(frozen=True)
class Send:
    at: float
    host: str
    pid: int
    id: str


@dataclass(frozen=True)
class Stop:
    at: float
    host: str
    sig: int


@pytest.fixture
def fleet(fleets: Callable[..., Fleet]) -> Fleet:
    return fleets("prefork", ttl=TTL, app=APP, STOKER_TEST_BEAT_PERIOD=str(PERIOD))


def sends(client: redis.Redis) -> list[Send]:
    raw = client.lrange("rec:sent", 0, -1)
    out = [Send(d["at"], d["host"], d["pid"], d["id"]) for d in map(json.loads, raw)]
    return sorted(out, key=lambda s: s.at)


def live(fleet: Fleet, node: str) -> WorkerProcess:
    """The running process of ``node`` (a restarted worker reuses its name)."""
    return next(w for w in fleet.workers if w.node == node and w.alive())


def fail_over(fleet: Fleet, client: redis.Redis, sig: int) -> Stop:
    """Stop the leader with ``sig``, wait for the next leader's sends, restart the old one."""
    leader = sends(client)[-1].host
    worker = live(fleet, leader)
    stop = Stop(time.time(), leader, sig)
    if sig == signal.SIGKILL:
        worker.sigkill()
    else:
        worker.sigterm()
    first = wait_for(
        lambda: [s for s in sends(client) if s.at > stop.at and s.host != leader],
        TTL + RENEW + 10,
        what=f"a send from a new leader after {signal.Signals(sig).name}",
    )[0]
    # A few sends by the new leader, so its steady rhythm is measured too.
    wait_for(
        lambda: len([s for s in sends(client) if s.host == first.host and s.at >= first.at]) >= 3,
        10,
        what="three sends by the new leader",
    )
    worker.wait_exit(30)
    fleet.start(leader)  # back as a follower
    return stop


def test_beat_runs_on_the_leader_only_across_handovers_and_crashes(
    fleet: Fleet, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    wait_for(lambda: len(sends(client)) >= 3, 40, what="three sends from the first leader")

    stops = [fail_over(fleet, client, sig) for sig in STOPS]

    all_sends = sends(client)
    # Beat runs in the worker's main process, never in a pool child.
    main_pids = {w.pid for w in fleet.workers}
    assert {s.pid for s in all_sends} <= main_pids, "a send came from a pool child"

    steady: list[float] = []
    graceful: list[float] = []
    crash: list[float] = []
    pending = list(stops)
    for a, b in itertools.pairwise(all_sends):
        gap = b.at - a.at
        if a.pid == b.pid:
            steady.append(gap)
            continue
        assert pending and a.at <= pending[0].at <= b.at and pending[0].host == a.host, (
            f"leadership moved from {a.host} to {b.host} at {b.at:.3f} without a stop: "
            f"{pending[:1]}"
        )
        stop = pending.pop(0)
        (crash if stop.sig == signal.SIGKILL else graceful).append(gap)
    assert not pending, f"stops without a new leader's send: {pending}"

    all_gaps = steady + graceful + crash
    twice = [g for g in all_gaps if g < PERIOD / 2]
    skipped = [g for g in steady + graceful if g > 1.5 * PERIOD]
    crash_bound = TTL + RENEW + PERIOD
    crash_over = [g for g in crash if g > crash_bound]

    # Every run that was not lost with a killed worker's prefetched messages ran,
    # and nothing ran that beat did not send.
    sent_ids = {s.id for s in all_sends}
    lost_at_most = 2 * STOPS.count(signal.SIGKILL)  # prefetch of a killed 2-process pool
    ran_ids = wait_for(
        lambda: (
            ids
            if len(ids := {json.loads(r)["id"] for r in client.lrange("rec:ran", 0, -1)} & sent_ids)
            >= len(sent_ids) - lost_at_most
            else None
        ),
        15,
        what="the sent runs to execute",
    )
    ran_all = {json.loads(r)["id"] for r in client.lrange("rec:ran", 0, -1)}

    def fmt(gaps: list[float]) -> str:
        return ", ".join(f"{g:.3f}" for g in gaps) or "-"

    with capsys.disabled():
        print(
            f"\nbeat counts ({len(all_sends)} sends, period {PERIOD} s, TTL {TTL} s, "
            f"renew {RENEW:.2f} s):\n"
            f"  steady gaps:   {len(steady)}, min {min(steady):.3f} s, "
            f"median {statistics.median(steady):.3f} s, max {max(steady):.3f} s\n"
            f"  graceful failovers: {len(graceful)}, gaps {fmt(graceful)} s "
            f"(allowed {PERIOD / 2:.2f}-{1.5 * PERIOD:.2f})\n"
            f"  crash failovers:    {len(crash)}, gaps {fmt(crash)} s "
            f"(allowed {PERIOD / 2:.2f}-{crash_bound:.2f})\n"
            f"  sent twice within half a period: {len(twice)}; skipped (gap > 1.5 periods "
            f"outside crashes): {len(skipped)}; crash gaps over bound: {len(crash_over)}\n"
            f"  executed {len(ran_ids)} of {len(sent_ids)} sent "
            f"(at most {lost_at_most} lost with killed workers); unknown runs: "
            f"{len(ran_all - sent_ids)}"
        )

    assert len(graceful) == STOPS.count(signal.SIGTERM)
    assert len(crash) == STOPS.count(signal.SIGKILL)
    assert not twice, f"sent twice: gaps {twice}"
    assert not skipped, f"skipped a period: gaps {skipped}"
    assert not crash_over, f"crash failover gaps over {crash_bound:.2f} s: {crash_over}"
    assert not ran_all - sent_ids, "a run that beat did not send"


def test_beat_restarts_after_a_failing_tick_and_the_worker_lives_on(
    redis_server: RedisServer,
) -> None:
    """A tick that raises (here: a corrupt schedule key) stops nothing but that beat run."""
    client = redis_server.client()
    fleet = Fleet(
        APP,
        env={"STOKER_TEST_BROKER": redis_server.url_for(0), "STOKER_TEST_TTL": str(TTL)},
        pool="solo",
    )
    try:
        worker = fleet.start("w1@%h")
        wait_for(lambda: len(sends(client)) >= 2, 40, what="beat sending")
        client.set("redbeat::schedule", "not a sorted set")
        broken_at = time.time()
        # Two failed starts in a row: the first tick failed, and so did a restart.
        wait_for(
            lambda: worker.log().count("restarting in") >= 2,
            20,
            what="beat restarting with backoff",
        )
        during = [s for s in sends(client) if s.at > broken_at + 0.1]
        assert during == [], "beat sent from a schedule it could not read"
        client.delete("redbeat::schedule")
        fixed_at = time.time()
        wait_for(
            lambda: len([s for s in sends(client) if s.at > fixed_at]) >= 2,
            30,
            what="beat sending again once the schedule is readable",
        )
        assert worker.alive()
        assert "ResponseError" in worker.log()
    finally:
        fleet.cleanup()
