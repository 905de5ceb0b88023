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

import json
import re
import signal
import statistics
import time
from collections.abc import Callable

import pytest
from support.beat import classify, fail_over, sends
from support.workers import Fleet

from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.beat_app"
TTL = 1.5
RENEW = TTL / 3
PERIOD = 0.5
#: The stops, in order: clean handovers and crashes, alternating.
STOPS = [signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]


@pytest.fixture
def fleet(fleets: Callable[..., Fleet]) -> Fleet:
    return fleets("prefork", ttl=TTL, app=APP, STOKER_TEST_BEAT_PERIOD=str(PERIOD))


def test_beat_runs_on_the_leader_only_across_handovers_and_crashes(
    fleet: Fleet, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    for i in (1, 2, 3):
        fleet.start(f"w{i}@%h")
    wait_for(lambda: len(sends(client)) >= 3, 40, what="three sends from the first leader")

    stops = [fail_over(fleet, client, sig, wait=TTL + RENEW + 10) for sig in STOPS]

    all_sends = sends(client)
    # Beat runs in the worker's main process, never in a pool child.
    main_pids = {w.pid for w in fleet.workers}
    assert {s.pid for s in all_sends} <= main_pids, "a send came from a pool child"

    gaps = classify(all_sends, stops)
    steady, graceful, crash = gaps.steady, gaps.graceful, gaps.crash
    twice = gaps.twice(PERIOD)
    skipped = gaps.skipped(PERIOD)
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
    """A tick that raises (here: a corrupt schedule key) stops nothing but that beat run.

    It is said once per cause, not at every restart, and the recovery is said too.
    """
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
        # Each cause is said once (the tick's read failed, then each restart's write),
        # and again only at the 2nd, 4th, 8th... failed start.
        wait_for(
            lambda: re.search(r"still failing after \d+ starts \(ResponseError\)", worker.log()),
            20,
            what="beat restarting with backoff",
        )
        assert 1 <= worker.log().count("stopped on ResponseError") <= 2, worker.log()[-3000:]
        during = [s for s in sends(client) if s.at > broken_at + 0.1]
        assert during == [], "beat sent from a schedule it could not read"
        client.delete("redbeat::schedule")
        fixed_at = time.time()
        wait_for(
            lambda: len([s for s in sends(client) if s.at > fixed_at]) >= 2,
            30,
            what="beat sending again once the schedule is readable",
        )
        again = re.search(r"running again after (\d+) failed start", worker.log())
        assert again is not None and int(again.group(1)) >= 2, worker.log()[-3000:]
        assert worker.alive()
        assert "ResponseError" in worker.log()
    finally:
        fleet.cleanup()
