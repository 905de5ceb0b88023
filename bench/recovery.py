"""Recovery: from the loss of a pool process mid-callback to the Stoker's next event.

One prefork worker runs ``bench/apps/recovery_app.py``, a Stoker on a short
timer.  Each round makes one timer callback lose its process, either from
inside (``os._exit(9)``, as a crash in a C extension would) or from outside
(``SIGKILL`` sent to the pool process while the callback runs, as the OOM
killer does), and measures the time from that loss to the start of the
Stoker's next callback.  Before this release the Stoker waited out a 300 s
report timeout instead (and kept the lease meanwhile).

    python -m bench.recovery --mode quick
"""

from __future__ import annotations

import json
import os
import signal
import time
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

APP = "bench.apps.recovery_app"
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"rounds": 2, "timer": 0.1},
    "quick": {"rounds": 10, "timer": 0.1},
    "full": {"rounds": 10, "timer": 0.1},
}
#: What the Stoker waited before: the report timeout of 0.1.0.
BEFORE_S = 300.0


def measure(how: str, rounds: int, timer: float) -> dict[str, Any]:
    """``rounds`` losses of the pool process (``exit`` or ``sigkill``), each timed."""
    server = start_redis()
    client = server.client()
    env = {"BENCH_BROKER": server.url_for(0), "BENCH_TIMER": str(timer)}
    worker = celery_worker("r1@%h", APP, env, pool="prefork", concurrency=2).start()
    gaps: list[float] = []
    try:
        worker.wait_ready()
        wait_for(lambda: client.llen("rec:start") >= 3, 30, 0.05, what="timer events")
        for n in range(rounds):
            client.set("rec:fault", "exit" if how == "exit" else "hang")
            wait_for(lambda n=n: client.llen("rec:lost") > n, 30, 0.01, what="a lost callback")
            lost = json.loads(client.lindex("rec:lost", n))
            lost_at = lost["at"]
            if how == "sigkill":
                time.sleep(0.05)  # the callback is well inside its sleep
                os.kill(lost["pid"], signal.SIGKILL)
                lost_at = time.time()

            def next_start(at: float = lost_at) -> float | None:
                starts = [json.loads(x)["at"] for x in client.lrange("rec:start", -5, -1)]
                later = [s for s in starts if s > at]
                return min(later) if later else None

            started = wait_for(next_start, 30, 0.005, what="the next timer")
            gaps.append(started - lost_at)
            time.sleep(3 * timer)  # a few ordinary timers between rounds
    finally:
        worker.stop(20)
        server.close()
    return {
        "how": how,
        "timer_s": timer,
        "rounds": len(gaps),
        "gap": summarize(gaps),
        "gaps_s": gaps,
    }


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(
        "Recovery: pool process lost mid-callback -> the Stoker's next event starts",
        ["loss", "rounds", "timer", "median", "max", "before (0.1.0)"],
    )
    for r in results:
        g = r["gap"]
        t.add(
            "os._exit(9) inside" if r["how"] == "exit" else "SIGKILL from outside",
            r["rounds"],
            fmt_num(r["timer_s"] * 1000, " ms"),
            fmt_num(g["median"] * 1000, " ms"),
            fmt_num(g["max"] * 1000, " ms"),
            f"{BEFORE_S:.0f} s (report timeout)",
        )
    t.notes.append(
        "includes the Stoker's timer interval: the next event is the next timer, sent at "
        "the Stoker's last interval after the loss is known"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    """The table of a saved ``recovery.json``."""
    return [table(data["runs"])]


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    results = []
    for how in ("exit", "sigkill"):
        print(f"  recovery, {how}: {plan['rounds']} rounds", flush=True)
        results.append(measure(how, plan["rounds"], plan["timer"]))
    return {"runs": results}, [table(results)]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
