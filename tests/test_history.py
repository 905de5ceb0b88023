"""Lost history is noticed and said; commits wait for replicas on request (issue 23, 2 and 3).

Real ``redis-server`` processes and real ``celery worker`` processes running
``tests/apps/recorder.py``.  The Stoker Redis is the one the test restores,
pauses or fails over; the broker and the recorder's records live in a Redis of
their own that is never touched, so what the callbacks did stays readable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.redis_server import RedisServer
from support.workers import ROOT, Fleet, Records, check_terms, wait_for

pytestmark = pytest.mark.workers

TTL = 1.5
LOST_LINE = "Redis holds less history than the fleet has seen"


@pytest.fixture
def record_redis(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    """Broker and records on a server of their own (conftest's ``records`` and ``fleets``)."""
    return make_redis_server()


def events(records: Records) -> list[dict[str, Any]]:
    """Every callback the recorder logged, with its context fields."""
    return records.raw("event")


def status_json(fleet: Fleet) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", fleet.app, "stoker", "status", "--json"],
        cwd=ROOT,
        env={**os.environ, **fleet.env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    views: list[dict[str, Any]] = json.loads(out.stdout)
    return views


def test_a_redis_restored_from_an_older_snapshot_is_noticed_said_and_waited_out(
    redis_server: RedisServer,
    record_redis: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    fleet = fleets(
        ttl=TTL,
        broker=record_redis.url_for(0),
        STOKER_TEST_URL=redis_server.url,
        STOKER_TEST_TIMER="0.1",
    )
    w1 = fleet.start("w1@%h")
    w2 = fleet.start("w2@%h")
    first = wait_for(lambda: records.of("now_leader"), 30, what="a first leader")[0]
    wait_for(
        lambda: len([r for r in records.of("timer") if r.token == first.token]) >= 3,
        15,
        what="timers of the first term",
    )
    old_rdb = redis_server.snapshot(tmp_path / "old.rdb")
    saved_at = time.monotonic()
    counter_at_save = int(redis_server.client().get("stoker:{recorder}:token"))
    assert counter_at_save == first.token

    # The leader stops cleanly; the other worker's term commits more events.
    leader, other = (w1, w2) if first.host == w1.node else (w2, w1)
    leader.stop()
    second = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token],
        30,
        what="the second term",
    )[0]
    assert second.host == other.node
    wait_for(
        lambda: (
            len([r for r in records.of("timer") if r.token == second.token]) >= 5
            and time.monotonic() - saved_at > TTL + 0.3  # the restored lease has expired
        ),
        15,
        what="timers of the second term",
    )
    before = max(r.events for r in records.events() if r.token == second.token)

    redis_server.restart_from(old_rdb)
    restored_at = time.time()
    third = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > second.token],
        30,
        what="a term on the restored Redis",
    )[0]
    wait_for(
        lambda: len([r for r in records.of("timer") if r.token == third.token]) >= 2,
        15,
        what="timers of the restored term",
    )

    # The state did go back (the loss is real), and the new term was told so.
    assert third.events < before
    by_term: dict[int, list[dict[str, Any]]] = {}
    for raw in events(records):
        by_term.setdefault(int(raw["token"]), []).append(raw)
    assert by_term[third.token] and all(e["history_lost"] is True for e in by_term[third.token])
    for token in (first.token, second.token):
        assert all(e["history_lost"] is False for e in by_term[token]), by_term[token]
    # It waited a whole TTL before its first callback (started = when event() began).
    assert third.started - restored_at >= TTL, (
        f"now_leader began {third.started - restored_at:.2f} s after the restore"
    )
    # One WARNING, naming the Stoker, the newest token seen and what Redis held.
    lines = [line for line in other.log().splitlines() if LOST_LINE in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "Stoker recorder" in lines[0]
    assert f"counter was at {counter_at_save}," in lines[0]
    assert f"token {second.token} was seen" in lines[0]
    # status (Redis's view and the leader's own) shows it for that term.
    view = status_json(fleet)[0]
    assert view["token"] == third.token
    assert view["history_lost"] == {"seen": second.token, "held": counter_at_save}
    assert view["workers"][other.node]["history_lost"] == view["history_lost"]
    check_terms(records.events())
    print(
        f"tokens {first.token} -> {second.token} -> {third.token}; state events "
        f"{before} before the restore, {third.events} after; now_leader "
        f"{third.started - restored_at:.2f} s after the restore"
    )
