"""Recycled pools: events, the user's tasks and a handover, with and without recycling.

Celery replaces a prefork pool process after ``--max-tasks-per-child N``
tasks, or once it grows past ``worker_max_memory_per_child``.  Each row runs
``bench/apps/pools_app.py`` on prefork workers (2 processes) under one of:
no recycling, ``--max-tasks-per-child 1``, or ``worker_max_memory_per_child``
so low that every process is replaced after its first task.  It measures:

* **events / 20 s**: timer events of one Stoker (``next_timer_in`` 0.5 s, so
  about 40 expected) that started in the 20 s after the term's first event;
* **plain tasks / 20 s**: the pace Celery itself keeps under the same flags:
  a client sends the task ``pools.work(0)``, waits for it to finish, pauses
  0.5 s and sends the next (a worker without the plugin);
* **10 tasks, plugin / bare**: ten ``pools.work(0.2)`` sent at once, from the
  send to the last one done, on the leader of that Stoker and on a worker of
  the same app without the plugin;
* **handover**: two workers, both kept busy with the user's own short tasks
  (``pools.work(0.05)``, about two queued at any time, so their pools
  recycle as in production); SIGTERM the leader 0.2 s after its next event
  was handed to the pool, and time its lease's move (the new term in Redis)
  and the new leader's ``now_leader`` callback.

    python -m bench.pools --mode quick
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from typing import Any

import redis
from celery import Celery

from bench.common import Table, celery_worker, fmt_num, run_standalone, start_redis
from celery_stoker.testing import wait_for

APP = "bench.apps.pools_app"
WINDOW = 20.0
TIMER = 0.5
TASKS = 10
TASK_SECONDS = 0.2
#: Recycling flags: name -> (worker arguments, environment).
SHAPES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "no recycling": ((), {}),
    "--max-tasks-per-child 1": (("--max-tasks-per-child", "1"), {}),
    "max_memory_per_child 1 KB": ((), {"BENCH_MAX_MEMORY_KB": "1"}),
}
PLANS: dict[str, dict[str, Any]] = {
    "smoke": {"window": 5.0, "handovers": 1, "shapes": list(SHAPES)[:2]},
    "quick": {"window": WINDOW, "handovers": 2, "shapes": list(SHAPES)},
    "full": {"window": WINDOW, "handovers": 5, "shapes": list(SHAPES)},
    # The user's tasks alone, plugin and bare alternating, many rounds: one round
    # varies by a second or more (a bare worker meets the pool's 5 s race at random).
    "tasks": {"rounds": 8, "shapes": list(SHAPES)[1:]},
}


def _events(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange("pools:events", 0, -1)]


def _env(url: str, shape: str, **more: str) -> dict[str, str]:
    return {"BENCH_BROKER": url, "BENCH_TIMER": str(TIMER), **SHAPES[shape][1], **more}


def _worker(name: str, url: str, shape: str, **more: str) -> Any:
    return celery_worker(name, APP, _env(url, shape, **more), extra=SHAPES[shape][0]).start()


def event_pace(shape: str, window: float) -> int:
    """Timer events that started within ``window`` after the term's first event."""
    server = start_redis()
    client = server.client()
    worker = _worker("p1@%h", server.url_for(0), shape)
    try:
        wait_for(lambda: _events(client), 60, 0.05, what="the first event")
        first = _events(client)[0]["at"]
        wait_for(lambda: time.time() > first + window, window + 5, 0.1, what="the window")
        return len(
            [e for e in _events(client) if e["event"] == "timer" and e["at"] <= first + window]
        )
    finally:
        worker.stop(30)
        server.close()


def plain_pace(shape: str, window: float) -> int:
    """Celery's own pace under ``shape``: send, wait until done, pause, send again."""
    server = start_redis()
    client = server.client()
    worker = _worker("b1@%h", server.url_for(0), shape, BENCH_NO_STOKER="1")
    app = Celery("poolsclient", broker=server.url_for(0))
    try:
        worker.wait_ready()
        done = 0
        app.send_task("pools.work", args=[0])  # the first one pays for the imports
        wait_for(lambda: client.llen("pools:work") >= 1, 30, 0.01, what="a first task")
        started = time.monotonic()
        while time.monotonic() - started < window:
            app.send_task("pools.work", args=[0])
            want = done + 2
            wait_for(lambda w=want: client.llen("pools:work") >= w, 30, 0.01, what="a task")
            if time.monotonic() - started <= window:
                done += 1
            time.sleep(TIMER)
        return done
    finally:
        app.close()
        worker.stop(30)
        server.close()


def user_tasks(shape: str, plugin: bool) -> float:
    """Seconds from sending ten tasks to the last one done."""
    server = start_redis()
    client = server.client()
    more = {} if plugin else {"BENCH_NO_STOKER": "1"}
    worker = _worker("u1@%h", server.url_for(0), shape, **more)
    app = Celery("poolsclient", broker=server.url_for(0))
    try:
        worker.wait_ready()
        if plugin:
            wait_for(lambda: len(_events(client)) >= 3, 60, 0.05, what="the Stoker's events")
        app.send_task("pools.work", args=[0])  # imports, connections
        wait_for(lambda: client.llen("pools:work") >= 1, 30, 0.01, what="a first task")
        time.sleep(1.0)  # let the pool settle
        started = time.time()
        for _ in range(TASKS):
            app.send_task("pools.work", args=[TASK_SECONDS])
        wait_for(lambda: client.llen("pools:work") >= TASKS + 1, 120, 0.01, what="ten tasks")
        last = max(json.loads(x)["at"] for x in client.lrange("pools:work", 1, -1))
        return last - started
    finally:
        app.close()
        worker.stop(30)
        server.close()


def handovers(shape: str, rounds: int) -> list[dict[str, float]]:
    """SIGTERM the leader ``rounds`` times: seconds to the new term, and to its now_leader."""
    server = start_redis()
    client = server.client()
    url = server.url_for(0)
    workers = {n: _worker(f"{n}@%h", url, shape) for n in ("h1", "h2")}
    out = []
    app = Celery("poolsclient", broker=url)
    feeding = threading.Event()

    def feed() -> None:
        """Keep both workers' pools busy with the user's own short tasks (and recycling)."""
        while not feeding.is_set():
            if client.llen("celery") < 2:
                app.send_task("pools.work", args=[0.05])
            feeding.wait(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        for w in workers.values():
            w.wait_ready()
        feeder.start()
        since = 0
        for _ in range(rounds):
            wait_for(
                lambda s=since: [e for e in _events(client)[s:] if e["event"] == "timer"][3:],
                60,
                0.05,
                what="the leader's timers",
            )
            last = _events(client)[-1]
            leader, token, seen = last["host"], last["token"], len(_events(client))
            old = next(w for w in workers.values() if w.node == leader)
            # Stop it once the next event has been handed to the pool (0.5 s after the
            # last one): in a recycled pool that event may wait for a process.
            wait_for(lambda t=last["at"]: time.time() > t + TIMER + 0.2, 5, 0.01)
            stopped = time.time()
            old.sigterm()

            def new_term(token: int = token) -> float | None:
                raw = client.get("stoker:{pools}:lease")
                lease = json.loads(raw) if raw else {}
                return time.time() if lease.get("token", token) != token else None

            moved = wait_for(new_term, 30, 0.002, what="the lease moves")
            first = wait_for(
                lambda s=seen: [e for e in _events(client)[s:] if e["event"] == "now_leader"],
                30,
                0.01,
                what="the new leader's now_leader",
            )[0]
            out.append({"lease": moved - stopped, "now_leader": first["at"] - stopped})
            old.wait_exit(60)
            name = old.name
            workers[name.split("@")[0]] = _worker(name, url, shape)
            workers[name.split("@")[0]].wait_ready()
            since = len(_events(client))
        return out
    finally:
        feeding.set()
        if feeder.is_alive():
            feeder.join(5)
        app.close()
        for w in workers.values():
            w.stop(30)
        server.close()


def table(results: list[dict[str, Any]]) -> Table:
    t = Table(
        "Recycled pools (prefork, 2 processes): events, the user's tasks, handover",
        [
            "recycling",
            "events / 20 s",
            "plain tasks / 20 s",
            f"{TASKS} tasks, plugin",
            f"{TASKS} tasks, bare",
            "handover: lease moved",
            "handover: now_leader",
        ],
    )
    for r in results:
        lease = [h["lease"] for h in r["handovers"]]
        first = [h["now_leader"] for h in r["handovers"]]
        t.add(
            r["shape"],
            r["events"],
            r["plain"],
            fmt_num(r["tasks_plugin"], " s", 2),
            fmt_num(r["tasks_bare"], " s", 2),
            fmt_num(max(lease), " s", 2) if lease else "-",
            fmt_num(max(first), " s", 2) if first else "-",
        )
    t.notes.append(
        f"events: timer events ({TIMER} s apart) started in the 20 s after the term's first "
        "event (40 expected); plain tasks: send, wait until done, pause 0.5 s, under the "
        "same flags without the plugin"
    )
    t.notes.append(
        f"{TASKS} tasks: {TASKS} x pools.work({TASK_SECONDS}) sent at once, to the last one "
        "done; handover: SIGTERM the leader -> new term in Redis / the new leader's "
        "now_leader starts (worst of the rounds)"
    )
    return t


def render(data: dict[str, Any]) -> list[Table]:
    return [tasks_table(data["tasks"])] if "tasks" in data else [table(data["runs"])]


def tasks_rounds(shape: str, rounds: int) -> dict[str, list[float]]:
    """``user_tasks`` with and without the plugin, alternating, ``rounds`` times each."""
    out: dict[str, list[float]] = {"plugin": [], "bare": []}
    for i in range(rounds):
        for plugin in (True, False) if i % 2 == 0 else (False, True):
            out["plugin" if plugin else "bare"].append(user_tasks(shape, plugin=plugin))
    return out


def tasks_table(results: list[dict[str, Any]]) -> Table:
    t = Table(
        f"{TASKS} user tasks on a recycled pool, with and without the plugin",
        [
            "recycling",
            "rounds",
            "plugin: median (min - max)",
            "bare: median (min - max)",
            "plugin / bare (medians)",
        ],
    )
    for r in results:
        plugin, bare = sorted(r["plugin"]), sorted(r["bare"])
        p50 = statistics.median(plugin)
        b50 = statistics.median(bare)
        t.add(
            r["shape"],
            len(plugin),
            f"{fmt_num(p50, ' s', 2)} ({plugin[0]:.2f} - {plugin[-1]:.2f})",
            f"{fmt_num(b50, ' s', 2)} ({bare[0]:.2f} - {bare[-1]:.2f})",
            f"{p50 / b50:.2f}",
        )
    t.notes.append(
        f"{TASKS} x pools.work({TASK_SECONDS}) sent at once, to the last one done; rounds "
        "alternate which goes first"
    )
    return t


def run(mode: str) -> tuple[dict[str, Any], list[Table]]:
    plan = PLANS[mode]
    if "rounds" in plan:
        runs = [{"shape": s, **tasks_rounds(s, plan["rounds"])} for s in plan["shapes"]]
        return {"tasks": runs}, [tasks_table(runs)]
    results = []
    for shape in plan["shapes"]:
        print(f"  pools: {shape}", flush=True)
        scale = WINDOW / plan["window"]
        results.append(
            {
                "shape": shape,
                "events": round(event_pace(shape, plan["window"]) * scale),
                "plain": round(plain_pace(shape, plan["window"]) * scale),
                "tasks_plugin": user_tasks(shape, plugin=True),
                "tasks_bare": user_tasks(shape, plugin=False),
                "handovers": handovers(shape, plan["handovers"]),
                "pid": os.getpid(),
            }
        )
    return {"runs": results}, [table(results)]


def main() -> None:
    run_standalone(__doc__.splitlines()[0], PLANS, run)


if __name__ == "__main__":
    main()
