"""State bytes: what one event costs in Redis traffic, for a small and a large state.

One ``celery worker`` runs ``bench/apps/state_app.py``: a Stoker whose state
is a JSON blob of a given size, on a short timer.  Its Stoker Redis is a
server of its own (the broker is another), so the Redis counters
``total_net_input_bytes`` and ``total_net_output_bytes`` of the Stoker Redis,
read before and after N timer events, divided by N, are the bytes one event
sends into and reads out of Redis: the term check and state read, the fenced
commit, the report, the lease's renewals meanwhile.  A state of S bytes costs
at least S in (the commit) and S out (the read).

    python -m bench.state_bytes --mode quick
"""

from __future__ import annotations

from typing import Any

from bench.common import Table, celery_worker, fmt_num, run_standalone, start_redis
from celery_stoker.testing import wait_for

APP = "bench.apps.state_app"
KB, MB = 1024, 1024 * 1024
#: Events measured per state size, after the first ``warmup`` (init, first connections).
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [KB, MB], "events": 5, "warmup": 3, "timer": 0.2, "pools": ["prefork"]},
    "quick": {
        "sizes": [KB, 10 * MB],
        "events": 20,
        "warmup": 3,
        "timer": 0.2,
        "pools": ["prefork", "solo"],
    },
    "full": {
        "sizes": [KB, MB, 10 * MB],
        "events": 50,
        "warmup": 5,
        "timer": 0.2,
        "pools": ["prefork", "solo"],
    },
}


def _net(client: Any) -> tuple[int, int]:
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def measure(pool: str, size: int, events: int, warmup: int, timer: float) -> dict[str, Any]:
    """Run one worker; return the Stoker Redis's bytes in and out per event."""
    broker, store = start_redis(), start_redis()
    records, counters = broker.client(), store.client()
    env = {
        "BENCH_BROKER": broker.url_for(0),
        "BENCH_STOKER_URL": store.url_for(0),
        "BENCH_STATE_BYTES": str(size),
        "BENCH_TIMER": str(timer),
    }
    worker = celery_worker("s1@%h", APP, env, pool=pool).start()
    budget = (events + warmup) * (timer + 2.0) + 60
    try:
        worker.wait_ready()
        wait_for(lambda: records.llen("state:events") >= warmup, budget, 0.05, what="warm-up")
        first = records.llen("state:events")
        before = _net(counters)
        wait_for(
            lambda: records.llen("state:events") >= first + events,
            budget,
            0.05,
            what=f"{events} events",
        )
        after = _net(counters)
        counted = records.llen("state:events") - first
    finally:
        worker.stop(20)
        broker.close()
        store.close()
    return {
        "pool": pool,
        "state_bytes": size,
        "events": counted,
        "in_per_event": (after[0] - before[0]) / counted,
        "out_per_event": (after[1] - before[1]) / counted,
    }


def _size(n: float) -> str:
    return f"{n / MB:.2f} MB" if n >= 100 * KB else f"{n / KB:.1f} KB"


def table(results: list[dict[str, Any]], label: str = "") -> Table:
    t = Table(
        "Stoker Redis traffic per event" + (f" ({label})" if label else ""),
        ["pool", "state", "events", "into Redis", "out of Redis", "in / state", "out / state"],
    )
    for r in results:
        size = r["state_bytes"]
        t.add(
            r["pool"],
            _size(size),
            r["events"],
            _size(r["in_per_event"]),
            _size(r["out_per_event"]),
            fmt_num(r["in_per_event"] / size, "x", 2),
            fmt_num(r["out_per_event"] / size, "x", 2),
        )
    t.notes.append(
        "INFO stats total_net_input_bytes / total_net_output_bytes of the Stoker Redis "
        "(not the broker) over the events, divided by their number"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    """The table of a saved ``state_bytes.json``."""
    return [table(data["runs"], data.get("label", ""))]


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    results = []
    for pool in plan["pools"]:
        for size in plan["sizes"]:
            print(f"  state bytes, -P {pool}, {_size(size)} state", flush=True)
            results.append(measure(pool, size, plan["events"], plan["warmup"], plan["timer"]))
    return {"runs": results}, [table(results)]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
