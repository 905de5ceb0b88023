"""Spreading leadership: a cold fleet and a join, how fast and how many moves; the idle cost.

``WORKERS`` ``celery worker -P solo`` processes run ``STOKERS`` idle Stokers
(``bench/apps/fleet_app.py``, no timer, TTL 10 s, Celery's 2 s heartbeats: the
defaults), electing in a Redis of their own (``stoker_url``) so every command
on it is celery-stoker's.  The solo pool keeps 20 workers on 2 CPUs possible:
one process each, nothing forked.

**Cold start.**  The first worker starts alone and takes every lease (and has
run every Stoker's first event: a fresh Redis makes a first term wait one TTL
before it acts, and a term that does not act yet is not moved); then the
others start at once.  From the moment the last one is ready: the time until
every worker leads between ``floor(S/W) - 1`` and ``ceil(S/W) + 1`` (the
issue's bound), the time of the last move (no move for ``settle_s`` after it),
and the number of moves (changes of term seen by polling every lease each
0.1 s).

**Join.**  One more worker starts; the same figures from its being ready.

**Idle cost.**  Once nothing moves: every command to ``stoker_url`` over a
window, by ``MONITOR``, each command's client mapped to its worker by port.
A worker's commands beyond the renewals of the leases it holds (one
``EVALSHA`` per lease per renew interval, TTL / 3) are what it pays as a
follower of everything else: 0 means a follower still sends nothing.  The same
fleet with ``stoker_balance = False`` (first come, the behaviour before
spreading: one worker holds every lease) is the baseline.

    python -m bench.balance --mode quick
"""

from __future__ import annotations

import math
import time
from collections import Counter
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
from celery_stoker.keys import lease_key, state_key
from celery_stoker.lease import Holder
from celery_stoker.testing import RedisServer, WorkerProcess, wait_for

APP = "bench.apps.fleet_app"
TTL = 10.0
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"workers": 4, "stokers": 12, "window_s": 5.0, "settle_s": 8.0},
    "quick": {"workers": 20, "stokers": 50, "window_s": 20.0, "settle_s": 10.0},
    "full": {"workers": 20, "stokers": 50, "window_s": 60.0, "settle_s": 15.0},
}


def _names(stokers: int) -> list[str]:
    return [f"fleet-{i}" for i in range(stokers)]


def _holders(client: Any, names: list[str]) -> dict[str, tuple[str | None, int | None]]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(lease_key("stoker", name))
    out = {}
    for name, raw in zip(names, pipe.execute(), strict=True):
        holder = Holder.parse(raw, None) if raw else None
        out[name] = (holder.hostname, holder.token) if holder else (None, None)
    return out


class Watch:
    """Polls every lease: counts changes of term, notes when the issue's bound first held."""

    def __init__(self, client: Any, names: list[str]) -> None:
        self.client, self.names = client, names
        self.last = _holders(client, names)
        self.moves = 0
        self.last_move_at = time.monotonic()

    def poll(self) -> dict[str, int]:
        now = _holders(self.client, self.names)
        # A new term; a lease seen free on its way (an expiry, a release) is no move.
        changed = sum(
            1 for n in self.names if now[n][1] is not None and now[n][1] != self.last[n][1]
        )
        if changed:
            self.moves += changed
            self.last_move_at = time.monotonic()
        self.last = {n: now[n] if now[n][1] is not None else self.last[n] for n in self.names}
        return dict(Counter(host for host, _ in now.values() if host))

    def until_settled(
        self, nodes: list[str], t0: float, settle_s: float, timeout: float, *, spread: bool = True
    ) -> dict[str, Any]:
        """Poll until no move for ``settle_s``; from ``t0``: time to the bound, to the last move."""
        low = math.floor(len(self.names) / len(nodes)) - 1
        high = math.ceil(len(self.names) / len(nodes)) + 1
        within: float | None = None
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = self.poll()
            led = sum(counts.get(n, 0) for n in nodes) == len(self.names)  # the dead's too
            if within is None and led and all(low <= counts.get(n, 0) <= high for n in nodes):
                within = time.monotonic() - t0
            quiet = time.monotonic() - max(self.last_move_at, t0) >= settle_s
            if quiet and (within is not None or not spread):
                break
            time.sleep(0.1)
        return {
            "within_bound_s": within,
            "last_move_s": max(0.0, self.last_move_at - t0),
            "moves": self.moves,
            "bound": [low, high],
            "counts": {n: counts.get(n, 0) for n in nodes},
        }


def _start_all(workers: list[WorkerProcess]) -> float:
    """Start ``workers`` together; the moment the last one is ready."""
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.wait_ready(180)
    return time.monotonic()


def _idle_cost(
    lease_redis: RedisServer, workers: list[WorkerProcess], names: list[str], window: float
) -> dict[str, Any]:
    """Commands a minute per worker over ``window``, and what is beyond its leases' renewals."""
    client = lease_redis.client()
    # A worker that gave a Stoker away leaves it alone for one TTL, then joins its
    # waiters again (one ACQUIRE): that is the end of the move, not idle cost.
    time.sleep(TTL + 2.0)
    counter = CommandCounter(lease_redis.port).start()
    try:
        time.sleep(1.0)
        counter.take()
        time.sleep(window)
        counts = counter.take()
        ports = {w.node: local_ports_to(process_tree(w.pid), lease_redis.port) for w in workers}
    finally:
        counter.stop()
    split = by_owner(counts, ports)
    held = Counter(host for host, _ in _holders(client, names).values() if host)
    renewals_per_min = 60.0 / (TTL / 3)
    per_worker = {}
    for worker in workers:
        total = sum(split[worker.node].values()) * 60.0 / window
        per_worker[worker.node] = {
            "per_min": total,
            "leases": held.get(worker.node, 0),
            "beyond_renewals": total - held.get(worker.node, 0) * renewals_per_min,
        }
    return {
        "window_s": window,
        "fleet_per_min": sum(sum(c.values()) for c in split.values()) * 60.0 / window,
        "by_command": {
            cmd: n * 60.0 / window
            for cmd, n in sum((Counter(c) for c in split.values()), Counter()).items()
        },
        "workers": per_worker,
    }


def _fleet(plan: dict[str, Any], balance: bool) -> dict[str, Any]:
    """One fleet from cold, a join (with balance), and its idle cost."""
    broker, lease_redis = start_redis(), start_redis()
    client = lease_redis.client()
    names = _names(plan["stokers"])
    env = {
        "BENCH_BROKER": broker.url_for(0),
        "BENCH_STOKER_URL": lease_redis.url_for(0),
        "BENCH_STOKERS": str(plan["stokers"]),
        "BENCH_TTL": str(TTL),
        "BENCH_BALANCE": "1" if balance else "0",
    }
    workers: list[WorkerProcess] = []

    def make(name: str) -> WorkerProcess:
        worker = celery_worker(name, APP, env, pool="solo")
        workers.append(worker)
        return worker

    out: dict[str, Any] = {"balance": balance}
    try:
        first = make("b00@%h").start().wait_ready(120)
        wait_for(
            lambda: all(client.exists(state_key("stoker", n)) for n in names),
            2 * TTL + 60,
            0.1,
            what="the first worker's first events",
        )
        rest = [make(f"b{i:02d}@%h") for i in range(1, plan["workers"])]
        watch = Watch(client, names)
        ready_at = _start_all(rest)
        nodes = [w.node for w in (first, *rest)]
        out["cold"] = watch.until_settled(nodes, ready_at, plan["settle_s"], 180, spread=balance)
        print(f"  balance {balance}: cold start {out['cold']}", flush=True)
        out["idle"] = _idle_cost(lease_redis, workers, names, plan["window_s"])
        if balance:
            watch = Watch(client, names)
            joined = make(f"b{plan['workers']:02d}@%h").start().wait_ready(120)
            ready_at = time.monotonic()
            nodes.append(joined.node)
            out["join"] = watch.until_settled(nodes, ready_at, plan["settle_s"], 180)
            share = math.floor(len(names) / len(nodes))
            out["join"]["joined"] = watch.poll().get(joined.node, 0)
            out["join"]["share"] = share
            print(f"  join: {out['join']}", flush=True)
            # A crash of the busiest worker: its leases expire, the least loaded take them.
            counts = watch.poll()
            busiest = max(nodes, key=lambda n: (counts.get(n, 0), n))
            watch = Watch(client, names)
            next(w for w in workers if w.node == busiest).kill()
            killed_at = time.monotonic()
            nodes.remove(busiest)
            out["crash"] = watch.until_settled(nodes, killed_at, plan["settle_s"], 180)
            out["crash"]["lost"] = counts.get(busiest, 0)
            print(f"  crash: {out['crash']}", flush=True)
        out["scope_bytes"] = _scope_bytes(plan)
    finally:
        for worker in workers:
            worker.cleanup()
        broker.close()
        lease_redis.close()
    return out


def _scope_bytes(plan: dict[str, Any]) -> int:
    """The size of the heartbeat's ``stoker_scope`` field for a worker that leads its share."""
    import json

    from celery_stoker.balance import Announcement

    names = _names(plan["stokers"])
    share = math.ceil(len(names) / plan["workers"])
    announced = Announcement(
        eligible=frozenset(names), leads={n: 1796455586138817 for n in names[:share]}
    )
    scope = {"app": "fleetbench", "prefixes": ["stoker"], "version": "0.3.0"}
    scope["balance"] = {"stoker": announced.fields()}  # type: ignore[assignment]
    return len(json.dumps(scope))


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    print(f"  balance: {plan['workers']} x {plan['stokers']} Stokers, -P solo", flush=True)
    data = {"plan": plan, "ttl": TTL, "on": _fleet(plan, True), "off": _fleet(plan, False)}
    return data, render(data)


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def render(data: dict[str, Any]) -> list[Table]:
    """The tables of a run's JSON."""
    plan, on, off = data["plan"], data["on"], data["off"]
    spread = Table(
        f"Spreading leadership: {plan['workers']} workers x {plan['stokers']} Stokers "
        f"(-P solo, TTL {data['ttl']:g} s, 2 s heartbeats), from the last worker ready",
        ["event", "within the issue's bound", "last move", "moves", "each leads"],
    )

    def spread_of(counts: dict[str, int]) -> str:
        values = sorted(counts.values())
        return f"{values[0]} - {values[-1]}" if values else "-"

    def add(label: str, result: dict[str, Any] | None) -> None:
        if not result:
            return
        low, high = result["bound"]
        spread.add(
            label,
            f"{_secs(result['within_bound_s'])} ({low} - {high})",
            _secs(result["last_move_s"]),
            str(result["moves"]),
            spread_of(result["counts"]),
        )

    add("cold start (the first worker held every lease)", on["cold"])
    join, crash = on.get("join"), on.get("crash")
    if join:
        add(f"a worker joins ({join['joined']} for it, share {join['share']})", join)
    if crash:
        add(f"the busiest worker SIGKILLed (it led {crash['lost']}), from the kill", crash)
    first = off["cold"]
    spread.add(
        "stoker_balance = False (first come)",
        _secs(first["within_bound_s"]),
        "-",
        str(first["moves"]),
        spread_of(first["counts"]),
    )
    spread.notes.append(
        "targets: within 30 s of the last worker ready (cold start, join); after a crash "
        f"within TTL + renew + 15 s = {data['ttl'] * 4 / 3 + 15:.1f} s; moves counts every "
        "change of term (a crash's: the dead worker's leases taken, then any move)"
    )
    spread.notes.append(
        f"heartbeat field stoker_scope of a worker leading its share: "
        f"{on['scope_bytes']} bytes (sent every 2 s, to the broker)"
    )

    cost = Table(
        f"Idle Redis cost of the same fleet, commands a minute to stoker_url over "
        f"{on['idle']['window_s']:g} s (MONITOR)",
        ["fleet", "all workers", "per Stoker", "a worker beyond its renewals (max)", "by command"],
    )
    for label, run in (("spread (default)", on), ("first come (stoker_balance = False)", off)):
        idle = run["idle"]
        beyond = max(w["beyond_renewals"] for w in idle["workers"].values())
        cost.add(
            label,
            fmt_num(idle["fleet_per_min"], digits=0),
            fmt_num(idle["fleet_per_min"] / plan["stokers"], digits=1),
            fmt_num(beyond, digits=1),
            ", ".join(f"{c} {fmt_num(n, digits=0)}" for c, n in sorted(idle["by_command"].items())),
        )
    cost.notes.append(
        f"renewals: one EVALSHA per lease every TTL / 3 = {60 / (data['ttl'] / 3):g} a minute; "
        "main's figure (BENCHMARKS.md, idle): 18 a minute per Stoker, a follower 0"
    )
    return [spread, cost]


if __name__ == "__main__":
    run_standalone(__doc__.splitlines()[0], PLANS, run)
