"""Recycled pools: a prefork pool whose processes are replaced keeps a Stoker's pace.

With ``--max-tasks-per-child 1`` or a low ``worker_max_memory_per_child``,
every pool process exits after a task.  Celery noticed such an exit only at
its pool maintenance, every 5 seconds, when the process was not reapable at
the moment its sentinel closed, and meanwhile wrote the next job to the dead
process: a 0.5 s timer ran every 2.5 s, a clean handover took many seconds,
and the stepping-down leader logged a broker loss that never happened.  See
``celery_stoker/reaping.py``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest
from celery import Celery
from support.workers import Fleet, Records, check_terms

from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

#: How each test recycles its pool processes: worker arguments, and environment.
RECYCLING = {
    "max-tasks-per-child": (("--max-tasks-per-child", "1"), {}),
    "max-memory-per-child": ((), {"STOKER_TEST_MAX_MEMORY_KB": "1"}),
}
TIMER = 0.5
WINDOW = 10.0
#: Timer events expected in WINDOW: 20 at the timer's pace; a process start per event
#: (about 0.1 s on a loaded 2-CPU machine) leaves about 16.  Before the fix: 4 to 8.
MIN_EVENTS = 12
#: A clean handover: about 1 s, plus pool process starts on a loaded machine (2.7 s
#: seen in CI beside another test's workers).  The bug this guards against waited for
#: Celery's pool maintenance, every 5 s, so the bound sits below that and well above
#: load: it tells the two apart, it does not time the handover (bench/pools does).
HANDOVER_BOUND = 4.5
FALSE_BROKER_LOSS = "the broker connection was lost"


@pytest.mark.parametrize("recycling", list(RECYCLING))
def test_a_recycled_pool_keeps_the_timers_pace(
    fleets: Callable[..., Fleet], records: Records, recycling: str
) -> None:
    args, env = RECYCLING[recycling]
    fleet = fleets("prefork", STOKER_TEST_TIMER=str(TIMER), **env)
    w1 = fleet.start("w1@%h", extra_args=args)
    first = wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")[0].started
    wait_for(lambda: time.time() > first + WINDOW, WINDOW + 5, 0.2, what="the window")
    timers = [r for r in records.of("timer") if r.started <= first + WINDOW]
    assert len(timers) >= MIN_EVENTS, (len(timers), w1.log_tail())
    gaps = [b.started - a.started for a, b in itertools.pairwise(timers)]
    assert max(gaps) < 2.5, (gaps, w1.log_tail())  # never one of Celery's 5 s maintenances
    assert "did not finish" not in w1.log(), w1.log_tail()
    check_terms(records.events())


def test_a_clean_handover_between_recycled_pools_is_quick_and_names_no_broker_loss(
    fleets: Callable[..., Fleet], records: Records, redis_server: RedisServer
) -> None:
    args, env = RECYCLING["max-tasks-per-child"]
    fleet = fleets("prefork", STOKER_TEST_TIMER=str(TIMER), **env)
    workers = [fleet.start("w1@%h", extra_args=args)]
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    workers.append(fleet.start("w2@%h", extra_args=args))
    # The user's own short tasks keep both pools recycling, as in production: the new
    # leader's now_leader then meets a pool whose processes come and go.
    app = Celery("feeder", broker=redis_server.url_for(0))
    feeding = threading.Event()
    broker = redis_server.client()

    def feed() -> None:
        while not feeding.is_set():
            if broker.llen("celery") < 2:
                app.send_task("recorder.sleep", args=[0.05])
            feeding.wait(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        took = handovers(records, workers)
    finally:
        feeding.set()
        feeder.join(5)
        app.close()
    assert max(took) < HANDOVER_BOUND, took
    check_terms(records.events())


def handovers(records: Records, workers: list[WorkerProcess]) -> list[float]:
    """SIGTERM the leader twice, once its next event is in the pool: seconds to now_leader."""
    took = []
    since = 0
    for _ in range(2):
        leader_node = records.events()[-1].host
        leader = next(w for w in workers if w.node == leader_node)
        follower = next(w for w in workers if w is not leader)
        joined = {"node": follower.node, "change": "joined"}
        wait_for(
            lambda s=since, j=joined: [
                r for r in records.of("cluster_change", records.events()[s:]) if r.reason == j
            ],
            30,
            what=f"{leader.node} hears {follower.node} join",
        )
        seen = len(records.events())
        wait_for(lambda s=seen: len(records.of("timer", records.events()[s:])) >= 3, 20)
        # Once the next event has been handed to the pool (a timer's interval after the
        # last one started), where a recycled process may hold it.
        last = records.events()[-1].started
        wait_for(lambda t=last: time.time() > t + TIMER + 0.2, 5, 0.01)
        stopped = time.time()
        leader.sigterm()
        first = wait_for(
            lambda f=follower, t=stopped: [
                r for r in records.of("now_leader") if r.host == f.node and r.started > t
            ],
            30,
            what=f"{follower.node} takes over",
        )[0]
        took.append(first.started - stopped)
        assert leader.wait_exit(45) == 0
        log = leader.log(current=True)
        assert FALSE_BROKER_LOSS not in log, log
        assert "ERROR/MainProcess] Stoker" not in log, log
        assert "steps down (worker_stopping)" in log, log
        since = len(records.events())
        leader.start()  # the next round hands back the other way
    return took
