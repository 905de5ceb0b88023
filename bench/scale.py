"""Scale: 10 to 2,000 activators electing on one Redis, sharing connections as workers do.

Each simulated activator is what a worker runs for one Stoker, minus Celery:
a :class:`celery_stoker.lease.RedisLease` driven by a thread with the
election's follower/leader loop (acquire, else wait for a release or the
expiry; as leader, renew every TTL/3).  They are spread over processes (one
per 100 activators, at least 4), and within a process they share what a
worker's activators share: one client with a capped connection pool
(``MAX_CONNECTIONS``) and one :class:`celery_stoker.lease.LeaseListener`
(one pub/sub connection).  So 2,000 activators hold a few dozen
connections, not 4,000.

Per fleet size it measures:

* **release -> new leader**: the leader releases (as on a clean stop) and
  leaves the race; the time until another activator's acquire has returned
  a term, and how many client commands that failover cost;
* **exactly one leads**: after each failover, the number of activators that
  hold a valid term, summed over all processes, and Redis's holder;
* **idle cost**: Redis operations per second (``total_commands_processed``,
  which counts a script's inner commands too), client commands per second
  (MONITOR), Redis CPU, the activators' own CPU and the connections they
  hold, while one leader renews and every other activator waits.

    python -m bench.scale --mode quick
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import random
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import redis

from bench.common import (
    CommandCounter,
    Table,
    by_owner,
    cpu_seconds,
    fmt_num,
    local_ports_to,
    on_cleanup,
    run_standalone,
    start_redis,
    summarize,
)
from celery_stoker.lease import (
    Holder,
    LeaseListener,
    RedisLease,
    Term,
    lease_channel,
    lease_key,
)

NAME = "scale"
TTL = 10.0
#: Connections in each process's shared pool, as a worker's (``bootstep.MAX_SHARED_CONNECTIONS``).
MAX_CONNECTIONS = 4
#: Targets at 500 activators and more: release -> new leader, and commands per failover.
TARGET_P50, TARGET_MAX, TARGET_CMDS = 0.010, 0.050, 5
#: Backoff after a command raised, as the election's (``election.BACKOFF_*``).
BACKOFF_START, BACKOFF_MAX = 0.05, 0.5
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [10, 30], "rounds": 2, "idle_s": 2.0, "ttl": 3.0},
    # Idle windows are whole renew intervals (TTL/3), so each holds a whole number of renewals.
    "quick": {"sizes": [10, 100, 500], "rounds": 4, "idle_s": TTL / 3, "ttl": TTL},
    "full": {"sizes": [10, 100, 500, 2000], "rounds": 20, "idle_s": 30.0, "ttl": TTL},
}


# --------------------------------------------------------------------------- in the children


class SimActivator:
    """The activator's election loop for one simulated worker, without Celery."""

    def __init__(
        self, idx: int, client: redis.Redis, listener: LeaseListener, ttl: float, results: Any
    ) -> None:
        self.idx = idx
        self.ttl = ttl
        self.results = results
        self.client = client
        self.lease = RedisLease(
            self.client,
            NAME,
            holder_id=f"sim-{idx}",
            hostname=f"sim{idx}",
            ttl=ttl,
            listener=listener,
        )
        self.term: Term | None = None
        self.highest = 0
        #: Commands that raised (and were retried after a backoff).
        self.errors = 0
        self.active = threading.Event()
        self.active.set()
        self.release_now = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"sim-{idx}", daemon=True)

    def leads(self) -> bool:
        term = self.term
        return term is not None and term.is_valid()

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self.stopping.is_set():
            try:
                self.step()
                backoff = BACKOFF_START
            except (redis.RedisError, OSError):
                # As the election does: a refused or timed-out command (the shared pool
                # was busy, Redis slow) is retried after a backoff, never a dead thread.
                self.errors += 1
                term = self.term
                if term is not None and not term.is_valid():
                    self.term = None
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def step(self) -> None:
        renew_interval = self.ttl / 3
        if not self.active.is_set():
            self.active.wait(0.1)
            return
        if self.term is None:
            result = self.lease.acquire(self.highest)
            if result.term is not None:
                self.term = result.term
                self.highest = max(self.highest, result.term.token)
                self.results.put(("leader", self.idx, time.time(), result.term.token))
                return
            if result.holder is not None and result.holder.token:
                self.highest = max(self.highest, result.holder.token)
            self.lease.wait(self.lease.wait_timeout(result.holder))
        elif self.release_now.wait(renew_interval):
            self.release_now.clear()
            term, self.term = self.term, None
            self.active.clear()  # a stopping worker leaves the race
            released_at = time.time()
            self.lease.release(term)
            self.results.put(("released", self.idx, released_at, term.token))
        elif not self.lease.renew(self.term):
            self.term = None

    def stop(self) -> None:
        self.stopping.set()
        self.active.set()
        self.release_now.set()
        self.lease.wake()


def host_main(conn: Connection, results: Any, url: str, ttl: float, first: int, count: int) -> None:
    """One process hosting ``count`` activators; obeys commands from the parent on ``conn``."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=2.0,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    client = redis.Redis(connection_pool=pool)
    listener = LeaseListener(
        lambda: redis.Redis.from_url(url, socket_timeout=None, socket_connect_timeout=2.0),
        lease_channel("stoker"),
        thread_name=f"listener-{first}",
    )
    listener.start(wait_subscribed=0)
    sims = [SimActivator(first + i, client, listener, ttl, results) for i in range(count)]
    deadline = time.monotonic() + 60
    while not listener.subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    for sim in sims:
        sim.thread.start()
    conn.send(("ready", count if listener.subscribed else 0))
    try:
        while True:
            command = conn.recv()
            if command == "release":
                leaders = [s for s in sims if s.leads()]
                for sim in leaders:
                    sim.release_now.set()
                conn.send(len(leaders))
            elif command == "resume":
                for sim in sims:
                    sim.active.set()
                conn.send(True)
            elif command == "count":
                conn.send(sum(s.leads() for s in sims))
            elif command == "errors":
                conn.send(sum(s.errors for s in sims))
            elif command == "who":
                conn.send(
                    [
                        (s.idx, s.term.token, round(s.term.time_left(), 3))
                        for s in sims
                        if s.leads() and s.term is not None
                    ]
                )
            elif command == "stop":
                break
    finally:
        for sim in sims:
            sim.stop()
        for sim in sims:
            sim.thread.join(2)
        listener.stop(0.5)
        conn.send("stopped")


# --------------------------------------------------------------------------- in the parent


class SimFleet:
    """The child processes of one fleet size, and the channel their news arrives on."""

    def __init__(self, url: str, size: int, ttl: float) -> None:
        ctx = mp.get_context("spawn")
        self.results: Any = ctx.Queue()
        procs = min(size, max(4, math.ceil(size / 100)))
        per = [size // procs + (1 if i < size % procs else 0) for i in range(procs)]
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        first = 0
        for count in per:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=host_main, args=(child, self.results, url, ttl, first, count), daemon=True
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
            first += count
        on_cleanup(self.kill)

    def ask(self, command: str, timeout: float = 30.0) -> list[Any]:
        for conn in self.conns:
            conn.send(command)
        out = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise TimeoutError(f"a simulation process did not answer {command!r}")
            out.append(conn.recv())
        return out

    def wait_ready(self, timeout: float = 120.0) -> int:
        subscribed = 0
        for conn in self.conns:
            if not conn.poll(timeout):
                raise TimeoutError("a simulation process did not start")
            _, n = conn.recv()
            subscribed += n
        return subscribed

    def next_event(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return tuple(self.results.get(timeout=timeout))
        except queue.Empty:
            return None

    def drain(self) -> list[tuple[Any, ...]]:
        out = []
        while (item := self.next_event(0.0)) is not None:
            out.append(item)
        return out

    def close(self) -> None:
        with_timeout = [c for c in self.conns if not c.closed]
        for conn in with_timeout:
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                continue
        for conn in with_timeout:
            if conn.poll(10):
                conn.recv()
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _info(client: redis.Redis) -> tuple[int, float]:
    """Redis's command count (one of them this INFO) and its CPU seconds so far."""
    info = client.info("stats", "cpu")
    return int(info["total_commands_processed"]), float(info["used_cpu_sys"]) + float(
        info["used_cpu_user"]
    )


def _busy_usec(client: redis.Redis) -> int:
    """Microseconds Redis has spent executing commands, other than our INFO calls."""
    stats = client.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k != "cmdstat_info")


def _sim_commands(counter: CommandCounter, pids: list[int], port: int) -> int:
    """Commands the activators sent since the last take (ours are left out by port)."""
    counts = counter.take()
    return sum(by_owner(counts, {"sims": local_ports_to(pids, port)})["sims"].values())


def measure(size: int, rounds: int, idle_s: float, ttl: float = TTL) -> dict[str, Any]:
    server = start_redis()
    client = server.client()
    counter = CommandCounter(server.port).start()
    fleet = SimFleet(server.url_for(0), size, ttl)
    try:
        started = time.monotonic()
        subscribed = fleet.wait_ready()
        first = fleet.next_event(ttl + 30)
        if first is None or first[0] != "leader":
            raise RuntimeError(f"no first leader among {size} activators")
        startup_s = time.monotonic() - started
        # Past the leader's first renewal (redis-py loads the renew script then).
        time.sleep(ttl / 3 + 0.5)
        fleet.drain()

        # Idle: one leader renewing, everyone else waiting.
        pids = [p.pid for p in fleet.procs]
        counter.take()
        ops0, rcpu0 = _info(client)
        ccpu0 = cpu_seconds(pids)
        t0 = time.monotonic()
        time.sleep(idle_s)
        elapsed = time.monotonic() - t0
        ops1, rcpu1 = _info(client)
        ccpu1 = cpu_seconds(pids)
        client_cmds = _sim_commands(counter, pids, server.port)
        own = {int(client.client_id())}
        connections = sum(1 for c in client.client_list() if int(c["id"]) not in own) - 1
        idle = {
            "connections": connections,  # less the MONITOR connection
            "window_s": elapsed,
            "redis_ops_per_s": (ops1 - ops0 - 1) / elapsed,  # minus our first INFO
            "client_cmds_per_s": client_cmds / elapsed,
            "redis_cpu_percent": (rcpu1 - rcpu0) / elapsed * 100,
            "activators_cpu_percent": (ccpu1 - ccpu0) / elapsed * 100,
        }

        out_rounds = []
        for i in range(rounds):
            time.sleep(random.uniform(0.2, 0.6))
            fleet.drain()
            counter.take()
            busy0 = _busy_usec(client)
            before = [x for part in fleet.ask("who") for x in part]
            raw = client.get(lease_key("stoker", NAME))
            released = fleet.ask("release")
            if sum(released) != 1:
                raise RuntimeError(
                    f"{sum(released)} leaders before round {i + 1}: (idx, token, s left) "
                    f"{before}; Redis holds {raw!r}"
                )
            t_rel: float | None = None
            t_new: float | None = None
            new_idx = None
            leaders_reported = 0
            deadline = time.monotonic() + ttl + 15
            while time.monotonic() < deadline and t_new is None:
                item = fleet.next_event(0.5)
                if item is None:
                    continue
                if item[0] == "released":
                    t_rel = item[2]
                elif item[0] == "leader":
                    t_new, new_idx = item[2], item[1]
                    leaders_reported += 1
            time.sleep(0.5)  # any second leader would have shown itself by now
            # The releaser reports after its release returned, so its news may come
            # after the new leader's: take both from what arrived meanwhile.
            for item in fleet.drain():
                if item[0] == "leader":
                    leaders_reported += 1
                elif item[0] == "released" and t_rel is None:
                    t_rel = item[2]
            holding = sum(fleet.ask("count"))
            raw = client.get(lease_key("stoker", NAME))
            holder = Holder.parse(raw, None).hostname if raw else None
            commands = _sim_commands(counter, pids, server.port)
            busy = _busy_usec(client) - busy0
            fleet.ask("resume")
            if t_rel is None or t_new is None:
                raise RuntimeError(f"round {i + 1}: no new leader within {ttl + 15:.0f} s")
            out_rounds.append(
                {
                    "round": i + 1,
                    "seconds": t_new - t_rel,
                    "leaders_reported": leaders_reported,
                    "holding_valid_term": holding,
                    "redis_holder_matches": holder == f"sim{new_idx}",
                    "client_commands": commands,
                    # Redis's own time executing the failover's commands (all of
                    # them: the release, every waiter's acquire, our GET).
                    "redis_busy_us": busy,
                }
            )
        errors = sum(fleet.ask("errors"))
    finally:
        fleet.close()
        counter.stop()
        server.close()
    return {
        "activators": size,
        "processes": len(fleet.procs),
        "subscribed": subscribed,
        "ttl": ttl,
        "startup_s": startup_s,
        "idle": idle,
        # Commands that raised in the activators (retried after a backoff).
        "errors": errors,
        "rounds": out_rounds,
        "failover": summarize([r["seconds"] for r in out_rounds]),
        "commands_per_failover": summarize([r["client_commands"] for r in out_rounds]),
        "redis_busy_per_failover_us": summarize([r["redis_busy_us"] for r in out_rounds]),
        "exactly_one_every_round": all(
            r["leaders_reported"] == 1
            and r["holding_valid_term"] == 1
            and r["redis_holder_matches"]
            for r in out_rounds
        ),
    }


def _target(r: dict[str, Any]) -> str:
    if r["activators"] < 500:
        return "-"
    f, c = r["failover"], r["commands_per_failover"]
    met = f["median"] <= TARGET_P50 and f["max"] <= TARGET_MAX and c["median"] <= TARGET_CMDS
    return "met" if met else "MISSED"


def _busy(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("median") is None:
        return "-"
    return f"{summary['median'] / 1000:.2f} ms"


def table(results: list[dict[str, Any]], ttl: float) -> Table:
    t = Table(
        f"Scale: N activators on one Redis (per process: one shared client, one listener), "
        f"TTL {ttl:g} s",
        [
            "activators",
            "release -> new leader p50 (min - max)",
            "exactly one leads",
            "cmds per failover",
            "Redis busy per failover",
            "target (>= 500)",
            "connections",
            "idle Redis ops/s",
            "idle client cmds/s",
            "idle Redis CPU %",
            "activators' CPU %",
        ],
    )
    for r in results:
        f, c, idle = r["failover"], r["commands_per_failover"], r["idle"]
        t.add(
            r["activators"],
            f"{fmt_num(f['median'] * 1000, ' ms')} ({fmt_num(f['min'] * 1000)} - "
            f"{fmt_num(f['max'] * 1000)})",
            f"yes, {f['n']}/{f['n']} rounds" if r["exactly_one_every_round"] else "NO",
            fmt_num(c["median"], digits=0),
            _busy(r.get("redis_busy_per_failover_us")),
            _target(r),
            idle.get("connections", "-"),
            fmt_num(idle["redis_ops_per_s"], digits=2),
            fmt_num(idle["client_cmds_per_s"], digits=2),
            fmt_num(idle["redis_cpu_percent"], digits=2),
            fmt_num(idle["activators_cpu_percent"], digits=1),
        )
    t.notes.append(
        "idle Redis ops/s counts the commands run inside scripts too (Redis's own figure); "
        "client cmds/s counts what clients send (one EVALSHA per renewal)"
    )
    t.notes.append(
        "each renewal is delivered to every listener (one per process); a release names one "
        "waiter, which alone tries; Redis busy: its own time executing a failover's "
        "commands (INFO commandstats), median; connections: CLIENT LIST while idle"
    )
    errs = {r["activators"]: r.get("errors", 0) for r in results if r.get("errors")}
    if errs:
        t.notes.append(
            "commands that raised and were retried after a backoff (the shared pool busy at "
            "start): " + ", ".join(f"{n} at {a} activators" for a, n in errs.items())
        )
    t.notes.append(
        f"target at 500 and 2,000: p50 <= {TARGET_P50 * 1000:g} ms, max <= "
        f"{TARGET_MAX * 1000:g} ms, <= {TARGET_CMDS} commands per failover"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    """The table of a saved ``scale.json``."""
    return [table(data["runs"], data["ttl"])]


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    results = []
    for size in plan["sizes"]:
        print(
            f"  scale: {size} activators, {plan['rounds']} failovers, {plan['idle_s']:g} s idle",
            flush=True,
        )
        results.append(measure(size, plan["rounds"], plan["idle_s"], plan["ttl"]))
    return {"ttl": plan["ttl"], "runs": results}, [table(results, plan["ttl"])]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
