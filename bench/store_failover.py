"""Failover by lease store: one Redis beside a six-node Redis Cluster, in the same run.

Three ``celery worker`` processes (solo pool) run the test recorder app
(``tests/apps/recorder.py``) with ``stoker_url`` on a plain ``redis-server`` or
on a Redis Cluster (``stoker_transport_options = {"cluster": True}``, three
primaries with a replica each, ``cluster-node-timeout`` 1 s); the broker and
the records are on plain Redis servers of their own in both cases.  Each round
makes one fault and times it from the fault to the first callback that starts
afterwards:

* ``sigterm`` / ``sigkill`` of the leader: to the new leader's ``now_leader``
  (before a SIGKILL the bench waits a random part of a renew interval, so the
  crash lands anywhere in the renewal cycle); the victim is started again;
* ``primary kill`` (cluster only): SIGKILL of the primary that holds the
  Stoker's slot; to the first callback that starts once the replica serves the
  slot, of the term that leads after it (the leader may keep its term or lose
  it).  The dead node is started again as the new primary's replica.

    python -m bench.store_failover --mode quick
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench.common import (
    Table,
    celery_worker,
    fmt_num,
    on_cleanup,
    run_standalone,
    start_redis,
    summarize,
)
from celery_stoker.keys import lease_key
from celery_stoker.lease import Holder
from celery_stoker.testing import RedisServer, WorkerProcess, wait_for
from celery_stoker.testing.redis_cluster import RedisCluster
from tests.support.workers import Record, Records

APP = "tests.apps.recorder"
TTL = 1.5
RENEW = TTL / 3
TIMER = 0.15
NODE_TIMEOUT = 1.0
LEASE = lease_key("stoker", "recorder")
PLANS: dict[str, dict[str, int]] = {"smoke": {"rounds": 1}, "quick": {"rounds": 5}}
PLANS["full"] = {"rounds": 15}
BOUNDS = {
    "sigterm": 1.0,
    "sigkill": TTL + RENEW + 0.5,
    "primary kill": NODE_TIMEOUT + TTL + RENEW + 1.0,
}


class Fleet:
    """Three workers on one lease store, and what their callbacks recorded."""

    def __init__(self, store: RedisServer | RedisCluster) -> None:
        self.store = store
        self.broker = start_redis()
        self.records_redis = start_redis()
        self.records = Records(self.records_redis.client())
        self.workers: dict[str, WorkerProcess] = {}
        self.lease = store.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        on_cleanup(self.lease.close)

    def env(self) -> dict[str, str]:
        env = {
            "STOKER_TEST_BROKER": self.broker.url_for(0),
            "STOKER_TEST_RECORD_URL": self.records_redis.url_for(0),
            "STOKER_TEST_TTL": str(TTL),
            "STOKER_TEST_TIMER": str(TIMER),
            "STOKER_TEST_URL": self.store.url,
        }
        if isinstance(self.store, RedisCluster):
            env["STOKER_TEST_CLUSTER"] = "1"
        return env

    def start(self, name: str) -> WorkerProcess:
        worker = celery_worker(name, APP, self.env(), pool="solo", concurrency=1).start()
        on_cleanup(lambda: worker.stop(10))
        self.workers[name] = worker
        return worker.wait_ready()

    def holder(self) -> tuple[str, int] | None:
        try:
            raw = self.lease.get(LEASE)
        except Exception:  # a cluster mid-failover, a refused connection: nobody known
            return None
        if not raw:
            return None
        holder = Holder.parse(raw, None)
        return holder.hostname, holder.token

    def settle(self) -> tuple[str, int]:
        """Every worker up and one leader acting: a timer of its term, just now."""
        since = time.time()

        def acting() -> tuple[str, int] | None:
            holder = self.holder()
            if holder is None or not all(w.alive() for w in self.workers.values()):
                return None
            timers = self.records.of("timer")
            if any(r.token == holder[1] and r.started >= since for r in timers):
                return holder
            return None

        return wait_for(acting, 60, 0.05, what="one leader acting")

    def by_node(self, node: str) -> tuple[str, WorkerProcess]:
        return next((n, w) for n, w in self.workers.items() if w.node == node)

    def first_after(self, at: float, *, token_above: int = 0, event: str | None = None) -> Record:
        def found() -> Record | None:
            later = [
                r
                for r in self.records.events()
                if r.started >= at and r.token > token_above and r.event != "shutdown"
            ]
            later = [r for r in later if event is None or r.event == event]
            return min(later, key=lambda r: r.started) if later else None

        return wait_for(found, 30, 0.01, what="a callback after the fault")


def measure(store_kind: str, rounds: int, rng: random.Random) -> list[dict[str, Any]]:
    store: RedisServer | RedisCluster
    if store_kind == "cluster":
        store = RedisCluster(node_timeout_ms=int(NODE_TIMEOUT * 1000))
        store.start()
        on_cleanup(store.close)
    else:
        store = start_redis()
    fleet = Fleet(store)
    for i in (1, 2, 3):
        fleet.start(f"s{i}@%h")
    kinds = ["sigterm", "sigkill"] + (["primary kill"] if store_kind == "cluster" else [])
    gaps: dict[str, list[float]] = {kind: [] for kind in kinds}
    kept: dict[str, int] = {kind: 0 for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            node, token = fleet.settle()
            if kind == "primary kill":
                assert isinstance(store, RedisCluster)
                killed_at = time.time()
                dead, _ = store.kill_primary_of(LEASE)
                served = time.time()
                _, now_token = fleet.settle()
                first = fleet.first_after(served, token_above=now_token - 1)
                kept[kind] += now_token == token
                store.revive(dead)
                gaps[kind].append(first.started - killed_at)
                continue
            name, worker = fleet.by_node(node)
            if kind == "sigkill":
                time.sleep(rng.uniform(0, RENEW))
            at = time.time()
            worker.sigterm() if kind == "sigterm" else worker.sigkill()
            first = fleet.first_after(at, token_above=token, event="now_leader")
            gaps[kind].append(first.started - at)
            worker.stop(20, sig=None)
            fleet.start(name)
    for worker in fleet.workers.values():
        worker.stop(20)
    return [
        {
            "store": store_kind,
            "fault": kind,
            "gap": summarize(gaps[kind]),
            "gaps_s": gaps[kind],
            "term_kept": kept[kind] if kind == "primary kill" else None,
            "bound_s": BOUNDS[kind],
        }
        for kind in kinds
    ]


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(
        "Failover by lease store: one Redis beside a Redis Cluster (fault -> next callback)",
        ["store", "fault", "rounds", "median", "p95", "max", "bound"],
    )
    for r in results:
        g = r["gap"]
        fault = r["fault"]
        if r.get("term_kept") is not None:
            fault += f" (term kept {r['term_kept']}/{g['n']})"
        t.add(
            "one Redis" if r["store"] == "single" else "Redis Cluster",
            fault,
            g["n"],
            fmt_num(None if g["median"] is None else g["median"] * 1000, " ms"),
            fmt_num(None if g["p95"] is None else g["p95"] * 1000, " ms"),
            fmt_num(None if g["max"] is None else g["max"] * 1000, " ms"),
            f"{r['bound_s']:g} s",
        )
    t.notes.append(
        f"TTL {TTL:g} s, renew every {RENEW:g} s, timer {TIMER:g} s; cluster: 3 primaries + 3 "
        f"replicas, cluster-node-timeout {NODE_TIMEOUT:g} s; three solo workers; broker and "
        "records on plain Redis servers"
    )
    t.notes.append(
        "sigterm/sigkill: to the new leader's now_leader; primary kill: from the kill to the "
        "first callback once the replica serves the slot (bound: node timeout + TTL + renew + 1 s)"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    """The table of a saved ``store_failover.json``."""
    return [table(data["runs"])]


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    rounds = PLANS[mode]["rounds"]
    rng = random.Random(16)
    results: list[dict[str, Any]] = []
    for store_kind in ("single", "cluster"):
        print(f"  store failover, {store_kind}: {rounds} rounds per fault", flush=True)
        results.extend(measure(store_kind, rounds, rng))
    return {"runs": results}, [table(results)]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
