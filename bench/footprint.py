"""Connections and threads of one worker as its number of Stokers grows.

One ``celery worker -P prefork -c 2`` of ``bench/apps/many_app.py`` with 1, 101
and 200 idle Stokers, alone on its ``stoker_url`` (a Redis of its own), so it
leads every Stoker.  Once every lease is held and every ``now_leader`` has had
time to run, the bench counts, over a few samples:

* **connections to stoker_url**: ``CLIENT LIST`` on that Redis (the bench's own
  connection left out), split into the main process and the pool processes
  by the sockets each owns (``/proc``);
* **threads in the main process**: ``/proc/<pid>/task``.

    python -m bench.footprint --mode quick
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import (
    Table,
    celery_worker,
    local_ports_to,
    process_tree,
    run_standalone,
    start_redis,
)
from celery_stoker.lease import lease_key
from celery_stoker.testing import wait_for

APP = "bench.apps.many_app"
TTL = 2.0
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [1, 11], "samples": 1},
    "quick": {"sizes": [1, 101, 200], "samples": 3},
    "full": {"sizes": [1, 101, 200], "samples": 5},
}


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def measure(stokers: int, samples: int) -> dict[str, Any]:
    broker, stoker = start_redis(), start_redis()
    client = stoker.client()
    env = {
        "BENCH_BROKER": broker.url_for(0),
        "BENCH_STOKER_URL": stoker.url_for(0),
        "BENCH_STOKERS": str(stokers),
        "BENCH_TTL": str(TTL),
    }
    worker = celery_worker("many@%h", APP, env).start()
    try:
        worker.wait_ready(180)
        keys = [lease_key("stoker", f"many-{i}") for i in range(stokers)]

        def all_held() -> bool:
            return all(v is not None for v in client.mget(keys))

        wait_for(all_held, TTL * 3 + 120, 0.2, what=f"{stokers} leases held")
        time.sleep(TTL * 2 + 2)  # past the quarantine of first terms, every now_leader run
        rows = []
        own = int(client.client_id())
        for _ in range(samples):
            clients = [c for c in client.client_list() if int(c["id"]) != own]
            pids = process_tree(worker.pid)
            main_ports = local_ports_to([worker.pid], stoker.port)
            pool_ports = local_ports_to([p for p in pids if p != worker.pid], stoker.port)
            ports = {int(c["addr"].rsplit(":", 1)[1]) for c in clients}
            rows.append(
                {
                    "connections": len(clients),
                    "main": len(ports & main_ports),
                    "pool": len(ports & pool_ports),
                    "pubsub": sum(1 for c in clients if int(c.get("sub", 0)) > 0),
                    "threads_main": _threads(worker.pid),
                    "pool_processes": len(pids) - 1,
                }
            )
            time.sleep(1.0)
    finally:
        worker.kill()
        broker.close()
        stoker.close()
    mid = sorted(rows, key=lambda r: r["connections"])[len(rows) // 2]
    return {
        "stokers": stokers,
        "samples": rows,
        "connections": mid["connections"],
        "connections_max": max(r["connections"] for r in rows),
        "main": mid["main"],
        "pool": mid["pool"],
        "pubsub": mid["pubsub"],
        "threads_main": sorted(r["threads_main"] for r in rows)[len(rows) // 2],
        "threads_main_max": max(r["threads_main"] for r in rows),
    }


def tables(data: dict[str, Any]) -> list[Table]:
    results = data["results"]
    t = Table(
        "Footprint: one worker (-P prefork -c 2) leading N idle Stokers: connections to "
        "stoker_url and threads in its main process",
        [
            "Stokers",
            "connections",
            "of which main / pool",
            "pub/sub",
            "threads (main)",
            "max over samples",
        ],
    )
    for r in results:
        t.add(
            r["stokers"],
            r["connections"],
            f"{r['main']} / {r['pool']}",
            r["pubsub"],
            r["threads_main"],
            f"{r['connections_max']} conns, {r['threads_main_max']} threads",
        )
    if len(results) >= 2:
        lo, hi = results[0], results[1]
        d_conn = hi["connections_max"] - lo["connections"]
        d_thr = hi["threads_main_max"] - lo["threads_main"]
        extra = hi["stokers"] - lo["stokers"]
        t.notes.append(
            f"{lo['stokers']} -> {hi['stokers']} Stokers: {d_conn:+d} connections "
            f"(target: at most +4: {'met' if d_conn <= 4 else 'MISSED'}), {d_thr:+d} threads "
            f"(target: at most one per Stoker, +{extra}: "
            f"{'met' if d_thr <= extra else 'MISSED'})"
        )
    t.notes.append(
        "CLIENT LIST on stoker_url (a Redis of its own) without the bench's connection; "
        "threads from /proc/<pid>/task; medians over samples"
    )
    return [t]


def render(data: dict[str, Any]) -> list[Table]:
    return tables(data)


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    results = []
    for n in plan["sizes"]:
        print(f"  one worker with {n} Stokers", flush=True)
        results.append(measure(n, plan["samples"]))
    data = {"ttl": TTL, "pool": "prefork -c 2", "results": results}
    return data, tables(data)


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
