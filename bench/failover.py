"""Failover time of celery-stoker with real workers: SIGTERM and SIGKILL of the leader.

Starts its own redis-server and three ``celery worker`` processes running the
test recorder app, then, round after round, stops the leader and measures the
time from the signal to the next leader's ``now_leader`` callback starting.
The stopped worker is restarted as a follower before the next round.

    python bench/failover.py --rounds 10 --ttl 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.redis_server import RedisServer  # noqa: E402
from support.workers import Fleet, Records, wait_for  # noqa: E402


def measure(kind: str, rounds: int, ttl: float, pool: str) -> list[float]:
    server = RedisServer()
    server.start()
    records = Records(server.client())
    fleet = Fleet(
        "tests.apps.recorder",
        env={"STOKER_TEST_BROKER": server.url_for(0), "STOKER_TEST_TTL": str(ttl)},
        pool=pool,
    )
    times: list[float] = []
    try:
        for i in (1, 2, 3):
            fleet.start(f"b{i}@%h")
        wait_for(lambda: records.of("now_leader"), 60, what="first leader")
        for _ in range(rounds):
            leader = records.of("now_leader")[-1]
            # Every follower must be waiting on the lease before we cut the leader.
            wait_for(lambda: len([w for w in fleet.workers if w.alive()]) == 3, 30)
            time.sleep(ttl)  # settle: followers observed the current term
            victim = fleet.by_node(leader.host)
            seen = len(records.of("now_leader"))
            t0 = time.time()
            if kind == "sigterm":
                victim.sigterm()
            else:
                victim.sigkill()
            new = wait_for(lambda s=seen: records.of("now_leader")[s:], ttl * 4 + 10, what="next")
            times.append(new[0].at - t0)
            if kind == "sigterm":
                victim.wait_exit(30)
            fleet.workers.remove(victim)
            fleet.start(victim.name)
    finally:
        fleet.cleanup()
        server.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--pool", default="solo")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    results = {}
    print(f"failover, {args.rounds} rounds, TTL {args.ttl} s, pool {args.pool}")
    print(f"{'fault':<10}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for kind in ("sigterm", "sigkill"):
        times = [t * 1000 for t in measure(kind, args.rounds, args.ttl, args.pool)]
        results[kind] = {"median_ms": statistics.median(times), "min_ms": min(times),
                         "max_ms": max(times), "rounds_ms": times}
        print(f"{kind:<10}{statistics.median(times):>12.1f}{min(times):>10.1f}{max(times):>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"ttl": args.ttl, "pool": args.pool, **results}, indent=2))


if __name__ == "__main__":
    main()
