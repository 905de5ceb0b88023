"""The chaos soak: a fleet of real workers under repeated random faults, then the promises checked.

Three ``celery worker`` processes run the recorder app with a fast timer, so the leader leaves
a trail of callbacks (token, host, time) in a Redis of their own that is never faulted.  Each
worker reaches the lease Redis (``stoker_url``) and the broker Redis through its own TCP proxy,
so any one of them can be cut off.  Faults come from a seeded schedule (the seed is printed;
``--chaos-seed`` replays it), in rounds that hold every kind once in random order:

* ``sigterm_leader`` - a clean stop of the leader (then it is started again);
* ``sigkill_leader`` - a crash of the leader and its pool (then started again);
* ``restart_worker`` - SIGTERM and start again of any worker, leader or follower;
* ``redis_restart`` - the lease Redis restarts empty (no persistence: every key is gone);
* ``partition_leader`` - the leader's lease and broker connections are black-holed for a
  while, then healed; it must rejoin as a follower without a restart.

``--chaos-store cluster`` runs the same soak with the lease store on a six-node Redis Cluster
(``stoker_transport_options = {"cluster": True}``; the broker stays a plain Redis).  A cluster
client learns every node's real address from the cluster itself, so the workers reach the
nodes directly (no proxy): the store's faults are the cluster's own instead of
``redis_restart`` and ``partition_leader``:

* ``primary_kill`` - SIGKILL of the primary that holds the Stoker's slot; its replica is
  promoted, and once a leader acts again the dead node is started again (it rejoins as the
  new primary's replica, so the next kill has a replica to promote);
* ``move_slot`` - the Stoker's slot moves to another primary while it leads (SETSLOT
  IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE): leadership is kept or moves once.

By default both stores run, each in its short form (``--chaos-store plain`` or ``cluster``
picks one).

Then, over the whole trail (callbacks and the in-process leader hooks): no two terms overlap in
time, tokens grow from term to term, no term has two hosts; and after every fault a leader
acted again within its bound.  ``--chaos-minutes`` sets how long faults are injected (default:
the short form CI runs, well under two minutes in all).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from support.tcp_proxy import TcpProxy
from support.workers import Fleet, Record, check_terms

from celery_stoker.testing import RedisServer, WorkerProcess, wait_for
from celery_stoker.testing.redis_cluster import RedisCluster, slot_of

pytestmark = [pytest.mark.chaos, pytest.mark.workers]

APP = "tests.apps.recorder"
TTL = 1.5
RENEW = TTL / 3
TIMER = 0.15
LEASE_KEY = "stoker:{recorder}:lease"
#: ``cluster-node-timeout`` of the soak's cluster (the ``stoker_redis_cluster`` fixture's).
NODE_TIMEOUT = 1.0
#: Slack for the trip of ``now_leader`` through the broker and a busy two-core machine.
SLACK = 0.5
#: Bound on the time from the fault (or from Redis answering again) to the first callback of
#: the next term: clean stop ~1 s (README: "within milliseconds"); crash and partition one TTL
#: plus one renew interval; Redis restart: the lease is taken within a second of Redis
#: answering, but the new term acts only once any earlier term must be over (README,
#: "Redis restarted empty"): at most one TTL after Redis answers.
BOUNDS = {
    "sigterm_leader": 1.0,
    "restart_worker": 1.0,
    "sigkill_leader": TTL + RENEW + SLACK,
    "partition_leader": TTL + RENEW + SLACK,
    "redis_restart": TTL + 2 * SLACK,
    # Cluster: the replica is promoted within about the node timeout; meanwhile the holder's
    # renewals fail, so its term may end and the next one starts on the promoted primary
    # (README, "Redis Cluster": cluster-node-timeout + TTL + renew + 1 s).
    "primary_kill": NODE_TIMEOUT + TTL + RENEW + 1.0,
    # A moved slot keeps its keys: the leader keeps its term, or it moves once.
    "move_slot": TTL + RENEW + SLACK,
}
KINDS = {
    "plain": ("sigterm_leader", "sigkill_leader", "restart_worker", "redis_restart",
              "partition_leader"),
    "cluster": ("sigterm_leader", "sigkill_leader", "restart_worker", "primary_kill",
                "move_slot"),
}  # fmt: skip
#: Minutes of faults in the short form of each store (what CI runs; ``--chaos-minutes`` sets
#: both).  The cluster's is shorter so the suite stays within its ten minutes.
SHORT_MINUTES = {"plain": 1.0, "cluster": 0.6}
#: How long past its bound a fault may go unanswered before the soak gives up on the fleet.
GIVE_UP_AFTER = 20.0


@dataclass
class Slot:
    """One worker's place in the fleet: its name, pool and proxies; incarnations come and go."""

    name: str
    pool: str
    lease_proxy: TcpProxy | None  # None on a cluster: the workers reach its nodes directly
    broker_proxy: TcpProxy
    worker: WorkerProcess | None = None
    incarnations: list[WorkerProcess] = field(default_factory=list)
    #: Incarnations this test stopped or killed on purpose (any other death is a failure).
    stopped: set[int] = field(default_factory=set)
    ready: bool = False

    @property
    def node(self) -> str:
        assert self.worker is not None
        return self.worker.node


@dataclass
class Fault:
    """One injected fault and what followed it."""

    kind: str
    target: str
    was_leader: bool
    token_before: int
    at: float = 0.0  # when it was injected
    took: float | None = None  # seconds to the next term's first callback; None: no new term
    new_token: int | None = None
    new_host: str | None = None
    note: str = ""

    @property
    def failover(self) -> bool:
        return self.new_token is not None

    @property
    def bound(self) -> float:
        return BOUNDS[self.kind]


def _record(data: dict[str, Any]) -> Record:
    return Record(
        event=data["event"],
        host=data["host"],
        token=int(data["token"]),
        at=float(data["at"]),
        reason=data.get("reason"),
        members=tuple(data.get("members") or ()),
        events=int(data.get("events") or 0),
        started=float(data.get("started") or data["at"]),
    )


class Trail:
    """What the recorder wrote, read incrementally (the lists grow for the whole soak)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.events: list[Record] = []
        self.hooks: list[Record] = []
        self._hooks_read = 0

    def poll(self) -> list[Record]:
        """Read the callbacks recorded since the last poll; return them."""
        new = [
            _record(json.loads(raw))
            for raw in self.client.lrange("rec:event", len(self.events), -1)
        ]
        self.events.extend(new)
        return new

    def poll_hooks(self) -> None:
        for raw in self.client.lrange("rec:hook", self._hooks_read, -1):
            self._hooks_read += 1
            data = json.loads(raw)
            self.hooks.append(
                Record(
                    event=f"hook:{data['hook']}",
                    host=data["host"],
                    token=int(data["token"]),
                    at=float(data["at"]),
                    reason=data.get("reason"),
                )
            )

    def highest_token(self) -> int:
        return max((r.token for r in self.events), default=0)


class Soak:
    """The fleet, the servers, the fault schedule and the figures."""

    def __init__(
        self,
        rng: random.Random,
        fleet: Fleet,
        lease_store: RedisServer | RedisCluster,
        broker_redis: RedisServer,
        trail: Trail,
        make_proxy: Callable[[int], TcpProxy],
        say: Callable[[str], None],
    ) -> None:
        self.rng = rng
        self.fleet = fleet
        self.lease_store = lease_store
        self.store = "cluster" if isinstance(lease_store, RedisCluster) else "plain"
        self.kinds = KINDS[self.store]
        self.broker_redis = broker_redis
        self.trail = trail
        self.say = say
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.slots = [
            Slot(
                name=f"w{i}@%h",
                pool=pool,
                lease_proxy=(
                    None if isinstance(lease_store, RedisCluster) else make_proxy(lease_store.port)
                ),
                broker_proxy=make_proxy(broker_redis.port),
            )
            for i, pool in enumerate(("prefork", "solo", "solo"), start=1)
        ]
        self._observer: redis.Redis | redis.RedisCluster = lease_store.client(
            socket_timeout=0.5, socket_connect_timeout=0.5
        )

    def close(self) -> None:
        self._observer.close()

    # ------------------------------------------------------------------ workers

    def start(self, slot: Slot) -> None:
        env = {"STOKER_TEST_BROKER": f"redis://127.0.0.1:{slot.broker_proxy.port}/0"}
        if isinstance(self.lease_store, RedisCluster):
            # A node that runs now; the client finds the others (and later ones) from it.
            env.update(STOKER_TEST_URL=self.lease_store.url, STOKER_TEST_CLUSTER="1")
        else:
            assert slot.lease_proxy is not None
            env["STOKER_TEST_URL"] = f"redis://127.0.0.1:{slot.lease_proxy.port}/0"
        slot.worker = self.fleet.start(slot.name, pool=slot.pool, concurrency=2, env=env)
        slot.incarnations.append(slot.worker)
        slot.ready = False

    def stop(self, slot: Slot, how: str) -> None:
        """SIGTERM (and wait for the exit) or SIGKILL the slot's current worker."""
        worker = slot.worker
        assert worker is not None
        slot.stopped.add(id(worker))
        if how == "kill":
            worker.sigkill()
        else:
            worker.sigterm()
            worker.wait_exit(30)

    def slot_of(self, node: str) -> Slot | None:
        for slot in self.slots:
            if slot.worker is not None and slot.worker.node == node:
                return slot
        return None

    def _all_ready(self) -> bool:
        for slot in self.slots:
            if not slot.ready:
                worker = slot.worker
                if worker is None or not worker.alive():
                    return False
                slot.ready = "activator(s) on" in worker.log()
                if not slot.ready:
                    return False
        return True

    # ------------------------------------------------------------------- leader

    def holder(self) -> tuple[str, int] | None:
        """Who holds the lease, read straight from the lease Redis (None if nobody, or down)."""
        try:
            raw = self._observer.get(LEASE_KEY)
        except (redis.RedisError, OSError):
            return None
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return str(data["host"]), int(data["token"])
        except (ValueError, KeyError, TypeError):
            return None

    def settle(self, timeout: float = 40.0) -> tuple[Slot, int]:
        """Wait until every worker runs and one leader acts: a timer of its term, just now."""
        since = time.time()

        def settled() -> tuple[Slot, int] | None:
            self.trail.poll()
            holder = self.holder()
            if holder is None or not self._all_ready():
                return None
            slot = self.slot_of(holder[0])
            if slot is None or slot.worker is None or not slot.worker.alive():
                return None
            for record in reversed(self.trail.events):
                if record.at < since:
                    return None
                if record.event == "timer" and record.token == holder[1]:
                    return slot, holder[1]
            return None

        return wait_for(settled, timeout, interval=0.05, what="one leader acting, all workers up")

    def wait_new_term(self, above: int, start: int, timeout: float) -> Record | None:
        """The first callback (not a shutdown) of a term with a token above ``above``."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            self.trail.poll()
            for record in self.trail.events[index:]:
                if record.token > above and record.event != "shutdown":
                    return record
            index = len(self.trail.events)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    # ------------------------------------------------------------------- faults

    def inject(self, kind: str) -> Fault:
        leader, token = self.settle()
        self.trail.poll()
        above = max(token, self.trail.highest_token())
        start = len(self.trail.events)
        target = leader
        if kind == "restart_worker":
            target = self.rng.choice(self.slots)
        fault = Fault(kind, target.node, target is leader, above)
        timeout = fault.bound + GIVE_UP_AFTER

        if kind in ("sigterm_leader", "sigkill_leader", "restart_worker"):
            at = time.time()
            self.stop(target, "kill" if kind == "sigkill_leader" else "term")
            if fault.was_leader:
                first = self.wait_new_term(above, start, timeout)
            else:
                # A follower went away and came back: the leader must not notice.
                self.start(target)
                first = self.wait_new_term(above, start, 2 * TTL)
            if target.worker is not None and not target.worker.alive():
                self.start(target)
        elif kind == "redis_restart":
            # Counted from the call, so the time Redis takes to stop and start is included:
            # an upper bound on the time from Redis answering again.
            assert isinstance(self.lease_store, RedisServer)
            at = time.time()
            self.lease_store.restart(empty=True)
            first = self.wait_new_term(above, start, timeout)
        elif kind in ("primary_kill", "move_slot"):
            at, first = self._cluster_fault(kind, fault, above, start)
        elif kind == "partition_leader":
            assert target.lease_proxy is not None
            at = time.time()
            target.lease_proxy.blackhole()
            target.broker_proxy.blackhole()
            first = self.wait_new_term(above, start, timeout)
            time.sleep(self.rng.uniform(0.3, 2.0))  # stay cut off a while after the failover
            assert target.worker is not None
            logged = len(target.worker.log())
            target.lease_proxy.heal()
            target.broker_proxy.heal()
            self._check_rejoined(target, fault, logged)
        else:
            raise AssertionError(kind)

        fault.at = at
        if first is not None:
            fault.took = first.at - at
            fault.new_host = first.host
            # A cluster fault may keep the term: that is no failover.
            fault.new_token = first.token if first.token > above else None
        self._judge(fault)
        self.faults.append(fault)
        took = "no new term" if fault.took is None else f"{fault.took:.3f}s -> {fault.new_host}"
        self.say(
            f"  {len(self.faults):3d} {kind:<17} {fault.target:<14} "
            f"{'leader' if fault.was_leader else 'follower':<8} {took} {fault.note}"
        )
        return fault

    def _cluster_fault(
        self, kind: str, fault: Fault, above: int, start: int
    ) -> tuple[float, Record | None]:
        """Kill the primary of the Stoker's slot, or move the slot; return (when, the first
        callback after the cluster serves the slot again of the term that leads once the
        fleet settles): a term that acts once more and then ends does not count."""
        cluster = self.lease_store
        assert isinstance(cluster, RedisCluster)
        slot = slot_of(LEASE_KEY)
        at = time.time()
        if kind == "primary_kill":
            dead, promoted = cluster.kill_primary_of(LEASE_KEY)
            fault.note = f"primary {dead.port} -> {promoted.port}"
        else:
            source = cluster.slot_owner(slot)
            to = self.rng.choice([p for p in cluster.primaries() if p is not source])
            cluster.move_slot(slot, to)
            fault.note = f"slot {slot} {source.port} -> {to.port}"
        served = time.time()
        first: Record | None = None
        try:
            _, token = self.settle(fault.bound + GIVE_UP_AFTER)
        except AssertionError:
            token = None
        if token is not None:
            first = next(
                (
                    r
                    for r in self.trail.events[start:]
                    if r.token == token and r.at >= served and r.event != "shutdown"
                ),
                None,
            )
            terms = sorted({r.token for r in self.trail.events[start:] if r.token > above})
            if kind == "move_slot" and len(terms) > 1:
                self.problems.append(
                    f"moving slot {slot} started {len(terms)} terms (kept or moved once "
                    f"expected): {terms}"
                )
        if kind == "primary_kill":
            cluster.revive(dead)  # back as the new primary's replica, for the next kill
        return at, first

    def _judge(self, fault: Fault) -> None:
        if not fault.was_leader:
            if fault.failover:
                self.problems.append(
                    f"restarting follower {fault.target} changed the leader: "
                    f"token {fault.token_before} -> {fault.new_token} on {fault.new_host}"
                )
            return
        if fault.took is None:
            self.problems.append(
                f"{fault.kind} of {fault.target}: no leader acted within "
                f"{fault.bound + GIVE_UP_AFTER:.1f}s"
            )
        elif fault.took > fault.bound:
            self.problems.append(
                f"{fault.kind} of {fault.target}: next leader acted after {fault.took:.3f}s, "
                f"bound {fault.bound:.2f}s"
            )
        if fault.kind == "partition_leader" and fault.new_host == fault.target:
            self.problems.append(f"the cut-off leader {fault.target} led again while cut off")

    def _check_rejoined(self, slot: Slot, fault: Fault, logged: int) -> None:
        """After the heal the old leader follows again: same process, no restart."""
        worker = slot.worker
        assert worker is not None
        following = re.compile(r"following \S+ \(token \d+\)")
        try:
            wait_for(
                lambda: following.search(worker.log()[logged:]),
                15,
                interval=0.1,
                what="the healed leader to follow again",
            )
            fault.note = "rejoined"
        except AssertionError:
            holder = self.holder()
            if worker.alive() and holder is not None and holder[0] == worker.node:
                fault.note = "rejoined (leads again)"
            else:
                fault.note = "did not rejoin"
                self.problems.append(
                    f"{worker.node} did not follow again within 15s of the heal "
                    f"(alive: {worker.alive()}, lease: {holder})"
                )

    def check_no_unexpected_deaths(self) -> None:
        for slot in self.slots:
            for worker in slot.incarnations:
                if id(worker) not in slot.stopped and not worker.alive():
                    self.problems.append(
                        f"{worker.node} (pid {worker.pid}) died on its own: {worker.log()[-1500:]}"
                    )

    def summary(self, seed: int, minutes: float, elapsed: float) -> str:
        lines = [
            f"chaos soak ({self.store} Redis): seed {seed}, {minutes:g} min asked, "
            f"ran {elapsed:.0f}s, "
            f"TTL {TTL}s, renew {RENEW:.2f}s, timer {TIMER}s",
            f"  faults injected: {len(self.faults)}; terms seen: "
            f"{len({r.token for r in self.trail.events})}; callbacks recorded: "
            f"{len(self.trail.events)}",
            f"  {'kind':<17} {'count':>5} {'failovers':>9} {'worst':>8} {'mean':>8} {'bound':>7}",
        ]
        for kind in self.kinds:
            done = [f for f in self.faults if f.kind == kind]
            timed = [f.took for f in done if f.was_leader and f.took is not None]
            worst = f"{max(timed):.3f}s" if timed else "-"
            mean = f"{sum(timed) / len(timed):.3f}s" if timed else "-"
            lines.append(
                f"  {kind:<17} {len(done):>5} {sum(f.failover for f in done):>9} "
                f"{worst:>8} {mean:>8} {BOUNDS[kind]:>6.2f}s"
            )
        lines.append(f"  failovers: {sum(f.failover for f in self.faults)}")
        return "\n".join(lines)


def term_violations(records: list[Record]) -> list[str]:
    """Every breach of check_terms' invariants, each with what the older term did too late."""
    terms: dict[int, list[Record]] = {}
    for record in records:
        terms.setdefault(record.token, []).append(record)
    ordered = sorted(terms.items(), key=lambda kv: min(r.at for r in kv[1]))
    found = []
    for token, items in ordered:
        hosts = {r.host for r in items}
        if len(hosts) > 1:
            found.append(f"term {token} ran on several hosts: {sorted(hosts)}")
    for (old, old_items), (new, new_items) in itertools.pairwise(ordered):
        began = min(r.at for r in new_items)
        if new <= old:
            found.append(f"token went backwards: {old} then {new}")
        late = sorted((r for r in old_items if r.at > began), key=lambda r: r.at)
        if late:
            what = ", ".join(f"{r.event}({r.reason}) +{r.at - began:.3f}s" for r in late)
            found.append(
                f"term {new} ({new_items[0].host}) began at {began:.3f} while term {old} "
                f"({old_items[0].host}) still acted: {what}"
            )
    return found


def dump_trail(path: Path, soak: Soak, seed: int) -> None:
    """Everything recorded, for a look after a failure."""
    data = {
        "seed": seed,
        "faults": [asdict(f) for f in soak.faults],
        "records": [asdict(r) for r in sorted(soak.trail.events + soak.trail.hooks, key=_at)],
    }
    path.write_text(json.dumps(data, indent=1, default=str))


def _at(record: Record) -> float:
    return record.at


def chaos_minutes(config: pytest.Config, store: str) -> float:
    """``--chaos-minutes`` if given, else the store's short form."""
    minutes = config.getoption("--chaos-minutes")
    return float(minutes) if minutes is not None else SHORT_MINUTES[store]


@pytest.fixture(params=["plain", "cluster"])
def chaos_servers(
    request: pytest.FixtureRequest,
    make_redis_server: Callable[..., RedisServer],
) -> Iterator[tuple[RedisServer | RedisCluster, RedisServer, RedisServer]]:
    """The lease store (faulted: one Redis, or a six-node cluster), the broker Redis (cut off
    per worker), the records' Redis."""
    store = request.param
    chosen = request.config.getoption("--chaos-store")
    if chosen not in ("both", store):
        pytest.skip(f"--chaos-store {chosen}")
    lease: RedisServer | RedisCluster = (
        request.getfixturevalue("stoker_redis_cluster")
        if store == "cluster"
        else make_redis_server()
    )
    yield lease, make_redis_server(), make_redis_server()


def test_chaos_soak(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    chaos_servers: tuple[RedisServer | RedisCluster, RedisServer, RedisServer],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    lease_store, broker_redis, record_redis = chaos_servers
    store = "cluster" if isinstance(lease_store, RedisCluster) else "plain"
    minutes = chaos_minutes(request.config, store)
    seed_option = request.config.getoption("--chaos-seed")
    seed = int(seed_option) if seed_option is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)

    def say(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)

    say(
        f"\nchaos soak ({store} Redis): seed {seed} (replay with --chaos-seed {seed}), "
        f"{minutes:g} min"
    )
    trail = Trail(record_redis.client())
    fleet = Fleet(
        APP,
        env={
            "STOKER_TEST_RECORD_URL": record_redis.url_for(0),
            "STOKER_TEST_TTL": str(TTL),
            "STOKER_TEST_TIMER": str(TIMER),
        },
    )
    soak = Soak(rng, fleet, lease_store, broker_redis, trail, tcp_proxy, say)
    began = time.monotonic()
    try:
        for slot in soak.slots:
            soak.start(slot)
        soak.settle(60)
        deadline = began + minutes * 60
        rounds = 0
        while time.monotonic() < deadline or not rounds:
            rounds += 1
            for kind in rng.sample(soak.kinds, len(soak.kinds)):
                # The first round always runs whole: every kind is injected at least once.
                if time.monotonic() >= deadline and rounds > 1:
                    break
                fault = soak.inject(kind)
                if fault.was_leader and fault.took is None:
                    deadline = 0.0  # the fleet is stuck: stop and report
                    break
                time.sleep(rng.uniform(0.2, 1.5))  # the fleet runs undisturbed a while
        elapsed = time.monotonic() - began
        if deadline:
            soak.settle(40)
        soak.check_no_unexpected_deaths()
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.cleanup()
        soak.close()

    trail.poll()
    trail.poll_hooks()
    say(soak.summary(seed, minutes, elapsed))
    dump = tmp_path / "chaos-trail.json"
    dump_trail(dump, soak, seed)
    # Safety over the whole trail: callbacks and the in-process hooks of every term.
    trail_records = trail.events + trail.hooks
    violations = term_violations(trail_records)
    try:
        assert not violations, "safety:\n" + "\n".join(violations)
        check_terms(trail_records)
        assert not soak.problems, "\n".join(soak.problems)
        for kind in soak.kinds:
            assert any(f.kind == kind for f in soak.faults), f"no {kind} fault was injected"
    except BaseException:
        print(fleet.logs())
        say(
            f"chaos soak FAILED with seed {seed} (replay with --chaos-seed {seed}); trail in {dump}"
        )
        for line in violations + soak.problems:
            say(f"  {line}")
        raise
