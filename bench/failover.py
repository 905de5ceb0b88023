"""Failover time: celery-stoker with three real workers, beside two RedBeat beats.

celery-stoker: three ``celery worker`` processes run the test recorder app
(``tests/apps/recorder.py``), whose Stoker records every callback with its
start time.  Round after round the leader is stopped -- SIGTERM (clean stop),
SIGKILL of its whole process group (crash) or a partition (its broker and
``stoker_url`` go through a TCP proxy that is blackholed) -- and the figure is
the time from the fault to the new leader's ``now_leader`` callback starting
in its pool.  The victim is then restarted as a follower.  Before a crash or a
partition the bench waits a random part of a renew interval, so the fault
lands at a random point of the leader's renewal cycle, as a real crash would.

RedBeat, the peer: two ``celery beat -S redbeat.RedBeatScheduler`` processes
of ``bench/apps/beat_app.py`` (a task every 0.5 s) at RedBeat's defaults and
at ``beat_max_loop_interval=5``; the figure is the time from the fault to the
first task the new beat sends (and, as the issue asks, the gap from the old
beat's last send).  The standby polls RedBeat's lock every loop interval, so
before each fault the bench waits a random part of that interval (when the
cap allows): otherwise the phase of that poll, not RedBeat, would set the
result.  A round that exceeds its cap is reported as ``>= cap``.

RedBeat scenarios run concurrently with each other (each pair with its own
Redis): their results are whole seconds to minutes, quantised by poll
intervals, and running them one after another would take hours.
celery-stoker's are run alone, one after another.

    python -m bench.failover --mode quick
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery.beat import DEFAULT_MAX_INTERVAL

from bench.common import (
    RunDir,
    Table,
    celery_worker,
    cleanup_all,
    command,
    fmt_duration,
    install_signal_handlers,
    on_cleanup,
    print_table,
    start_redis,
    summarize,
    write_json,
)
from celery_stoker.lease import Holder, lease_channel, lease_key
from celery_stoker.testing import ManagedProcess, RedisServer, WorkerProcess, wait_for
from tests.support.tcp_proxy import TcpProxy
from tests.support.workers import Record, Records

KINDS = ("sigterm", "sigkill", "partition")
RECORDER_APP = "tests.apps.recorder"
RECORDER_STOKER = "recorder"
BEAT_APP = "bench.apps.beat_app"
BEAT_PERIOD = 0.5


@dataclass
class StokerPlan:
    """One TTL's rounds per fault kind."""

    ttl: float
    rounds: dict[str, int]


@dataclass
class BeatPlan:
    """One RedBeat scenario: a configuration and a fault, with a cap per round."""

    config: str  # "defaults" or "max_loop=5"
    max_loop: float | None
    kind: str
    rounds: int
    cap: float
    #: Start before the celery-stoker measurements and run alongside them: for
    #: rounds at RedBeat's defaults (5 to 30 min each) during which the beats
    #: mostly sleep (the standby in its lock poll; a leader ticks twice a second).
    background: bool = False

    @property
    def loop_interval(self) -> float:
        """How often the standby polls RedBeat's lock (redis-py Lock ``sleep``)."""
        return self.max_loop or DEFAULT_MAX_INTERVAL

    @property
    def lock_timeout(self) -> float:
        """RedBeat's default lock timeout: five loop intervals."""
        return self.loop_interval * 5

    @property
    def slowest(self) -> float:
        """The longest failover RedBeat's arithmetic allows for this fault."""
        if self.kind == "sigterm":
            return self.loop_interval
        return self.lock_timeout + self.loop_interval


def _beats(
    config: str, max_loop: float | None, rounds: dict[str, int], caps: dict[str, float]
) -> list[BeatPlan]:
    return [
        BeatPlan(config, max_loop, kind, rounds[kind], caps[kind])
        for kind in KINDS
        if rounds.get(kind)
    ]


PLANS: dict[str, tuple[list[StokerPlan], list[BeatPlan]]] = {
    "smoke": (
        [StokerPlan(1.0, {"sigterm": 1, "sigkill": 1, "partition": 1})],
        _beats("defaults", None, {"sigterm": 1}, {"sigterm": 2.0})
        + _beats("max_loop=5", 5, {"sigterm": 1}, {"sigterm": 8.0}),
    ),
    "quick": (
        [
            StokerPlan(2.0, {"sigterm": 5, "sigkill": 3, "partition": 3}),
            StokerPlan(10.0, {"sigterm": 3, "sigkill": 2, "partition": 2}),
        ],
        _beats(
            "defaults",
            None,
            {"sigterm": 1, "sigkill": 1, "partition": 1},
            {"sigterm": 10.0, "sigkill": 10.0, "partition": 10.0},
        )
        + _beats(
            "max_loop=5",
            5,
            {"sigterm": 3, "sigkill": 1, "partition": 1},
            {"sigterm": 10.0, "sigkill": 40.0, "partition": 40.0},
        ),
    ),
    "full": (
        [
            StokerPlan(2.0, {"sigterm": 20, "sigkill": 20, "partition": 20}),
            StokerPlan(10.0, {"sigterm": 20, "sigkill": 20, "partition": 20}),
        ],
        # RedBeat's defaults: a clean stop waits for the standby's 300 s poll, a
        # crash for the 25 min lock: a few rounds, measured to the end.
        [
            BeatPlan("defaults", None, "sigterm", 6, 400.0, background=True),
            BeatPlan("defaults", None, "sigkill", 1, 2000.0, background=True),
            BeatPlan("defaults", None, "partition", 1, 2000.0, background=True),
            *_beats(
                "max_loop=5",
                5,
                {"sigterm": 20, "sigkill": 20, "partition": 20},
                {"sigterm": 30.0, "sigkill": 60.0, "partition": 60.0},
            ),
        ],
    ),
}


# --------------------------------------------------------------------------- celery-stoker


@dataclass
class Member:
    """One worker of the fleet, and the proxy its Redis traffic goes through (if any)."""

    name: str
    worker: WorkerProcess
    proxy: TcpProxy | None = None

    @property
    def node(self) -> str:
        return self.worker.node


class StokerFleet:
    """Three recorder workers on one Redis, optionally each behind its own TCP proxy."""

    def __init__(
        self, server: RedisServer, ttl: float, pool: str, *, proxied: bool, prefix: str
    ) -> None:
        self.server = server
        self.ttl = ttl
        self.pool = pool
        self.proxied = proxied
        self.client = server.client()
        self.records = Records(self.client)
        self.members: dict[str, Member] = {}
        self.names = [f"{prefix}{i}@%h" for i in (1, 2, 3)]

    def start(self, name: str) -> Member:
        proxy = None
        url = self.server.url_for(0)
        if self.proxied:
            proxy = TcpProxy("127.0.0.1", self.server.port).start()
            on_cleanup(proxy.stop)
            url = f"redis://127.0.0.1:{proxy.port}/0"
        env = {
            "STOKER_TEST_BROKER": url,
            "STOKER_TEST_URL": url,
            "STOKER_TEST_RECORD_URL": self.server.url_for(0),
            "STOKER_TEST_TTL": str(self.ttl),
        }
        worker = celery_worker(name, RECORDER_APP, env, pool=self.pool).start()
        member = self.members[name] = Member(name, worker, proxy)
        return member

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)
        for member in self.members.values():
            member.worker.wait_ready()

    def holder(self) -> Holder | None:
        raw = self.client.get(lease_key("stoker", RECORDER_STOKER))
        return Holder.parse(raw, None) if raw else None

    def subscribers(self) -> int:
        channel = lease_channel("stoker")
        return int(dict(self.client.pubsub_numsub(channel)).get(channel.encode(), 0))

    def wait_steady(self, settle: float) -> Member:
        """Three live workers, all listening for releases, one of them leading; then settle."""
        wait_for(
            lambda: all(m.worker.alive() for m in self.members.values()), 5, 0.01, what="workers"
        )
        wait_for(lambda: self.subscribers() >= 3, 60, 0.01, what="three lease listeners")

        def leader() -> Member | None:
            """The holder, once it acts: its now_leader ran (a first term on a fresh
            Redis waits out one TTL before it acts)."""
            holder = self.holder()
            if holder is None or not any(
                r.token == holder.token for r in self.records.of("now_leader")
            ):
                return None
            for member in self.members.values():
                if member.node == holder.hostname:
                    return member
            return None

        wait_for(leader, self.ttl * 3 + 30, 0.01, what="a leader")
        time.sleep(settle)
        found = leader()
        assert found is not None
        return found

    def stop_member(self, member: Member, graceful: bool) -> None:
        if graceful:
            member.worker.stop(30, sig=None)  # SIGTERM was sent: wait, then kill
        else:
            member.worker.kill()
        if member.proxy is not None:
            member.proxy.stop()
        del self.members[member.name]

    def close(self) -> None:
        for member in list(self.members.values()):
            self.stop_member(member, graceful=False)


def _hook_at(records: Records, which: str, token: int) -> float | None:
    """When the recorder's in-process hook ``which`` (started/stopping) ran for ``token``."""
    for hook in records.raw("hook"):
        if hook.get("hook") == which and int(hook.get("token", -1)) == token:
            return float(hook["at"])
    return None


def stoker_rounds(
    fleet: StokerFleet, kind: str, rounds: int, settle: float
) -> list[dict[str, Any]]:
    """Run ``rounds`` faults of one kind; each result holds the failover time in seconds."""
    renew = fleet.ttl / 3
    out: list[dict[str, Any]] = []
    for i in range(rounds):
        victim = fleet.wait_steady(settle)
        if kind != "sigterm":
            time.sleep(random.uniform(0, renew))  # a random point of the renewal cycle
        holder = fleet.holder()
        assert holder is not None and holder.hostname == victim.node
        seen = len(fleet.records.of("now_leader"))
        t0 = time.time()
        if kind == "sigterm":
            victim.worker.signal(signal.SIGTERM)
        elif kind == "sigkill":
            victim.worker.kill()
        else:
            assert victim.proxy is not None
            victim.proxy.blackhole()

        def new_leader(seen: int = seen) -> list[Record]:
            return fleet.records.of("now_leader")[seen:]

        new = wait_for(new_leader, fleet.ttl * 2 + 20, 0.01, what=f"a new leader after {kind}")[0]
        stopped_at = _hook_at(fleet.records, "stopping", holder.token or -1)
        elected_at = _hook_at(fleet.records, "started", new.token)
        out.append(
            {
                "round": i + 1,
                "seconds": new.started - t0,
                "victim": victim.node,
                "new_leader": new.host,
                "old_token": holder.token,
                "new_token": new.token,
                # How long before the new leader's first callback the old one stopped
                # acting (its leader_stopping hook); None after SIGKILL (no hook runs).
                "handover_gap_s": None if stopped_at is None else new.started - stopped_at,
                # Where the time went: fault -> new leader won the lease (its
                # leader_started hook), then -> now_leader started in its pool.
                "elected_after_s": None if elected_at is None else elected_at - t0,
                "dispatch_s": None if elected_at is None else new.started - elected_at,
                "ok": new.host != victim.node and new.token > (holder.token or 0),
            }
        )
        fleet.stop_member(victim, graceful=kind == "sigterm")
        fleet.start(victim.name).worker.wait_ready()
    return out


def run_stoker(plan: StokerPlan, pool: str, settle: float) -> dict[str, Any]:
    """All fault kinds at one TTL: direct workers for signals, proxied ones for partitions."""
    server = start_redis()
    result: dict[str, Any] = {
        "ttl": plan.ttl,
        "renew_interval": plan.ttl / 3,
        "pool": pool,
        "kinds": {},
    }
    try:
        for proxied, kinds in ((False, ("sigterm", "sigkill")), (True, ("partition",))):
            todo = [k for k in kinds if plan.rounds.get(k)]
            if not todo:
                continue
            fleet = StokerFleet(
                server, plan.ttl, pool, proxied=proxied, prefix="p" if proxied else "b"
            )
            try:
                fleet.start_all()
                for kind in todo:
                    rounds = stoker_rounds(fleet, kind, plan.rounds[kind], settle)
                    result["kinds"][kind] = {
                        "rounds": rounds,
                        "summary": summarize([r["seconds"] for r in rounds]),
                    }
            finally:
                fleet.close()
    finally:
        server.close()
    return result


# --------------------------------------------------------------------------- RedBeat


class SendLog:
    """Reads ``beat:sent`` incrementally (it grows by two entries a second per beat)."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()
        self.offset = 0
        self.last_by_pid: dict[int, float] = {}
        self.sends: list[tuple[int, float]] = []

    def poll(self) -> None:
        raw = self.client.lrange("beat:sent", self.offset, -1)
        self.offset += len(raw)
        for item in raw:
            data = json.loads(item)
            pid, at = int(data["pid"]), float(data["at"])
            self.last_by_pid[pid] = max(at, self.last_by_pid.get(pid, 0.0))
            self.sends.append((pid, at))
        # Keep the list short: only the newest entries matter.
        if len(self.sends) > 2000:
            self.sends = self.sends[-1000:]

    def first_after(self, pid: int, t0: float) -> float | None:
        self.poll()
        for send_pid, at in self.sends:
            if send_pid == pid and at >= t0:
                return at
        return None

    def latest_sender(self) -> int | None:
        self.poll()
        return max(self.sends, key=lambda s: s[1])[0] if self.sends else None


class BeatPair:
    """Two RedBeat beats on one private Redis; either may be behind its own proxy."""

    def __init__(self, plan: BeatPlan) -> None:
        self.plan = plan
        self.server = start_redis()
        self.log = SendLog(self.server)
        self.beats: list[tuple[ManagedProcess, TcpProxy | None]] = []

    def start_beat(self, label: str) -> ManagedProcess:
        proxy = None
        url = self.server.url_for(0)
        if self.plan.kind == "partition":
            proxy = TcpProxy("127.0.0.1", self.server.port).start()
            on_cleanup(proxy.stop)
            url = f"redis://127.0.0.1:{proxy.port}/0"
        env = {
            "BENCH_BROKER": url,
            "BENCH_REDBEAT_URL": url,
            "BENCH_RECORD_URL": self.server.url_for(0),
            "BENCH_BEAT_PERIOD": str(BEAT_PERIOD),
            "BENCH_BEAT_MAX_LOOP": "" if self.plan.max_loop is None else str(self.plan.max_loop),
        }
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            BEAT_APP,
            "beat",
            "-S",
            "redbeat.RedBeatScheduler",
            "-l",
            "info",
        ]
        home = RunDir.sub("beat")  # its cwd too: beat may write files there
        beat = command(label, args, env, cwd=home).start()
        self.beats.append((beat, proxy))
        return beat

    def wait_started(self, beat: ManagedProcess) -> None:
        """Until the beat has asked for the lock (it logs ``Starting...`` just before)."""

        def started() -> bool:
            if not beat.alive():
                raise RuntimeError(f"beat exited:\n{beat.log()[-3000:]}")
            return "beat: Starting..." in beat.log()

        wait_for(started, 60, 0.05, what="beat start")
        time.sleep(1.0)

    def start_both(self) -> None:
        """A leader that is sending, then a standby that has tried the lock once."""
        first = self.start_beat("a")
        wait_for(
            lambda: self.log.first_after(first.pid, 0.0), 60, 0.01, what="the first beat's sends"
        )
        second = self.start_beat("b")
        self.wait_started(second)

    def remove(self, beat: ManagedProcess, graceful: bool) -> None:
        for item in list(self.beats):
            if item[0] is beat:
                if graceful:
                    beat.stop(30, sig=None)  # SIGTERM was sent: wait, then kill
                else:
                    beat.kill()
                if item[1] is not None:
                    item[1].stop()
                self.beats.remove(item)

    def reset(self) -> None:
        """After a capped round: stop everything and clear the lock, as after an outage."""
        for beat, _ in list(self.beats):
            self.remove(beat, graceful=False)
        self.server.client().delete("redbeat::lock")

    def close(self) -> None:
        self.reset()
        self.server.close()


def beat_rounds(plan: BeatPlan, stop: threading.Event) -> dict[str, Any]:
    """Run one RedBeat scenario; each result holds the fault-to-first-send time."""
    pair = BeatPair(plan)
    rounds: list[dict[str, Any]] = []
    try:
        pair.start_both()
        for i in range(plan.rounds):
            if stop.is_set():
                break
            leader_pid = pair.log.latest_sender()
            victim = next(b for b, _ in pair.beats if b.pid == leader_pid)
            standby = next(b for b, _ in pair.beats if b is not victim)
            # A random phase of the standby's lock poll, when the cap leaves room for
            # the slowest failover the configuration allows (else the round is capped
            # anyway and waiting would only make the run longer).
            if plan.cap >= plan.slowest + 5:
                stop.wait(random.uniform(0, plan.loop_interval))
            last_old = pair.log.last_by_pid.get(victim.pid)
            t0 = time.time()
            if plan.kind == "sigterm":
                victim.signal(signal.SIGTERM)
            elif plan.kind == "sigkill":
                victim.kill()
            else:
                proxy = next(p for b, p in pair.beats if b is victim)
                assert proxy is not None
                proxy.blackhole()
            deadline = time.monotonic() + plan.cap
            first: float | None = None
            while first is None and time.monotonic() < deadline and not stop.is_set():
                first = pair.log.first_after(standby.pid, t0)
                if first is None:
                    time.sleep(0.02)
            if stop.is_set():
                break
            pair.log.poll()
            last_old = pair.log.last_by_pid.get(victim.pid, last_old)
            capped = first is None
            rounds.append(
                {
                    "round": i + 1,
                    "seconds": plan.cap if first is None else first - t0,
                    "capped": capped,
                    "gap_from_last_send_s": None
                    if first is None or last_old is None
                    else first - last_old,
                }
            )
            if capped:
                pair.reset()
                if i + 1 < plan.rounds:
                    pair.start_both()
            else:
                pair.remove(victim, graceful=plan.kind == "sigterm")
                pair.wait_started(pair.start_beat(f"r{i}"))
    finally:
        pair.close()
    capped_n = sum(1 for r in rounds if r["capped"])
    gaps = [r["gap_from_last_send_s"] for r in rounds if r["gap_from_last_send_s"] is not None]
    return {
        **asdict(plan),
        "loop_interval": plan.loop_interval,
        "lock_timeout": plan.lock_timeout,
        "rounds": rounds,
        "summary": summarize([r["seconds"] for r in rounds], capped=capped_n),
        "gap_summary": summarize(gaps),
    }


def implied_redbeat(loop: float, period: float = BEAT_PERIOD) -> dict[str, Any]:
    """What RedBeat's own arithmetic implies for a schedule with a task every ``period``.

    The standby polls the lock once per loop interval, so after a clean stop it
    takes over 0 to one loop later.  The leader extends the lock to five loops
    at every tick (at least every ``min(period, loop)``), so after a crash the
    lock has that long left, less up to one tick, and the standby's next poll
    comes up to one loop after it expires.
    """
    lock = loop * 5
    return {
        "loop_interval": loop,
        "lock_timeout": lock,
        "sigterm_range_s": [0.0, loop],
        "sigterm_mean_s": loop / 2,
        "crash_range_s": [lock - min(period, loop), lock + loop],
    }


# --------------------------------------------------------------------------- tables


def _cell(summary: dict[str, Any], key: str) -> str:
    value = summary.get(key)
    lower = bool(summary.get("capped")) and key in ("median", "max", "p95")
    if key == "min" and summary.get("capped") == summary.get("n"):
        lower = True
    return fmt_duration(value, lower_bound=lower)


@dataclass
class FailoverResult:
    """Everything one run of this bench measured."""

    stoker: list[dict[str, Any]] = field(default_factory=list)
    redbeat: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "stoker": self.stoker,
            "redbeat": self.redbeat,
            "redbeat_implied": {
                "defaults": implied_redbeat(DEFAULT_MAX_INTERVAL),
                "max_loop=5": implied_redbeat(5),
            },
        }


def render(data: dict[str, Any]) -> list[Table]:
    """The tables of a saved ``failover.json``."""
    result = FailoverResult(stoker=data.get("stoker", []), redbeat=data.get("redbeat", []))
    pool = result.stoker[0]["pool"] if result.stoker else "prefork"
    return tables(result, pool)


def tables(result: FailoverResult, pool: str) -> list[Table]:
    out = []
    t = Table(
        f"Failover: celery-stoker, 3 workers (-P {pool}), fault -> new leader's now_leader starts",
        [
            "TTL",
            "fault",
            "rounds",
            "median",
            "min",
            "max",
            "p95",
            "target",
            "met",
            "lease won after",
            "then dispatch",
        ],
    )
    for run in result.stoker:
        ttl, renew = run["ttl"], run["renew_interval"]
        for kind in KINDS:
            if kind not in run["kinds"]:
                continue
            s = run["kinds"][kind]["summary"]
            rounds = run["kinds"][kind]["rounds"]
            won = summarize([r["elected_after_s"] for r in rounds if r.get("elected_after_s")])
            disp = summarize([r["dispatch_s"] for r in rounds if r.get("dispatch_s")])
            if kind == "sigterm":
                target, met = "p95 <= 50 ms", s["p95"] <= 0.050
            else:
                bound = ttl + renew
                target, met = f"max <= {bound:.2f} s", s["max"] <= bound
            t.add(
                f"{ttl:g} s",
                kind,
                s["n"],
                _cell(s, "median"),
                _cell(s, "min"),
                _cell(s, "max"),
                _cell(s, "p95"),
                target,
                "yes" if met else "NO",
                fmt_duration(won["median"]),
                fmt_duration(disp["median"]),
            )
    margins = []  # (label, smallest gap) per TTL and fault with a leader_stopping hook
    for run in result.stoker:
        for kind, data in run["kinds"].items():
            gaps = [r["handover_gap_s"] for r in data["rounds"] if r["handover_gap_s"] is not None]
            if gaps:
                margins.append((f"{kind} at TTL {run['ttl']:g} s", min(gaps)))
    bad = [
        r
        for run in result.stoker
        for k in run["kinds"].values()
        for r in k["rounds"]
        if not r["ok"]
    ]
    if margins:
        overlap = [label for label, gap in margins if gap <= 0]
        t.notes.append(
            "old leader stopped acting (its leader_stopping hook) before the new one's first "
            "callback in every round; smallest margin: "
            + ", ".join(f"{label} {fmt_duration(gap)}" for label, gap in margins)
            if not overlap
            else f"OVERLAP: a new leader acted before the old one stopped in {', '.join(overlap)}"
        )
    if bad:
        t.notes.append(f"{len(bad)} round(s) elected the victim again or reused a token")
    t.notes.append("target for crash/partition: TTL + renew interval (TTL/3)")
    t.notes.append(
        "lease won after: fault -> the new leader's in-process leader_started hook (medians); "
        "then dispatch: -> its now_leader callback starts in the pool"
    )
    out.append(t)

    b = Table(
        "Failover: RedBeat, 2 beats (-S redbeat.RedBeatScheduler), fault -> new beat's first send",
        [
            "config",
            "fault",
            "rounds",
            "median",
            "min",
            "max",
            "gap last->first",
            "implied by config",
        ],
    )
    for run in result.redbeat:
        s, g = run["summary"], run["gap_summary"]
        imp = implied_redbeat(run["loop_interval"])
        if run["kind"] == "sigterm":
            implied = f"0 - {imp['sigterm_range_s'][1]:g} s"
        else:
            lo, hi = imp["crash_range_s"]
            implied = f"{lo:g} - {hi:g} s"
        b.add(
            run["config"],
            run["kind"],
            s["n"],
            _cell(s, "median"),
            _cell(s, "min"),
            _cell(s, "max"),
            fmt_duration(g["median"]),
            implied,
        )
    b.notes.append(
        f"defaults: loop {DEFAULT_MAX_INTERVAL} s, lock {DEFAULT_MAX_INTERVAL * 5} s "
        f"(25 min); max_loop=5: loop 5 s, lock 25 s. The standby polls the lock once per loop."
    )
    b.notes.append(">= : the round hit its cap; the true figure is at least this")
    out.append(b)

    r = Table(
        "Failover ratio: RedBeat median / celery-stoker median (same run)",
        [
            "fault",
            *[
                f"{c} / stoker TTL {run['ttl']:g} s"
                for c in ("RedBeat defaults", "RedBeat max_loop=5")
                for run in result.stoker
            ],
        ],
    )
    for kind in KINDS:
        cells = []
        for config in ("defaults", "max_loop=5"):
            peer = next(
                (x for x in result.redbeat if x["config"] == config and x["kind"] == kind), None
            )
            for run in result.stoker:
                ours = run["kinds"].get(kind, {}).get("summary")
                if peer is None or ours is None or not ours.get("median"):
                    cells.append("-")
                    continue
                ratio = peer["summary"]["median"] / ours["median"]
                prefix = ">= " if peer["summary"]["capped"] else ""
                cells.append(f"{prefix}{ratio:,.0f}x" if ratio >= 10 else f"{prefix}{ratio:.1f}x")
        r.add(kind, *cells)
    out.append(r)
    return out


# --------------------------------------------------------------------------- driver


def run(mode: str, pool: str = "prefork") -> tuple[dict[str, Any], list[Table]]:
    """Measure celery-stoker alone, then every RedBeat scenario concurrently.

    Background scenarios (RedBeat crashes at its defaults) start first and run
    alongside everything: they are idle for 25 minutes and would otherwise
    double the length of a full run.
    """
    stoker_plans, beat_plans = PLANS[mode]
    settle = 1.0 if mode == "full" else 0.5  # after a restarted worker is ready
    result = FailoverResult()
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=len(beat_plans)) as executor:
        futures = {}
        try:
            for plan in beat_plans:
                if plan.background:
                    print(f"  RedBeat {plan.config} {plan.kind}: in the background", flush=True)
                    futures[id(plan)] = executor.submit(beat_rounds, plan, stop)
            for splan in stoker_plans:
                print(
                    f"  celery-stoker failover at TTL {splan.ttl:g} s: {splan.rounds}", flush=True
                )
                result.stoker.append(run_stoker(splan, pool, settle))
            rest = [p for p in beat_plans if not p.background]
            print(
                f"  RedBeat: {len(rest)} scenarios concurrently "
                f"(longest cap {max(p.cap for p in rest):g} s per round)",
                flush=True,
            )
            for plan in rest:
                futures[id(plan)] = executor.submit(beat_rounds, plan, stop)
            result.redbeat = [futures[id(plan)].result() for plan in beat_plans]
        except BaseException:
            stop.set()
            raise
    return result.to_json(), tables(result, pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(PLANS), default="quick")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo"])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    install_signal_handlers()
    try:
        data, tabs = run(args.mode, args.pool)
        for table in tabs:
            print_table(table)
        if args.json:
            write_json(args.json, data)
    finally:
        cleanup_all()


if __name__ == "__main__":
    main()
