"""Leadership spread over the fleet (issue 25), with real workers and a real Redis.

Each worker runs 6 or 12 recording Stokers (``rec-0`` ...); the tests read who
leads what from the lease keys, and every callback from the records, whose
terms must still be safe (``check_terms_of_each``).  The timeouts of the
waits are generous bounds that tell a bug from a loaded machine, not the
promises (30 s to balance a cold fleet or a join): those are measured by
``bench/balance.py`` and quoted in BENCHMARKS.md.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping

import pytest
from celery import Celery
from support.workers import Fleet, Records, check_terms_of_each
from test_operations import cli

from celery_stoker import drain, undrain
from celery_stoker.keys import lease_key
from celery_stoker.lease import Holder
from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

pytestmark = pytest.mark.workers

TTL = 2.0
TWELVE = [f"rec-{i}" for i in range(12)]
SIX = TWELVE[:6]
#: Heartbeats every second (Celery's default is 2 s): the balancer waits for two of
#: them after the fleet changed, so a short one keeps these tests short.
FAST_HEARTBEAT = ("--heartbeat-interval", "1")
#: Long enough to see a move that should not happen: two heartbeats and a second of
#: settling after a change, then a paced move.
QUIET = 6.0

Holders = dict[str, tuple[str | None, int | None]]


def holders(server: RedisServer, names: list[str]) -> Holders:
    """Each Stoker's (leader, token) as its lease says, (None, None) while none holds it."""
    client = server.client()
    out: Holders = {}
    for name in names:
        raw = client.get(lease_key("stoker", name))
        holder = Holder.parse(raw, None) if raw else None
        out[name] = (holder.hostname, holder.token) if holder else (None, None)
    return out


def counts(led: Holders, nodes: list[str]) -> dict[str, int]:
    """How many Stokers each of ``nodes`` leads (0 included)."""
    found = Counter(host for host, _ in led.values())
    return {node: found.get(node, 0) for node in nodes}


def all_led_within(
    server: RedisServer, names: list[str], nodes: list[str], low: int, high: int
) -> Callable[[], Holders | None]:
    """A predicate: every Stoker led by one of ``nodes``, each leading ``low``..``high``."""

    def check() -> Holders | None:
        led = holders(server, names)
        if any(host not in nodes for host, _ in led.values()):
            return None
        return led if all(low <= n <= high for n in counts(led, nodes).values()) else None

    return check


def watch_moves(server: RedisServer, names: list[str], seconds: float) -> list[tuple[str, str]]:
    """Every change of term seen in ``seconds`` (polled: a moved term lives longer than that)."""
    before = holders(server, names)
    moves = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = holders(server, names)
        for name in names:
            if now[name][1] != before[name][1]:
                moves.append((name, str(now[name][0])))
        before = now
    return moves


def moves_until_quiet(
    server: RedisServer, names: list[str], quiet: float, timeout: float
) -> list[tuple[str, str]]:
    """Every change of term from now until none came for ``quiet`` seconds."""
    moves: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = watch_moves(server, names, quiet)
        moves += seen
        if not seen:
            return moves
    raise AssertionError(f"still moving after {timeout:.0f} s: {moves}")


def stable(led: Holders, weights: Mapping[str, int], may_lead: Mapping[str, list[str]]) -> bool:
    """Nothing can move: no leader is two of a Stoker's weights above a worker that may take it."""
    loads: Counter[str] = Counter()
    for name, (host, _) in led.items():
        loads[str(host)] += weights.get(name, 1)
    return all(
        loads[str(host)] - loads[other] < 2 * weights.get(name, 1)
        for name, (host, _) in led.items()
        for other in may_lead[name]
        if other != host
    )


def cold_fleet(
    fleets: Callable[..., Fleet], redis_server: RedisServer
) -> tuple[Fleet, WorkerProcess, list[WorkerProcess]]:
    """Twelve Stokers from cold: w1 takes every lease, then w2, w3 and w4 start."""
    fleet = fleets("solo", ttl=TTL, STOKER_TEST_STOKERS="12")
    fleet.worker_options["extra_args"] = FAST_HEARTBEAT
    first = fleet.start("w1@%h").wait_ready(60)
    wait_for(all_led_within(redis_server, TWELVE, [first.node], 12, 12), 30, what="w1 leads all")
    others = [fleet.start(f"w{i}@%h") for i in (2, 3, 4)]
    for worker in others:
        worker.wait_ready(60)
    return fleet, first, others


def test_four_workers_and_twelve_stokers_spread_stay_recover_and_share_with_a_fifth(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The issue's fleet: a cold start, 15 quiet seconds, a SIGKILL, a join."""
    fleet, first, others = cold_fleet(fleets, redis_server)
    nodes = [w.node for w in (first, *others)]
    wait_for(all_led_within(redis_server, TWELVE, nodes, 2, 4), 60, 0.1, what="2-4 each")
    moves_until_quiet(redis_server, TWELVE, QUIET, 60)  # the last moves of the spread
    assert all_led_within(redis_server, TWELVE, nodes, 2, 4)()

    # Settled: nothing moves while nothing changes.
    assert watch_moves(redis_server, TWELVE, 15.0) == []
    led = holders(redis_server, TWELVE)
    busiest = max(nodes, key=lambda n: (counts(led, nodes)[n], n))
    fleet.by_node(busiest).sigkill()
    survivors = [n for n in nodes if n != busiest]
    # TTL + renew + 15 s is the promise; the bound is generous for a loaded machine.
    wait_for(
        all_led_within(redis_server, TWELVE, survivors, 3, 5), 60, 0.1, what="3-5 on each survivor"
    )
    moves_until_quiet(redis_server, TWELVE, QUIET, 60)
    assert all_led_within(redis_server, TWELVE, survivors, 3, 5)()

    before = holders(redis_server, TWELVE)
    fifth = fleet.start("w5@%h").wait_ready(60)
    wait_for(
        lambda: counts(holders(redis_server, TWELVE), [fifth.node])[fifth.node] >= 2,
        60,
        0.1,
        what="the fifth worker leads 2",
    )
    moves_until_quiet(redis_server, TWELVE, QUIET, 60)
    after = holders(redis_server, TWELVE)
    moved = [name for name in TWELVE if after[name][1] != before[name][1]]
    assert len(moved) <= 4, (before, after)
    final = counts(after, [*survivors, fifth.node])
    assert all(2 <= n <= 4 for n in final.values()) and final[fifth.node] >= 2, final

    events = records.events()
    check_terms_of_each(events)
    reasons = Counter(r.reason for r in records.of("shutdown", events))
    assert reasons["rebalance"] >= 9 + 3, reasons  # the cold start's moves and the join's
    hooks = [h for h in records.raw("hook") if h.get("reason") == "rebalance"]
    assert hooks, "leader_stopping heard reason rebalance"


def test_eligibility_and_weights_count_where_each_stoker_may_go(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """rec-0 only on w1, rec-1 counts 3: spread as far as it helps, and rec-0 never moves."""
    fleet = fleets(
        "solo",
        ttl=TTL,
        STOKER_TEST_STOKERS="6",
        STOKER_TEST_ONLY="rec-0=w1@*",
        STOKER_TEST_WEIGHTS="rec-1=3",
    )
    fleet.worker_options["extra_args"] = FAST_HEARTBEAT
    w2 = fleet.start("w2@%h").wait_ready(60)
    wait_for(all_led_within(redis_server, SIX[1:], [w2.node], 5, 5), 30, what="w2 leads five")
    w1, w3 = fleet.start("w1@%h"), fleet.start("w3@%h")
    w1.wait_ready(60), w3.wait_ready(60)
    nodes = [w1.node, w2.node, w3.node]
    weights = {"rec-1": 3}
    may_lead = {name: [w1.node] if name == "rec-0" else nodes for name in SIX}

    def balanced() -> Holders | None:
        led = holders(redis_server, SIX)
        return (
            led
            if all(h in nodes for h, _ in led.values()) and stable(led, weights, may_lead)
            else None
        )

    wait_for(balanced, 60, 0.1, what="a stable spread")
    moves_until_quiet(redis_server, SIX, QUIET, 60)
    led = holders(redis_server, SIX)
    assert stable(led, weights, may_lead), led
    assert {host for name, (host, _) in led.items() if name == "rec-0"} == {w1.node}
    assert not [r for r in records.events() if r.name == "rec-0" and r.host != w1.node]
    check_terms_of_each(records.events())


def test_a_drained_worker_is_no_target_and_the_others_share_its_stokers(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    fleet = fleets("solo", ttl=TTL, STOKER_TEST_STOKERS="6")
    fleet.worker_options["extra_args"] = FAST_HEARTBEAT
    workers = [fleet.start(f"w{i}@%h") for i in (1, 2, 3)]
    for worker in workers:
        worker.wait_ready(60)
    nodes = [w.node for w in workers]
    wait_for(all_led_within(redis_server, SIX, nodes, 2, 2), 60, 0.1, what="2 each")
    moves_until_quiet(redis_server, SIX, QUIET, 60)
    operator = Celery("operator", broker=redis_server.url_for(0))
    drained = nodes[2]
    drain(operator, [drained])
    # Its two leave, one to each of the others (a release names the least loaded).
    wait_for(all_led_within(redis_server, SIX, nodes[:2], 3, 3), 30, 0.1, what="3 and 3")
    assert watch_moves(redis_server, SIX, QUIET) == []
    status = cli(fleet, "status")
    assert status.returncode == 0, status.stderr
    assert f"leads: {nodes[0]} 3, {nodes[1]} 3, {drained} 0" in status.stdout, status.stdout

    undrain(operator, [drained])
    wait_for(all_led_within(redis_server, SIX, nodes, 2, 2), 60, 0.1, what="2 each again")
    check_terms_of_each(records.events())


def test_with_balance_off_the_first_to_come_keeps_everything(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """``stoker_balance = False``: no move, and a stop hands all to the longest waiting."""
    fleet = fleets("solo", ttl=TTL, STOKER_TEST_STOKERS="6", STOKER_TEST_BALANCE="0")
    fleet.worker_options["extra_args"] = FAST_HEARTBEAT
    w1 = fleet.start("w1@%h").wait_ready(60)
    wait_for(all_led_within(redis_server, SIX, [w1.node], 6, 6), 30, what="w1 leads all")
    w2 = fleet.start("w2@%h").wait_ready(60)
    wait_for(lambda: "following" in w2.log(), 30, what="w2 follows")
    w3 = fleet.start("w3@%h").wait_ready(60)
    assert watch_moves(redis_server, SIX, QUIET) == []
    w1.stop()
    wait_for(all_led_within(redis_server, SIX, [w2.node], 6, 6), 30, 0.1, what="w2 takes all")
    assert counts(holders(redis_server, SIX), [w3.node]) == {w3.node: 0}
    check_terms_of_each(records.events())


def test_the_giver_and_a_target_killed_in_the_middle_of_spreading(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """SIGKILL of two workers as the first move lands: the survivors take every lease, 6 and 6.

    The giver's leases (one may be half handed over: stepped down, not released)
    expire; the least loaded survivor tries first at each expiry; every term safe.
    A target that dies while the giver lives is ``test_balancer.py``'s
    ``test_a_target_the_release_could_not_reach_...`` (and ``test_waiters.py``).
    """
    _, giver, others = cold_fleet(fleets, redis_server)
    wait_for(
        lambda: any(host != giver.node for host, _ in holders(redis_server, TWELVE).values()),
        60,
        0.002,
        what="the first move",
    )
    giver.sigkill()
    others[0].sigkill()
    survivors = [w.node for w in others[1:]]
    wait_for(all_led_within(redis_server, TWELVE, survivors, 6, 6), 60, 0.1, what="6 and 6")
    moves_until_quiet(redis_server, TWELVE, QUIET, 60)
    assert all_led_within(redis_server, TWELVE, survivors, 6, 6)()
    check_terms_of_each(records.events())


def test_a_stoker_whose_events_never_pause_moves_only_after_its_event(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """Always busy (a 0.4 s event every 0.05 s): still spread, and no event is cut short."""
    fleet = fleets(
        "threads",
        ttl=TTL,
        STOKER_TEST_STOKERS="4",
        STOKER_TEST_TIMER="0.05",
        STOKER_TEST_EVENT_SLEEP="0.4",
    )
    fleet.worker_options.update(extra_args=FAST_HEARTBEAT, concurrency=4)
    four = TWELVE[:4]
    w1 = fleet.start("w1@%h").wait_ready(60)
    wait_for(all_led_within(redis_server, four, [w1.node], 4, 4), 30, what="w1 leads all")
    w2 = fleet.start("w2@%h").wait_ready(60)
    wait_for(all_led_within(redis_server, four, [w1.node, w2.node], 2, 2), 60, 0.1, what="2 and 2")
    events = records.events()
    check_terms_of_each(events)
    moved = [r for r in records.of("shutdown", events) if r.reason == "rebalance"]
    assert len(moved) >= 2
    started = records.raw("started")
    for shutdown in moved:
        term = [r for r in events if r.token == shutdown.token and r.event != "shutdown"]
        began = [s for s in started if s["token"] == shutdown.token]
        assert len(term) == len(began), (shutdown, began, term)  # every event it began, ended
        assert max(r.at for r in term) <= shutdown.started
