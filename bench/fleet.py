"""Production fleet shapes: what the lease Redis costs, and a handover behind dead waiters.

**Lease Redis cost.**  One ``celery worker -P solo`` leads ``STOKERS`` Stokers
(``bench/apps/fleet_app.py``), each on a 0.5 s timer, then the same with no
timer; ``stoker_url`` is a Redis of its own, so every command on it is
celery-stoker's.  ``INFO commandstats`` is read before and after a fixed
window: commands a minute, by command, and per timer event (the timed run's
count minus the untimed one's, over the events committed in the window: the
sum of the Stokers' state versions).  Then a second worker joins as a
follower with gossip, heartbeats and mingle off, and ``MONITOR`` (each
command's client mapped to its process by port) counts what it sends.

**Handover behind N dead waiters** (gossip off, TTL 5 s): a leader, N
followers that are then SIGKILLed, one live follower that joined after them;
SIGTERM to the leader, and the figure is the ``released`` -> ``acquired``
messages on the lease channel, as a subscriber of the bench hears them.
Before this change the live follower was N places back: a release named the
first dead one, and a waiter more than 8 places back waited for the lease's
expiry.

    python -m bench.fleet --mode quick
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    CommandCounter,
    Table,
    by_owner,
    celery_worker,
    fmt_num,
    local_ports_to,
    process_tree,
    run_standalone,
    start_redis,
)
from celery_stoker.keys import lease_channel, lease_key, parse_message, state_key, waiters_key
from celery_stoker.testing import WorkerProcess, wait_for

APP = "bench.apps.fleet_app"
STOKERS = 10
TIMER = 0.5
GOSSIP_OFF = ("--without-gossip", "--without-heartbeat")  # and --without-mingle (default)
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"window_s": 3.0, "dead": (2,), "rounds": 1},
    "quick": {"window_s": 20.0, "dead": (10,), "rounds": 1},
    "full": {"window_s": 60.0, "dead": (0, 10, 30), "rounds": 3},
}


def _names() -> list[str]:
    return [f"fleet-{i}" for i in range(STOKERS)]


def _calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _events(client: Any) -> int:
    return sum(int(client.hget(state_key("stoker", n), "version") or 0) for n in _names())


def _window(client: Any, seconds: float) -> tuple[dict[str, float], float]:
    """Commands a minute by command over ``seconds`` (INFO itself left out), and events."""
    before, events0 = _calls(client), _events(client)
    time.sleep(seconds)
    after, events1 = _calls(client), _events(client)
    per_min = {
        cmd: (n - before.get(cmd, 0)) * 60.0 / seconds
        for cmd, n in after.items()
        if cmd != "info" and n - before.get(cmd, 0) > 0
    }
    return per_min, (events1 - events0) * 60.0 / seconds


def _leader_cost(plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for timer in (TIMER, 0.0):
        broker, lease_redis = start_redis(), start_redis()
        client = lease_redis.client()
        env = {
            "BENCH_BROKER": broker.url_for(0),
            "BENCH_STOKER_URL": lease_redis.url_for(0),
            "BENCH_STOKERS": str(STOKERS),
            "BENCH_TIMER": str(timer),
        }
        leader = celery_worker("lead@%h", APP, env, pool="solo", extra=GOSSIP_OFF).start()
        try:
            leader.wait_ready()
            wait_for(
                lambda c=client: all(c.exists(state_key("stoker", n)) for n in _names()),
                60,
                0.05,
                what="every Stoker's first event",
            )
            time.sleep(2.0)
            per_min, events = _window(client, plan["window_s"])
            out[f"timer {timer:g}"] = {"per_min": per_min, "events_per_min": events}
            if timer:
                out["follower"] = _follower_cost(plan, env, lease_redis, leader)
        finally:
            leader.stop()
            broker.close()
            lease_redis.close()
    return out


def _follower_cost(
    plan: dict[str, Any], env: dict[str, str], lease_redis: Any, leader: WorkerProcess
) -> dict[str, float]:
    """A follower of every Stoker, gossip off: its commands a minute, by MONITOR."""
    follower = celery_worker("follow@%h", APP, env, pool="solo", extra=GOSSIP_OFF).start()
    client = lease_redis.client()
    try:
        follower.wait_ready()
        wait_for(
            lambda: all(
                client.zscore(waiters_key("stoker", n), follower.node) is not None for n in _names()
            ),
            30,
            0.05,
            what="the follower waits for every Stoker",
        )
        time.sleep(2.0)
        counter = CommandCounter(lease_redis.port).start()
        try:
            time.sleep(plan["window_s"])
            ports = local_ports_to(process_tree(follower.pid), lease_redis.port)
            counts = by_owner(counter.take(), {"follower": ports})["follower"]
        finally:
            counter.stop()
        return {cmd: n * 60.0 / plan["window_s"] for cmd, n in counts.items()}
    finally:
        follower.stop()


def _handover(dead: int) -> float:
    """Seconds from ``released`` to ``acquired`` behind ``dead`` SIGKILLed followers."""
    broker, lease_redis = start_redis(), start_redis()
    client = lease_redis.client()
    env = {
        "BENCH_BROKER": broker.url_for(0),
        "BENCH_STOKER_URL": lease_redis.url_for(0),
        "BENCH_TTL": "5",
    }
    workers: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        worker = celery_worker(name, APP, env, pool="solo", extra=GOSSIP_OFF).start()
        workers.append(worker)
        return worker

    pubsub = client.pubsub()
    try:
        leader = start("lead@%h").wait_ready()
        wait_for(lambda: client.exists(lease_key("stoker", "fleet-0")), 30, 0.05, what="a lease")
        doomed = [start(f"gone{i}@%h") for i in range(dead)]
        for worker in doomed:
            worker.wait_ready(120)
        waiters = waiters_key("stoker", "fleet-0")
        wait_for(lambda: client.zcard(waiters) >= dead, 60, 0.05, what="the dead-to-be waiters")
        live = start("live@%h").wait_ready()
        wait_for(lambda: client.zscore(waiters, live.node) is not None, 30, 0.05, what="live")
        for worker in doomed:
            worker.sigkill()
            worker.wait_exit()
        pubsub.subscribe(lease_channel("stoker"))
        heard: dict[str, float] = {}
        leader.sigterm()
        deadline = time.monotonic() + 30
        while "acquired" not in heard and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is None or message["type"] != "message":
                continue
            parsed = parse_message(message["data"])
            if parsed is not None and parsed[2] == "fleet-0" and parsed[0] != "renewed":
                heard.setdefault(parsed[0], time.monotonic())
        return heard["acquired"] - heard["released"]
    finally:
        pubsub.close()
        for worker in workers:
            worker.cleanup()
        broker.close()
        lease_redis.close()


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    print(f"  fleet: lease Redis cost over {plan['window_s']:g} s windows", flush=True)
    cost = _leader_cost(plan)
    results: dict[str, list[float]] = {}
    for dead in plan["dead"]:
        print(f"  fleet: handover behind {dead} dead waiters", flush=True)
        results[str(dead)] = [_handover(dead) for _ in range(plan["rounds"])]
    data = {"cost": cost, "handover": results}
    return data, render(data)


def render(data: dict[str, Any]) -> list[Table]:
    """The tables of a run's JSON."""
    cost = data["cost"]
    timed, idle = cost[f"timer {TIMER:g}"], cost["timer 0"]
    timed_total, idle_total = sum(timed["per_min"].values()), sum(idle["per_min"].values())
    events = timed["events_per_min"]
    per_event = (timed_total - idle_total) / events if events else 0.0
    round_trips = ("evalsha", "hgetall", "lpush", "blpop")  # what a worker sends itself
    trips = sum(timed["per_min"].get(c, 0) - idle["per_min"].get(c, 0) for c in round_trips)
    costs = Table(
        f"Lease Redis cost: one worker leading {STOKERS} Stokers (TTL 10 s), INFO commandstats "
        "(commands run inside the scripts included)",
        ["who", "commands/min", "by command", "events/min"],
    )

    def by_cmd(per_min: dict[str, float]) -> str:
        return ", ".join(f"{c} {fmt_num(n, digits=0)}" for c, n in sorted(per_min.items()))

    costs.add("leader, no timer", fmt_num(idle_total, digits=0), by_cmd(idle["per_min"]), "0")
    costs.add(
        f"leader, {TIMER:g} s timers",
        fmt_num(timed_total, digits=0),
        by_cmd(timed["per_min"]),
        fmt_num(events, digits=0),
    )
    costs.add(
        "per timer event",
        fmt_num(per_event, digits=1),
        f"of which sent by the worker ({', '.join(round_trips)}): "
        f"{fmt_num(trips / events if events else 0.0, digits=1)}",
        "",
    )
    follower = cost["follower"]
    costs.add(
        "follower (gossip off), MONITOR",
        fmt_num(sum(follower.values()), digits=0),
        by_cmd(follower),
        "",
    )
    handovers = Table(
        "Clean handover behind N SIGKILLed followers, gossip off (released -> acquired)",
        ["dead waiters", "handover"],
    )
    for dead, times in data["handover"].items():
        handovers.add(dead, " / ".join(f"{t * 1000:.0f} ms" for t in sorted(times)))
    return [costs, handovers]


if __name__ == "__main__":
    run_standalone(__doc__.splitlines()[0], PLANS, run)
