"""Every Celery pool elects, dispatches and fails over, with a clean log on a clean stop.

The same scenario runs on prefork, solo, threads, gevent and eventlet: a leader
with timer events hears a worker join, hands over on SIGTERM in well under a
second, and its successor's crash (SIGKILL) is taken over within one TTL plus
one renew interval.  A worker that stops cleanly logs no ERROR and no
traceback, and each pool says at start which time limit it cannot enforce.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from support.workers import Fleet, Records, check_terms, heard_join

from celery_stoker.testing import wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
RENEW = TTL / 3
POOLS = ["prefork", "solo", "threads", "gevent", "eventlet"]
#: What each pool says it cannot enforce of soft_time_limit=30 and time_limit=60.
UNENFORCED = {
    "prefork": None,
    "gevent": "cannot enforce soft_time_limit=30;",
    "solo": "cannot enforce soft_time_limit=30 and time_limit=60;",
    "threads": "cannot enforce soft_time_limit=30 and time_limit=60;",
    "eventlet": "cannot enforce soft_time_limit=30 and time_limit=60;",
}


def clean(log: str) -> bool:
    return ": ERROR/" not in log and "Traceback" not in log


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_elects_dispatches_and_fails_over(
    fleets: Callable[..., Fleet], records: Records, pool: str
) -> None:
    fleet = fleets(
        pool,
        STOKER_TEST_TIMER="0.3",
        STOKER_TEST_SOFT_LIMIT="30",
        STOKER_TEST_HARD_LIMIT="60",
    )
    w1 = fleet.start("w1@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0]
    assert first.host == w1.node
    w2 = fleet.start("w2@%h")
    joined = heard_join(records, w2.node)
    assert (joined.host, joined.reason["change"]) == (w1.node, "joined")
    wait_for(lambda: len(records.of("timer")) >= 3, 10, what="timer events")
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")

    stopped_at = time.time()
    w1.sigterm()
    handed = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node], 10, what="w2 leads"
    )[0]
    assert handed.started - stopped_at < 1.0, f"clean stop took {handed.started - stopped_at:.3f}"
    w1.wait_exit(30)
    log = w1.log()
    assert clean(log), log[-3000:]
    expected = UNENFORCED[pool]
    if expected is None:
        assert "cannot enforce" not in log
    else:
        assert f"Stoker recorder: the {pool} pool {expected}" in log

    w3 = fleet.start("w3@%h")
    wait_for(lambda: "following" in w3.log(), 30, what="w3 follows")
    killed_at = time.time()
    w2.sigkill()
    crashed = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w3.node], 10, what="w3 leads"
    )[0]
    assert crashed.started - killed_at <= TTL + RENEW
    check_terms(records.events())
