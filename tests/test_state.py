"""The stored state, with real workers and a real Redis: unreadable states, and its cost.

An unreadable state (written with another serializer, or foreign bytes) is said
once, left as it is, and the event is sent again with backoff until the key is
fixed or removed, at a term's first event, mid-term and after a failover;
``celery stoker status`` shows it meanwhile.  An event costs one read and one
write of the state in Redis, and a leader cut off from Redis still runs
``shutdown`` from the last state it committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from support.tcp_proxy import TcpProxy
from support.workers import (
    Fleet,
    Records,
    check_terms,
    heard_join,
    shutdown_after_cut,
    status_views,
)

from celery_stoker.lanes import STATE_RETRY_START
from celery_stoker.testing import RedisServer, wait_for

pytestmark = pytest.mark.workers

APP = "tests.apps.recorder"
STATE_KEY = "stoker:{recorder}:state"
#: A state the recorder can read, as the json serializer writes it.
JSON_STATE = {
    b"body": b'{"events": 7, "timers": 0}',
    b"content_type": b"application/json",
    b"content_encoding": b"utf-8",
    b"token": b"1",
    b"version": b"3",
}
#: A state as the yaml serializer writes it.
YAML_STATE = {
    b"body": b"{events: 40, timers: 0}\n",
    b"content_type": b"application/x-yaml",
    b"content_encoding": b"utf-8",
    b"token": b"1",
    b"version": b"3",
}
#: Foreign bytes under the yaml content type: no serializer reads them.
GARBAGE = {b"body": b"{unclosed: [1, 2", b"content_type": b"application/x-yaml"}


def replace_state(client: Any, fields: dict[bytes, bytes]) -> None:
    """Replace the state hash at once (MULTI): no event sees it missing in between."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(STATE_KEY)
    pipe.hset(STATE_KEY, mapping=fields)
    pipe.execute()


def status_json(env: dict[str, str]) -> dict[str, Any]:
    """``celery stoker status --json`` as a user runs it: the recorder's view."""
    return next(v for v in status_views(APP, env, "--timeout", "2") if v["name"] == "recorder")


def worker_view(env: dict[str, str], node: str) -> dict[str, Any]:
    view: dict[str, Any] = status_json(env)["workers"].get(node) or {}
    return view


def unreadable_errors(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "ERROR" in line and STATE_KEY in line and "cannot be read" in line
    ]


def wait_retrying(env: dict[str, str], node: str, retries: int) -> dict[str, Any]:
    """Wait until ``status`` shows ``node`` retrying an unreadable state ``retries`` times."""
    view: dict[str, Any] = wait_for(
        lambda: (v := worker_view(env, node)).get("state_retries", 0) >= retries and v,
        STATE_RETRY_START * 2**retries + 30,
        interval=0.5,
        what=f"{retries} retries of the unreadable state in status",
    )
    return view


def check_status_says_unreadable(view: dict[str, Any]) -> float:
    """The worker's health names the unreadable state; returns since when (a timestamp)."""
    health = view["health"]
    assert health["status"] == "error", view
    assert health["error"].startswith("state unreadable: "), health
    assert STATE_KEY in health["error"]
    assert view["state_error"] and view["state_error_since"] == health["since"]
    return datetime.fromisoformat(health["since"]).timestamp()


def check_backoff(view: dict[str, Any], since: float) -> None:
    """Retries back off (1, 2, 4 ... s), never a hot loop: few tries for the time spent."""
    retries = view["state_retries"]
    elapsed = time.time() - since
    # After n tries the first try is at least 1 + 2 + ... + 2**(n-2) s old.
    assert elapsed >= STATE_RETRY_START * (2 ** (retries - 1) - 1) - 0.5, (retries, elapsed)
    assert retries <= 2 + elapsed, (retries, elapsed)


def test_a_term_that_starts_on_an_unreadable_state_retries_until_the_key_is_deleted(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """A deploy switched the serializer under a stored state: said once, kept, retried."""
    client = redis_server.client()
    client.hset(STATE_KEY, mapping=JSON_STATE)
    fleet = fleets("prefork", STOKER_TEST_STATE_SERIALIZER="yaml", STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    first = wait_for(lambda: unreadable_errors(w1.log()), 30, what="the ERROR")[0]
    assert "stoker_state_serializer = 'yaml'" in first
    assert "written with 'json'" in first
    assert "set stoker_state_serializer = 'json'" in first and "delete the key" in first

    view = wait_retrying(fleet.env, w1.node, 3)
    since = check_status_says_unreadable(view)
    check_backoff(view, since)
    assert records.events() == [], "a callback ran on a state it could not read"
    assert client.hgetall(STATE_KEY) == JSON_STATE, "the unreadable state was touched"
    assert len(unreadable_errors(w1.log())) == 1, "said more than once"

    interval = STATE_RETRY_START * 2 ** view["state_retries"]
    client.delete(STATE_KEY)
    deleted_at = time.time()
    resumed = wait_for(lambda: records.of("now_leader"), interval + 15, what="now_leader")[0]
    assert resumed.started - deleted_at <= interval + 1.5
    assert resumed.events == 0 and records.inits(), "it did not start from init()"
    wait_for(lambda: len(records.of("timer")) >= 2, 15, what="timers after the fix")
    wait_for(
        lambda: worker_view(fleet.env, w1.node)["health"]["status"] == "ok",
        15,
        what="health ok again",
    )
    assert "its stored state can be read again" in w1.log()
    assert len(unreadable_errors(w1.log())) == 1


def test_a_state_replaced_mid_term_pauses_the_stoker_until_it_is_fixed(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The key overwritten under a running term: one ERROR, no callback, then it resumes."""
    client = redis_server.client()
    fleet = fleets("solo", STOKER_TEST_STATE_SERIALIZER="yaml", STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers")
    replace_state(client, JSON_STATE)  # another serializer's state
    replaced_at = time.time()
    wait_for(lambda: unreadable_errors(w1.log()), 15, what="the ERROR")
    view = wait_retrying(fleet.env, w1.node, 3)
    check_status_says_unreadable(view)
    check_backoff(view, datetime.fromisoformat(view["state_error_since"]).timestamp())
    # No callback ran on it (one may have been running when the key was replaced).
    assert not [r for r in records.events() if r.started > replaced_at + 0.5]
    assert client.hgetall(STATE_KEY) == JSON_STATE
    assert len(unreadable_errors(w1.log())) == 1, "said once per retry, not once"

    # Fixed in place (rewritten as the configured serializer writes it): it resumes from it.
    interval = STATE_RETRY_START * 2 ** view["state_retries"]
    replace_state(client, YAML_STATE)
    fixed_at = time.time()
    resumed = wait_for(
        lambda: [r for r in records.events() if r.started > fixed_at],
        interval + 15,
        what="events after the fix",
    )[0]
    assert resumed.started - fixed_at <= interval + 1.5
    assert resumed.event == "timer" and resumed.events == 40, "not from the fixed state"
    wait_for(lambda: len([r for r in records.events() if r.at > fixed_at]) >= 3, 15, what="more")
    assert len(unreadable_errors(w1.log())) == 1
    check_terms(records.events())


def test_a_failover_onto_garbage_retries_until_the_key_is_deleted(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The new leader's first event finds foreign bytes: it retries instead of idling."""
    client = redis_server.client()
    fleet = fleets("solo", STOKER_TEST_STATE_SERIALIZER="yaml")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    heard_join(records, w2.node)
    replace_state(client, GARBAGE)
    w1.sigkill()
    wait_for(lambda: unreadable_errors(w2.log()), 30, what="w2's ERROR")
    assert "does not decode" in unreadable_errors(w2.log())[0]
    view = wait_retrying(fleet.env, w2.node, 2)
    check_status_says_unreadable(view)
    assert not [r for r in records.events() if r.host == w2.node]
    assert client.hgetall(STATE_KEY) == GARBAGE

    interval = STATE_RETRY_START * 2 ** view["state_retries"]
    client.delete(STATE_KEY)
    deleted_at = time.time()
    resumed = wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node],
        interval + 15,
        what="w2's now_leader",
    )[0]
    assert resumed.started - deleted_at <= interval + 1.5
    assert resumed.events == 0, "it did not start from init()"
    assert len(unreadable_errors(w2.log())) == 1
    check_terms(records.events())


def net_bytes(server: RedisServer) -> tuple[int, int]:
    stats = server.client().info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def test_an_event_costs_one_read_and_one_write_of_a_large_state(
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
    records: Records,
) -> None:
    """No copy of the state in the report: per event, ~1x the state into Redis and ~1x out."""
    size = 3 * 1024 * 1024
    store = make_redis_server()  # the Stoker's Redis alone: no broker traffic in its counters
    fleet = fleets(
        "prefork",
        STOKER_TEST_URL=store.url_for(0),
        STOKER_TEST_TIMER="0.3",
        STOKER_TEST_STATE_BYTES=str(size),
    )
    fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 60, what="timers")

    def after_next_event() -> tuple[int, tuple[int, int]]:
        """Counters read just as an event starts (each sample in the same phase)."""
        seen = len(records.events())
        wait_for(lambda: len(records.events()) > seen, 30, interval=0.005, what="an event")
        return len(records.events()), net_bytes(store)

    first, before = after_next_event()
    for _ in range(6):
        last, after = after_next_event()
    events = last - first
    into = (after[0] - before[0]) / events / size
    out_of = (after[1] - before[1]) / events / size
    # The commit writes it once, the event's read reads it once; the rest (term check,
    # renewals, the report) is small.  With a copy in the report it was ~2.3x each way.
    assert 0.95 < into < 1.2, f"{into:.2f}x the state into Redis per event"
    assert 0.95 < out_of < 1.2, f"{out_of:.2f}x the state out of Redis per event"


def test_a_leader_cut_off_from_redis_runs_shutdown_from_its_last_committed_state(
    redis_server: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    """Prefork: the pool processes commit, the main process runs shutdown from their copy."""
    proxy = tcp_proxy(redis_server.port)
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_BROKER": f"redis://127.0.0.1:{proxy.port}/0"})
    wait_for(lambda: len(records.of("timer")) >= 5, 30, what="timers on w1")
    proxy.blackhole()
    shutdown_after_cut(records, w1.node, least=5, timeout=15)
    proxy.heal()
