"""Dispatch latency: from the leader raising an event to its callback starting in the pool.

One ``celery worker`` (prefork, then solo) runs ``bench/apps/dispatch_app.py``:
a Stoker whose ``next_timer_in`` returns a short fixed interval, so the
leader raises a ``timer`` event every few tens of milliseconds.  For each
event the app records when the worker's main process published the dispatch
task and when the callback started in the pool; the latency is the
difference, on one machine's clock.  The table also shows the whole loop the
activator runs per event (the callback's report back, the wait for the
report, the timer): end of one callback to the publish of the next, minus the
timer interval.

    python -m bench.dispatch --mode quick
"""

from __future__ import annotations

import json
from typing import Any

from bench.common import (
    Table,
    celery_worker,
    fmt_num,
    run_standalone,
    start_redis,
    summarize,
)
from celery_stoker.testing import wait_for

APP = "bench.apps.dispatch_app"
#: Events per pool, and the first ones left out (imports, first connections).
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"events": 10, "warmup": 3, "timer": 0.05, "pools": ["prefork", "solo"]},
    "quick": {"events": 80, "warmup": 10, "timer": 0.05, "pools": ["prefork", "solo"]},
    "full": {"events": 1000, "warmup": 20, "timer": 0.05, "pools": ["prefork", "solo"]},
}
TARGET_P50 = 0.010


def measure(pool: str, events: int, warmup: int, timer: float) -> dict[str, Any]:
    """Run one worker until ``events`` timer events started; return both latencies."""
    server = start_redis()
    client = server.client()
    env = {"BENCH_BROKER": server.url_for(0), "BENCH_TIMER": str(timer)}
    worker = celery_worker("d1@%h", APP, env, pool=pool).start()
    try:
        worker.wait_ready()
        wait_for(
            lambda: client.llen("disp:start") >= events + warmup + 1,
            (events + warmup) * (timer + 0.5) + 30,
            0.1,
            what=f"{events} events on {pool}",
        )
    finally:
        worker.stop(20)
        pubs = {d["seq"]: d["at"] for d in map(json.loads, client.lrange("disp:pub", 0, -1))}
        starts = [json.loads(x) for x in client.lrange("disp:start", 0, -1)]
        server.close()
    timers = [s for s in starts if s["event"] == "timer" and s["seq"] in pubs][warmup:]
    latency = [s["at"] - pubs[s["seq"]] for s in timers][:events]
    ends = {s["prev_seq"]: s["prev_end"] for s in starts if s.get("prev_seq") is not None}
    loop = []
    for s in timers[:events]:
        previous = s["seq"] - 1
        if previous in ends:
            loop.append(pubs[s["seq"]] - ends[previous] - timer)
    return {
        "pool": pool,
        "timer_s": timer,
        "events": len(latency),
        "dispatch": summarize(latency),
        "dispatch_s": latency,
        "loop_overhead": summarize(loop),
    }


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(
        "Dispatch latency: activator publishes the event -> callback starts in the pool",
        ["pool", "events", "p50", "p95", "min", "max", "target p50 <= 10 ms", "loop overhead p50"],
    )
    for r in results:
        d, loop = r["dispatch"], r["loop_overhead"]
        t.add(
            r["pool"],
            r["events"],
            fmt_num(d["median"] * 1000, " ms"),
            fmt_num(d["p95"] * 1000, " ms"),
            fmt_num(d["min"] * 1000, " ms"),
            fmt_num(d["max"] * 1000, " ms"),
            "yes" if d["median"] <= TARGET_P50 else "NO",
            fmt_num(loop["median"] * 1000 if loop["median"] is not None else None, " ms"),
        )
    t.notes.append(
        "loop overhead: end of one callback -> its report -> the activator's timer -> "
        "publish of the next event, minus the timer interval"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    """The table of a saved ``dispatch.json``."""
    return [table(data["runs"])]


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    results = []
    for pool in plan["pools"]:
        print(f"  dispatch latency, -P {pool}: {plan['events']} timer events", flush=True)
        results.append(measure(pool, plan["events"], plan["warmup"], plan["timer"]))
    return {"runs": results}, [table(results)]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
