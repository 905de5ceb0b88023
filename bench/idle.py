"""Idle cost: Redis commands of a leader and a follower, and a worker's CPU and RSS.

One idle fleet answers both questions, measured over the same windows:

* **Redis cost** (commands per minute).  The workers elect in their own Redis
  (``stoker_url``), separate from the broker, and a raw ``MONITOR`` on each
  attributes every command to the worker that sent it (by the client's port,
  looked up in ``/proc``).  At the default TTL (10 s) a leader renews each
  lease every TTL/3; a follower must not poll faster than once per TTL and,
  since renewals are announced on pub/sub, should send nothing at all.
* **Worker overhead**: CPU (main process and pool children) and RSS of an
  idle ``celery worker -P prefork -c 2`` without celery-stoker, and with
  ``StokerStep`` and three Stokers, as leader and as follower.

    python -m bench.idle --mode quick
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from bench.common import (
    CommandCounter,
    Table,
    by_owner,
    celery_worker,
    cpu_seconds,
    fmt_num,
    local_ports_to,
    process_tree,
    rss_bytes,
    run_standalone,
    start_redis,
    summarize,
    thread_count,
)
from celery_stoker.lease import Holder, lease_channel, lease_key
from celery_stoker.store import state_key
from celery_stoker.testing import WorkerProcess, wait_for

APP = "bench.apps.idle_app"
STOKERS = ("idle-a", "idle-b", "idle-c")
TTL = 10.0  # the default stoker_lease_ttl; the app does not set it
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"windows": 1, "window_s": 2.0, "settle_s": 1.5},
    "quick": {"windows": 2, "window_s": 20 / 3, "settle_s": 3.0},
    "full": {"windows": 6, "window_s": 60.0, "settle_s": 10.0},  # 18 renewals per window
}
ROLES = ("without stoker", "stoker leader", "stoker follower")


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    print(f"  idle fleet: {plan['windows']} windows of {plan['window_s']:g} s", flush=True)
    broker, stoker_redis = start_redis(), start_redis()
    sclient = stoker_redis.client()
    base = {"BENCH_BROKER": broker.url_for(0), "BENCH_STOKER_URL": stoker_redis.url_for(0)}
    workers: dict[str, WorkerProcess] = {}
    samples: dict[str, list[dict[str, Any]]] = {role: [] for role in ROLES}
    try:
        workers["without stoker"] = celery_worker(
            "plain@%h", APP, {**base, "BENCH_WITH_STOKER": "0"}
        ).start()
        workers["stoker leader"] = celery_worker(
            "lead@%h", APP, {**base, "BENCH_WITH_STOKER": "1"}
        ).start()
        for worker in workers.values():
            worker.wait_ready()

        def leads_all() -> bool:
            holders = [sclient.get(lease_key("stoker", name)) for name in STOKERS]
            return all(
                h is not None and Holder.parse(h, None).hostname == workers["stoker leader"].node
                for h in holders
            )

        wait_for(leads_all, 30, 0.01, what="the first Stoker worker to lead all three Stokers")
        # On a fresh Redis a first term waits out one TTL before it acts; wait until
        # each Stoker's first event has committed its state, so no window sees it.
        wait_for(
            lambda: all(sclient.exists(state_key("stoker", name)) for name in STOKERS),
            TTL * 2 + 30,
            0.01,
            what="the leader's first events",
        )
        workers["stoker follower"] = celery_worker(
            "follow@%h", APP, {**base, "BENCH_WITH_STOKER": "1"}
        ).start()
        workers["stoker follower"].wait_ready()
        channel = lease_channel("stoker")
        wait_for(
            lambda: dict(sclient.pubsub_numsub(channel)).get(channel.encode(), 0) >= 2,
            30,
            0.01,
            what="two lease listeners",
        )
        time.sleep(plan["settle_s"])  # start-up work and cluster_change events are over

        counters = {
            "broker": CommandCounter(broker.port).start(),
            "stoker": CommandCounter(stoker_redis.port).start(),
        }
        for _ in range(plan["windows"]):
            trees = {role: process_tree(w.pid) for role, w in workers.items()}
            cpu0 = {role: cpu_seconds(pids) for role, pids in trees.items()}
            for counter in counters.values():
                counter.take()
            t0 = time.monotonic()
            time.sleep(plan["window_s"])
            elapsed = time.monotonic() - t0
            counts = {name: c.take() for name, c in counters.items()}
            trees = {role: process_tree(w.pid) for role, w in workers.items()}
            cpu1 = {role: cpu_seconds(pids) for role, pids in trees.items()}
            split = {
                name: by_owner(
                    counts[name], {role: local_ports_to(trees[role], server.port) for role in ROLES}
                )
                for name, server in (("broker", broker), ("stoker", stoker_redis))
            }
            for role, worker in workers.items():
                samples[role].append(
                    {
                        "window_s": elapsed,
                        "cpu_percent": (cpu1[role] - cpu0[role]) / elapsed * 100,
                        "rss_main_mib": rss_bytes(worker.pid) / 2**20,
                        "rss_total_mib": sum(rss_bytes(p) for p in trees[role]) / 2**20,
                        "threads_main": thread_count(worker.pid),
                        "stoker_cmds_per_min": sum(split["stoker"][role].values()) / elapsed * 60,
                        "broker_cmds_per_min": sum(split["broker"][role].values()) / elapsed * 60,
                        "stoker_commands": dict(split["stoker"][role]),
                    }
                )
        for counter in counters.values():
            counter.stop()
    finally:
        for worker in workers.values():
            worker.stop(20)
        broker.close()
        stoker_redis.close()
    data = {
        "ttl": TTL,
        "renew_interval": TTL / 3,
        "stokers": len(STOKERS),
        "pool": "prefork -c 2",
        "roles": {
            role: {
                "samples": s,
                **{
                    key: summarize([x[key] for x in s])
                    for key in (
                        "cpu_percent",
                        "rss_main_mib",
                        "rss_total_mib",
                        "threads_main",
                        "stoker_cmds_per_min",
                        "broker_cmds_per_min",
                    )
                },
                "stoker_commands": dict(sum((Counter(x["stoker_commands"]) for x in s), Counter())),
            }
            for role, s in samples.items()
        },
    }
    return data, tables(data)


def _mmm(summary: dict[str, Any], digits: int | None = None) -> str:
    """median (min - max) in one cell."""
    if summary["median"] is None:
        return "-"
    med, lo, hi = (fmt_num(summary[k], digits=digits) for k in ("median", "min", "max"))
    return med if lo == hi else f"{med} ({lo} - {hi})"


def render(data: dict[str, Any]) -> list[Table]:
    """The tables of a saved ``idle.json``."""
    return tables(data)


def tables(data: dict[str, Any]) -> list[Table]:
    roles = data["roles"]
    n = data["stokers"]
    windows = len(roles[ROLES[0]]["samples"])
    cost = Table(
        f"Redis cost at the default TTL ({data['ttl']:g} s, renew every "
        f"{data['renew_interval']:.2f} s), commands per minute, median (min - max) over "
        f"{windows} windows",
        ["worker", "to stoker_url", f"per Stoker ({n})", "commands", "to the broker (Celery)"],
    )
    for role in ROLES:
        r = roles[role]
        per = {
            k: r["stoker_cmds_per_min"][k] / n if r["stoker_cmds_per_min"][k] is not None else None
            for k in ("median", "min", "max")
        }
        mix = ", ".join(f"{c} {v}" for c, v in sorted(r["stoker_commands"].items())) or "none"
        cost.add(
            role,
            _mmm(r["stoker_cmds_per_min"], 1),
            "-" if role == "without stoker" else _mmm(per, 1),
            mix,
            _mmm(r["broker_cmds_per_min"], 0),
        )
    follower = roles["stoker follower"]["stoker_cmds_per_min"]["max"]
    limit = 60 / data["ttl"] * n
    cost.notes.append(
        f"target: a follower polls no faster than once per TTL = {limit:g}/min for {n} Stokers; "
        f"measured max {follower:.1f}/min: {'met' if follower <= limit else 'MISSED'}"
    )
    cost.notes.append("commands: totals over all windows, by name (EVALSHA = the renew script)")

    over = Table(
        "Worker overhead: idle celery worker -P prefork -c 2, median (min - max) over windows",
        ["worker", "CPU %", "RSS main MiB", "RSS total MiB", "threads (main)"],
    )
    for role in ROLES:
        r = roles[role]
        over.add(
            role,
            _mmm(r["cpu_percent"], 2),
            _mmm(r["rss_main_mib"], 1),
            _mmm(r["rss_total_mib"], 1),
            _mmm(r["threads_main"], 0),
        )
    base = roles["without stoker"]
    for role in ROLES[1:]:
        d_cpu = roles[role]["cpu_percent"]["median"] - base["cpu_percent"]["median"]
        d_rss = roles[role]["rss_main_mib"]["median"] - base["rss_main_mib"]["median"]
        over.notes.append(
            f"{role}: {d_cpu:+.2f} CPU points, {d_rss:+.1f} MiB RSS (main process) "
            "vs without stoker"
        )
    return [cost, over]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
