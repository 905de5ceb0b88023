"""The fenced Redis lease against a real Redis: safety, fencing, wake-ups, bad data, URLs.

Timing is measured on :func:`time.monotonic` in this one process, so every holder's
validity window is comparable with every other's.  Nothing here sleeps to assert a
timing: waits are polls with deadlines, and ``sleep`` only paces holders.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from support.redis_stats import command_calls

from celery_stoker import lease as lease_module
from celery_stoker import lease_wait, scripts
from celery_stoker.connection import mask_url, redis_client
from celery_stoker.keys import lease_channel, lease_key, token_key
from celery_stoker.lease import (
    AcquireResult,
    Holder,
    RedisLease,
    Term,
    validity,
)
from celery_stoker.listener import LeaseListener
from celery_stoker.testing import RedisServer, wait_for

PREFIX = "stoker-test"


# --- helpers ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)


class Leases:
    """Makes leases (each with its own client) and closes them all at the end of a test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: list[redis.Redis] = []
        self._leases: list[RedisLease] = []
        self._listeners: list[LeaseListener] = []
        #: Called at close, before the leases: stop helper threads of a test.
        self.stoppers: list[Callable[[], None]] = []

    def client(self, url: str | None = None) -> redis.Redis:
        client = redis_client(url or self.url, socket_timeout=5)
        self._clients.append(client)
        return client

    def lease(
        self,
        holder_id: str,
        ttl: float,
        *,
        name: str = "job",
        listener: LeaseListener | None = None,
        url: str | None = None,
    ) -> RedisLease:
        lease = RedisLease(
            self.client(url),
            name,
            holder_id=holder_id,
            hostname=f"{holder_id}@test-host",
            ttl=ttl,
            key_prefix=PREFIX,
            listener=listener,
        )
        self._leases.append(lease)
        return lease

    def listener(self, url: str | None = None) -> LeaseListener:
        listener = LeaseListener(
            lambda: redis_client(url or self.url, socket_timeout=5), lease_channel(PREFIX)
        )
        self._listeners.append(listener)
        listener.start(wait_subscribed=5)
        assert listener.subscribed, "release listener did not subscribe"
        return listener

    def close(self) -> None:
        for stop in self.stoppers:
            stop()
        for lease in self._leases:
            lease.wake()
            lease.close()
        for listener in self._listeners:
            listener.stop()
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()


@pytest.fixture
def leases(fresh_redis_url: str) -> Iterator[Leases]:
    factory = Leases(fresh_redis_url)
    yield factory
    factory.close()


@pytest.fixture
def own_leases(redis_server: RedisServer) -> Iterator[Leases]:
    """Leases on a server of this test's own, which it may restart."""
    factory = Leases(redis_server.url)
    yield factory
    factory.close()


def must_acquire(lease: RedisLease, min_token: int = 0) -> Term:
    result = lease.acquire(min_token)
    assert result.term is not None, f"expected to acquire, found {result.holder}"
    return result.term


@dataclass
class Window:
    """When one holder could act: from learning it won to its release or validity end."""

    holder_id: str
    token: int
    start: float
    end: float


def assert_no_overlap(windows: list[Window]) -> None:
    ordered = sorted(windows, key=lambda w: w.start)
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.end <= later.start, (
            f"two holders could act at once: {earlier.holder_id} (token {earlier.token}) until "
            f"{earlier.end:.6f}, {later.holder_id} (token {later.token}) from {later.start:.6f}"
        )
        assert later.token > earlier.token, (
            f"token went backwards: {earlier.token} then {later.token}"
        )


# --- safety: mutual exclusion -----------------------------------------------------------------


def test_mutual_exclusion_under_contention(leases: Leases) -> None:
    """50 threads race for one lease; every winner renews once and releases."""
    threads_n, terms_wanted, ttl = 50, 300, 2.0
    listener = leases.listener()
    contenders = [leases.lease(f"h{i}", ttl, listener=listener) for i in range(threads_n)]
    windows: list[Window] = []
    problems: list[str] = []
    lost = [0]
    lock = threading.Lock()
    done = threading.Event()
    start = threading.Barrier(threads_n)

    def contend(lease: RedisLease) -> None:
        rng = random.Random(lease.holder_id)
        start.wait()
        while not done.is_set():
            result = lease.acquire()
            if result.term is None:
                with lock:
                    lost[0] += 1
                lease.wait(lease.wait_timeout(result.holder))
                continue
            term = result.term
            acquired_at = time.monotonic()
            if not lease.renew(term):
                problems.append(f"{lease.holder_id} could not renew its own fresh lease")
            time.sleep(rng.random() * 0.001)  # "act" for up to 1 ms
            released_at = time.monotonic()
            end = min(released_at, term.valid_until)
            if not lease.release(term):
                problems.append(f"{lease.holder_id} could not release its own lease")
            with lock:
                windows.append(Window(lease.holder_id, term.token, acquired_at, end))
                if len(windows) >= terms_wanted:
                    done.set()
            time.sleep(rng.random() * 0.003)  # let the woken waiters have a go

    workers = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for worker in workers:
        worker.start()
    finished = done.wait(30)
    done.set()
    for lease in contenders:
        lease.wake()
    for worker in workers:
        worker.join(10)
    assert finished, f"only {len(windows)} terms in 30 s"
    assert not problems, problems[:5]
    assert_no_overlap(windows)
    assert len({w.holder_id for w in windows}) >= 10, "the race had too few distinct winners"
    assert lost[0] > len(windows), "too little contention to prove anything"


def test_mutual_exclusion_with_short_ttl_and_abandoned_leases(leases: Leases) -> None:
    """TTL 0.25 s; holders sometimes release, sometimes vanish, sometimes overstay.

    A holder that vanishes or overstays can act only until its own ``valid_until``;
    the next holder must not start before then, even when it polls every millisecond.
    """
    threads_n, ttl, duration = 12, 0.25, 2.5
    contenders = [leases.lease(f"s{i}", ttl) for i in range(threads_n)]
    windows: list[Window] = []
    kinds: dict[str, int] = {"released": 0, "abandoned": 0, "overstayed": 0}
    problems: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def contend(index: int, lease: RedisLease) -> None:
        rng = random.Random(index)
        eager = index % 2 == 0  # half poll every ms, half sleep until the observed expiry
        while time.monotonic() < stop_at:
            result = lease.acquire()
            if result.term is None:
                timeout = lease.wait_timeout(result.holder)
                lease.wait(min(timeout, 0.001) if eager else timeout)
                continue
            term = result.term
            acquired_at = time.monotonic()
            choice = rng.choice(["released", "abandoned", "overstayed"])
            if choice == "released":
                if not lease.renew(term):
                    problems.append(f"{lease.holder_id}: fresh renew failed")
                time.sleep(rng.random() * 0.05)
                released_at = time.monotonic()
                end = min(released_at, term.valid_until)
                lease.release(term)
            elif choice == "abandoned":
                if rng.random() < 0.5 and not lease.renew(term):
                    problems.append(f"{lease.holder_id}: fresh renew failed")
                end = term.valid_until  # stops acting when its validity ends, never releases
                time.sleep(max(0.0, term.time_left()) + 0.01)
            else:
                # Stalls past the TTL, then tries to carry on: it may act only while valid.
                time.sleep(ttl * 1.5)
                if lease.renew(term):
                    problems.append(f"{lease.holder_id}: renewed a lease that had expired")
                end = min(term.valid_until, time.monotonic())
                lease.release(term)
            with lock:
                kinds[choice] += 1
                windows.append(Window(lease.holder_id, term.token, acquired_at, end))

    workers = [
        threading.Thread(target=contend, args=(i, lease)) for i, lease in enumerate(contenders)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration + 5)
    assert not problems, problems[:5]
    assert_no_overlap(windows)
    assert kinds["abandoned"] + kinds["overstayed"] >= 2, kinds
    assert len(windows) >= 6, kinds


# --- liveness: release wakes a waiter at once --------------------------------------------------


def _one_wake_up(holder: RedisLease, waiter: RedisLease) -> float:
    """Waiter fails to acquire and blocks; holder releases; seconds from release to wake."""
    term = must_acquire(holder)
    ready = threading.Event()
    outcome: dict[str, float | bool] = {}

    def wait_for_release() -> None:
        outcome["acquired"] = waiter.acquire().term is not None
        ready.set()
        outcome["woken"] = waiter.wait(10)
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=wait_for_release)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.002)  # let the waiter block (pacing only: an earlier release is not lost)
    released_at = time.monotonic()
    assert holder.release(term)
    thread.join(15)
    assert outcome["acquired"] is False
    assert outcome["woken"] is True, "wait() timed out instead of being woken by the release"
    return float(outcome["at"]) - released_at


def test_release_wakes_a_blocked_waiter_fast(leases: Leases) -> None:
    listener = leases.listener()
    holder = leases.lease("holder", 10.0, listener=listener)
    waiter = leases.lease("waiter", 10.0, listener=listener)
    latencies = [_one_wake_up(holder, waiter) for _ in range(50)]
    median = statistics.median(latencies)
    print(
        f"\nrelease -> waiter wake-up over {len(latencies)} rounds: median "
        f"{median * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms"
    )
    assert median < 0.05
    assert max(latencies) < 2.0


def test_wait_without_a_release_times_out(leases: Leases) -> None:
    listener = leases.listener()
    holder = leases.lease("holder", 10.0, listener=listener)
    waiter = leases.lease("waiter", 10.0, listener=listener)
    must_acquire(holder)
    assert waiter.acquire().term is None
    started = time.monotonic()
    assert waiter.wait(0.1) is False
    assert time.monotonic() - started >= 0.09


def test_a_release_of_another_name_does_not_wake(leases: Leases) -> None:
    listener = leases.listener()
    other = leases.lease("other", 10.0, name="other-job", listener=listener)
    holder = leases.lease("holder", 10.0, listener=listener)
    waiter = leases.lease("waiter", 10.0, listener=listener)
    must_acquire(holder)
    assert waiter.acquire().term is None
    assert other.release(must_acquire(other))
    assert waiter.wait(0.2) is False


# --- liveness: expiry hands over within the TTL ------------------------------------------------


def test_expiry_hands_over_within_ttl_plus_margin(leases: Leases) -> None:
    ttl = 0.5
    holder = leases.lease("crashed", ttl)
    waiter = leases.lease("next", ttl)
    sent_at = time.monotonic()
    old = must_acquire(holder)
    old_holder = holder.holder()
    assert old_holder is not None and old_holder.since is not None
    attempts = 0
    deadline = time.monotonic() + 5
    new: Term | None = None
    while new is None and time.monotonic() < deadline:
        attempt_at = time.monotonic()
        attempts += 1
        result = waiter.acquire()
        if result.term is not None:
            new = result.term
            break
        assert result.holder is not None and result.holder.holder_id == "crashed"
        waiter.wait(waiter.wait_timeout(result.holder))
    got_at = time.monotonic()
    assert new is not None, "the waiter never got the expired lease"
    new_holder = waiter.holder()
    assert new_holder is not None and new_holder.since is not None
    # Redis handed it over no earlier than the old lease's expiry (server clock, ms) ...
    assert new_holder.since - old_holder.since >= ttl - 0.002
    # ... after the old holder's own validity had ended (monotonic clock) ...
    assert old.valid_until <= attempt_at
    # ... and soon after it: one TTL plus a small margin from the old holder's acquire.
    assert got_at - sent_at <= ttl + 0.25, f"handover took {got_at - sent_at:.3f} s"
    assert attempts <= 3, f"the waiter polled {attempts} times instead of sleeping to expiry"
    assert new.token > old.token


class CommandCounter:
    """Counts the commands one client connection sends, as Redis's MONITOR sees them."""

    STOP = "stoker-test-stop-monitor"

    def __init__(self, url: str, watched: redis.Redis) -> None:
        self.url = url
        info = watched.client_info()  # also opens the watched connection before we count
        self.address = str(info["addr"])
        self.commands: list[str] = []
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CommandCounter:
        self._monitor.__enter__()
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            entry = self._monitor.next_command()
            if entry["command"] == f"ECHO {self.STOP}":
                return
            if f"{entry['client_address']}:{entry['client_port']}" == self.address:
                self.commands.append(entry["command"])

    def __exit__(self, *exc: object) -> None:
        stopper = redis.Redis.from_url(self.url)
        stopper.echo(self.STOP)
        stopper.close()
        self._thread.join(5)
        self._monitor.__exit__(None, None, None)
        self._client.close()


@pytest.mark.parametrize("with_listener", [True, False], ids=["listener", "no-listener"])
def test_waiter_command_count_while_the_leader_renews(leases: Leases, with_listener: bool) -> None:
    """A follower sends nothing while renewals are announced, and ~one per period without.

    With the listener, each renewal moves the waiter's wake-up to the new expiry, so
    it sends only its first look.  Without one (pub/sub down), it looks once per
    observed expiry: never more often than once per ``ttl - renew_interval``.
    """
    ttl, renew_interval, duration = 1.0, 0.33, 3.0
    holder = leases.lease("leader", ttl)
    listener = leases.listener() if with_listener else None
    waiter = leases.lease("follower", ttl, listener=listener)
    term = must_acquire(holder)
    stop = threading.Event()
    renew_failures: list[float] = []

    def keep_renewing() -> None:
        while not stop.wait(renew_interval):
            if not holder.renew(term):
                renew_failures.append(time.monotonic())

    renewer = threading.Thread(target=keep_renewing)
    renewer.start()
    acquired = 0
    try:
        with CommandCounter(leases.url, waiter.client) as counter:
            end = time.monotonic() + duration
            while time.monotonic() < end:
                result = waiter.acquire()
                if result.term is not None:
                    acquired += 1
                    break
                waiter.wait(waiter.wait_timeout(result.holder), max_wait=end - time.monotonic())
    finally:
        stop.set()
        renewer.join(5)
    assert not renew_failures
    assert acquired == 0, "the follower took a lease that was being renewed"
    sent = len(counter.commands)
    per_minute = sent / duration * 60
    print(
        f"\nfollower ({'with' if with_listener else 'without'} listener) sent {sent} commands "
        f"in {duration:.0f} s with ttl {ttl} s and renew {renew_interval} s: "
        f"{per_minute:.0f} commands/minute ({sorted({c.split()[0] for c in counter.commands})})"
    )
    if with_listener:
        assert sent == 1, "renewal announcements should spare the follower every later look"
    else:
        assert sent >= 2, "the follower never looked again"
        assert sent <= duration / (ttl - renew_interval) + 2


def test_waiter_wakes_at_expiry_when_renewals_stop(leases: Leases) -> None:
    """Renewals defer the waiter; once they stop, it wakes at the last announced expiry."""
    ttl = 0.6
    listener = leases.listener()
    holder = leases.lease("leader", ttl, listener=listener)
    waiter = leases.lease("follower", ttl, listener=listener)
    term = must_acquire(holder)
    result = waiter.acquire()
    assert result.term is None
    started = time.monotonic()
    renewed_last = started
    for _ in range(3):  # renew for ~0.9 s, past the first observed expiry
        time.sleep(0.3)
        assert holder.renew(term)
        renewed_last = time.monotonic()
    assert waiter.wait(waiter.wait_timeout(result.holder)) is False
    woke = time.monotonic()
    assert woke >= renewed_last + ttl - 0.05, "woke before the renewed lease could expire"
    assert woke <= renewed_last + ttl + 0.25, "woke long after the renewed lease expired"
    assert must_acquire(waiter).token > term.token


# --- safety: a stale holder -------------------------------------------------------------------


def test_a_stale_holder_cannot_renew_or_release_the_next_term(leases: Leases) -> None:
    ttl = 0.3
    listener = leases.listener()
    old_lease = leases.lease("old", ttl, listener=listener)
    new_lease = leases.lease("new", 5.0, listener=listener)
    waiter = leases.lease("bystander", 5.0, listener=listener)
    old = must_acquire(old_lease)
    assert wait_until(lambda: old_lease.holder() is None, 2), "the old lease never expired"
    assert not old.is_valid()
    new = must_acquire(new_lease)
    before = new_lease.holder()
    assert before is not None and before.holder_id == "new"
    assert waiter.acquire().term is None

    assert old_lease.renew(old) is False
    assert old_lease.release(old) is False

    after = new_lease.holder()
    assert after is not None
    assert (after.holder_id, after.token, after.raw) == ("new", new.token, before.raw)
    assert after.ttl_left is not None and after.ttl_left > 4
    assert waiter.wait(0.2) is False, "a failed (stale) release announced a release"
    assert new_lease.renew(new) is True
    assert new.token > old.token


def test_release_cuts_the_holders_own_validity(leases: Leases) -> None:
    lease = leases.lease("h", 5.0)
    term = must_acquire(lease)
    assert term.is_valid()
    assert lease.release(term)
    assert not term.is_valid()
    assert lease.renew(term) is False
    assert lease.holder() is None


def test_validity_is_counted_from_before_the_command(leases: Leases) -> None:
    ttl = 2.0
    lease = leases.lease("h", ttl)
    before = time.monotonic()
    term = must_acquire(lease)
    after = time.monotonic()
    assert before + validity(ttl) - 1e-6 <= term.valid_until <= after + validity(ttl)
    assert term.valid_until < before + ttl
    before = time.monotonic()
    assert lease.renew(term)
    assert before + validity(ttl) - 1e-6 <= term.valid_until < before + ttl
    redis_view = lease.holder()
    assert redis_view is not None and redis_view.ttl_left is not None
    assert redis_view.ttl_left > term.time_left()  # Redis keeps it longer than we act on it


# --- fencing tokens ---------------------------------------------------------------------------


def test_tokens_increase_across_terms_and_outlive_an_empty_restart(
    redis_server: RedisServer, own_leases: Leases
) -> None:
    first = own_leases.lease("a", 5.0)
    second = own_leases.lease("b", 5.0)
    wall_us_before = int(time.time() * 1_000_000)
    tokens = []
    for lease in (first, second, first, second, first):
        term = must_acquire(lease)
        tokens.append(term.token)
        assert lease.release(term)
    assert tokens == sorted(set(tokens)), tokens
    # The first token was seeded from the server clock in µs (same host as this test).
    assert abs(tokens[0] - wall_us_before) < 60_000_000
    highest = tokens[-1]

    redis_server.restart(empty=True)
    assert redis_server.client().exists(token_key(PREFIX, "job")) == 0
    remembered = must_acquire(second, min_token=highest)
    assert remembered.token > highest
    assert second.release(remembered)
    far = must_acquire(first, min_token=remembered.token + 1_000_000)
    assert far.token > remembered.token + 1_000_000
    assert first.release(far)
    after_far = must_acquire(second)
    assert after_far.token > far.token
    assert second.release(after_far)

    redis_server.restart(empty=True)
    forgotten = must_acquire(first, min_token=0)
    assert forgotten.token > highest, "a term after an empty restart ranks below an earlier one"
    assert first.release(forgotten)


def test_token_after_empty_restart_outranks_a_burst_of_terms_without_min_token(
    redis_server: RedisServer, own_leases: Leases
) -> None:
    """A burst of terms must not push the counter past the clock seed of the next restart.

    After an empty restart a worker that remembers nothing (min_token=0) must still get a
    token above every earlier term, as lease.py's docstring promises.  A seed in
    milliseconds fails this: a few thousand terms a second outrun it.
    """
    lease = own_leases.lease("fast", 5.0)
    highest = 0
    started = time.monotonic()
    for _ in range(3000):
        term = must_acquire(lease)
        highest = term.token
        assert lease.release(term)
    rate = 3000 / (time.monotonic() - started)
    redis_server.restart(empty=True)
    after = must_acquire(lease, min_token=0)
    assert after.token > highest, (
        f"token {after.token} after the restart is below {highest} from before it "
        f"({rate:.0f} terms/s)"
    )


# --- foreign values never crash ---------------------------------------------------------------

FOREIGN_LEASE_VALUES: list[tuple[str, Callable[[redis.Redis, str], object]]] = [
    ("garbage string", lambda r, k: r.set(k, b"not ours at all", px=60_000)),
    ("garbage without expiry", lambda r, k: r.set(k, b"forever")),
    ("invalid utf-8", lambda r, k: r.set(k, b"\xff\xfe\x00", px=60_000)),
    ("hash", lambda r, k: r.hset(k, mapping={"holder": "someone"})),
    ("list", lambda r, k: r.rpush(k, "a", "b")),
    ("json list", lambda r, k: r.set(k, b"[1, 2, 3]", px=60_000)),
    ("json of another version", lambda r, k: r.set(k, b'{"v": 2, "token": 5}', px=60_000)),
    ("json missing fields", lambda r, k: r.set(k, b'{"v": 1, "token": 5}', px=60_000)),
    (
        "json with a text token",
        lambda r, k: r.set(
            k, b'{"v":1,"token":"five","since":1,"holder":"x","host":"y"}', px=60_000
        ),
    ),
    (
        "json with an infinite token",
        lambda r, k: r.set(
            k, b'{"v":1,"token":Infinity,"since":1,"holder":"x","host":"y"}', px=60_000
        ),
    ),
    (
        "json with a huge number",
        lambda r, k: r.set(
            k, b'{"v":1,"token":1,"since":1e999,"holder":"x","host":"y"}', px=60_000
        ),
    ),
    ("deeply nested json", lambda r, k: r.set(k, b"[" * 100_000, px=60_000)),
]


@pytest.mark.parametrize(
    "make_foreign", [f for _, f in FOREIGN_LEASE_VALUES], ids=[n for n, _ in FOREIGN_LEASE_VALUES]
)
def test_foreign_lease_value_is_flagged_not_raised(
    leases: Leases, make_foreign: Callable[[redis.Redis, str], object]
) -> None:
    lease = leases.lease("h", 2.0)
    raw = leases.client()
    make_foreign(raw, lease.lease_key)
    result = lease.acquire()
    assert isinstance(result, AcquireResult)
    assert result.term is None
    assert result.holder is not None and result.holder.foreign is True
    assert result.holder.token is None and result.holder.holder_id is None
    seen = lease.holder()
    assert seen is not None and seen.foreign is True
    timeout = lease.wait_timeout(seen)
    assert 0 < timeout <= 60.1
    assert seen is not None and seen.hostname is None
    assert raw.exists(lease.lease_key) == 1  # we never overwrite what is not ours


def test_foreign_value_without_expiry_is_looked_at_again_after_one_ttl(leases: Leases) -> None:
    lease = leases.lease("h", 1.5)
    leases.client().set(lease.lease_key, b"left by hand")
    seen = lease.holder()
    assert seen is not None and seen.foreign and seen.ttl_left is None
    assert lease.wait_timeout(seen) == 1.5


FOREIGN_COUNTERS: list[tuple[str, Callable[[redis.Redis, str], object]]] = [
    ("text", lambda r, k: r.set(k, b"twelve")),
    ("float", lambda r, k: r.set(k, b"12.5")),
    ("hash", lambda r, k: r.hset(k, mapping={"n": 1})),
    ("at the 64-bit limit", lambda r, k: r.set(k, b"9223372036854775807")),
]


@pytest.mark.parametrize(
    "make_foreign", [f for _, f in FOREIGN_COUNTERS], ids=[n for n, _ in FOREIGN_COUNTERS]
)
def test_foreign_token_counter_is_flagged_not_raised(
    leases: Leases, make_foreign: Callable[[redis.Redis, str], object]
) -> None:
    lease = leases.lease("h", 2.0)
    make_foreign(leases.client(), lease.token_key)
    result = lease.acquire()
    assert result.term is None
    assert result.holder is not None and result.holder.foreign is True
    assert lease.holder() is None  # nothing half-written under the lease key


def test_renew_and_release_after_the_key_was_replaced_by_a_foreign_type(leases: Leases) -> None:
    lease = leases.lease("h", 5.0)
    term = must_acquire(lease)
    raw = leases.client()
    raw.delete(lease.lease_key)
    raw.hset(lease.lease_key, mapping={"taken": "by someone else"})
    assert lease.renew(term) is False  # not ours any more: a plain "no", not an exception
    assert lease.release(term) is False
    assert raw.type(lease.lease_key) == b"hash"


# --- URLs: password and unix socket -----------------------------------------------------------

PASSWORD = "s3cret-Pa55word"


def test_password_url_works_and_wrong_password_is_an_auth_error(
    make_redis_server: Callable[..., RedisServer], leases: Leases
) -> None:
    server = make_redis_server(password=PASSWORD)
    url = server.url
    assert url == f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    lease = leases.lease("h", 2.0, url=url)
    term = must_acquire(lease)
    assert lease.holder() is not None
    assert lease.release(term)
    with_user = leases.client(f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/1")
    assert with_user.ping() is True
    wrong = leases.client(f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0")
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    assert PASSWORD not in mask_url(url)
    assert mask_url(url) == f"redis://:***@127.0.0.1:{server.port}/0"


def test_raw_special_characters_in_a_working_password_url_are_masked(
    make_redis_server: Callable[..., RedisServer], leases: Leases
) -> None:
    password = "p@ss;w0rd"
    server = make_redis_server(password=password)
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    assert leases.client(url).ping() is True  # redis-py takes this URL as written
    assert mask_url(url) == f"redis://:***@127.0.0.1:{server.port}/0"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="stk-"))  # short: socket paths max ~107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unix_socket_url(
    make_redis_server: Callable[..., RedisServer], leases: Leases, socket_dir: Path
) -> None:
    path = str(socket_dir / "r.sock")
    server = make_redis_server(extra_args=["--unixsocket", path, "--unixsocketperm", "700"])
    assert server.is_running
    listener = leases.listener(f"unix://{path}")
    lease = leases.lease("h", 2.0, url=f"unix://{path}?db=3", listener=listener)
    waiter = leases.lease("w", 2.0, url=f"unix://{path}?db=3", listener=listener)
    assert lease.client.connection_pool.connection_kwargs["path"] == path
    term = must_acquire(lease)
    assert waiter.acquire().term is None
    assert lease.release(term)
    assert waiter.wait(5) is True
    assert server.client(db=3).exists(lease.token_key) == 1
    assert server.client(db=0).exists(lease.token_key) == 0


# --- the release listener survives Redis going away --------------------------------------------


def test_release_listener_survives_an_empty_restart(
    redis_server: RedisServer, own_leases: Leases
) -> None:
    listener = own_leases.listener()
    holder = own_leases.lease("holder", 5.0, listener=listener)
    waiter = own_leases.lease("waiter", 5.0, listener=listener)
    channel = lease_channel(PREFIX)

    redis_server.restart(empty=True)
    probe = redis_server.client()
    assert wait_until(
        lambda: dict(probe.pubsub_numsub(channel)).get(channel.encode(), 0) == 1, 10, 0.02
    ), "the listener did not subscribe again after the restart"
    assert wait_until(lambda: listener.subscribed, 5)

    term = must_acquire(holder)
    assert waiter.acquire().term is None
    released_at = time.monotonic()
    assert holder.release(term)
    assert waiter.wait(5) is True
    assert time.monotonic() - released_at < 1.0


def test_release_listener_reports_an_outage_and_recovers(
    redis_server: RedisServer, own_leases: Leases
) -> None:
    listener = own_leases.listener()
    waiter = own_leases.lease("waiter", 5.0, listener=listener)
    holder = own_leases.lease("holder", 5.0, listener=listener)
    term = must_acquire(holder)
    assert waiter.acquire().term is None

    port = redis_server.port
    redis_server.stop()
    stopped_at = time.monotonic()
    assert wait_until(lambda: not listener.subscribed, 15), (
        "listener.subscribed stayed True while Redis was down"
    )
    print(f"\nlistener noticed the outage after {time.monotonic() - stopped_at:.2f} s")
    redis_server.start(port=port)
    started_at = time.monotonic()
    assert wait_until(lambda: listener.subscribed, 10)
    print(f"listener subscribed again {time.monotonic() - started_at:.2f} s after Redis was back")
    # Coming back wakes waiters so they look again (a release may have been missed).
    assert waiter.wait(0) is True
    del term


def test_lease_keys_share_one_cluster_slot() -> None:
    assert lease_key("p", "a.b") == "p:{a.b}:lease"
    assert token_key("p", "a.b") == "p:{a.b}:token"
    assert lease_channel("p") == "p:lease-events"


def test_holder_parse_round_trip() -> None:
    raw = b'{"v":1,"token":42,"since":1700000000123,"holder":"id-1","host":"w1@h"}'
    holder = Holder.parse(raw, 1500)
    assert (holder.token, holder.holder_id, holder.hostname, holder.foreign) == (
        42,
        "id-1",
        "w1@h",
        False,
    )
    assert holder.since == pytest.approx(1700000000.123)
    assert holder.ttl_left == 1.5
    assert Holder.parse(raw, -1).ttl_left is None


# --- no herd: a failover costs a few commands, whatever the number of followers ----------


def _evalsha_calls(client: redis.Redis) -> int:
    for script in (scripts.ACQUIRE, scripts.RELEASE, scripts.RENEW):
        client.script_load(script)  # so no NOSCRIPT retry counts as a try
    return command_calls(client).get("evalsha", 0)


def _run_followers(
    leases: Leases, count: int, ttl: float, prepare: Callable[[RedisLease], None] | None = None
) -> tuple[list[str], list[RedisLease]]:
    """``count`` followers that each loop acquire / wait like an activator; returns winners.

    ``prepare`` sees each follower before its thread starts.
    """
    listener = leases.listener()
    followers = [leases.lease(f"f{i}", ttl, listener=listener) for i in range(count)]
    for lease in followers:
        if prepare is not None:
            prepare(lease)
    winners: list[str] = []
    stop = threading.Event()

    def follow(lease: RedisLease) -> None:
        while not stop.is_set():
            result = lease.acquire()
            if result.term is not None:
                winners.append(lease.holder_id)
                return
            lease.wait(lease.wait_timeout(result.holder), max_wait=2.0)

    for lease in followers:  # in this order: f0 waits longest
        assert lease.acquire().term is None
    threads = [threading.Thread(target=follow, args=(lease,), daemon=True) for lease in followers]
    for thread in threads:
        thread.start()
    leases.stoppers.append(stop.set)
    return winners, followers


@pytest.mark.parametrize("followers", [2, 8])
def test_a_release_wakes_only_the_longest_waiting_follower(leases: Leases, followers: int) -> None:
    holder = leases.lease("holder", 10.0)
    term = must_acquire(holder)
    winners, _ = _run_followers(leases, followers, 10.0)
    admin = leases.client()
    time.sleep(0.2)  # every follower is parked in wait()
    before = _evalsha_calls(admin)
    assert holder.release(term)
    wait_for(lambda: winners, 5, what="a new holder")
    time.sleep(0.3)  # longer than HERD_DELAY: any follower that would try has tried
    assert winners == ["f0"], "the longest-waiting follower takes over"
    # The release, and the one acquire of f0: not one try per follower.
    assert _evalsha_calls(admin) - before == 2


def test_an_expiry_wakes_the_first_waiter_and_not_the_herd(leases: Leases) -> None:
    ttl = 0.6
    holder = leases.lease("crashed", ttl)
    must_acquire(holder)
    winners, _ = _run_followers(leases, 8, ttl)
    admin = leases.client()
    time.sleep(0.1)
    before = _evalsha_calls(admin)
    wait_for(lambda: winners, 5, what="a new holder after the expiry")
    time.sleep(0.3)
    assert winners == ["f0"]
    assert _evalsha_calls(admin) - before <= 2, "followers behind f0 waited for its new term"


def test_a_release_naming_a_dead_waiter_still_hands_over(leases: Leases) -> None:
    """The first waiter died without a trace: the others take over after the head start."""
    holder = leases.lease("holder", 10.0)
    term = must_acquire(holder)
    ghost = leases.lease("ghost", 10.0)
    assert ghost.acquire().term is None  # queued first, then never looks again
    winners, _ = _run_followers(leases, 3, 10.0)
    time.sleep(0.2)
    released_at = time.monotonic()
    assert holder.release(term)
    wait_for(lambda: winners, 5, what="a new holder")
    assert time.monotonic() - released_at < 1.0
    assert winners[0] in {"f0", "f1", "f2"}


def test_when_the_named_waiter_is_late_the_next_in_line_tries_not_the_queue(
    leases: Leases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first waiter never tries (a paused or overloaded process): the others go one
    after another, each after its rank's head start, so the second takes the lease and
    the rest hear its new term instead of all trying at once."""
    monkeypatch.setattr(lease_wait, "HERD_DELAY", 0.3)  # wide steps: no race with the CPU
    holder = leases.lease("holder", 10.0)
    term = must_acquire(holder)
    ghost = leases.lease("ghost", 10.0)
    assert ghost.acquire().term is None  # first in line, and named by the release
    winners, _ = _run_followers(leases, 6, 10.0)
    time.sleep(0.2)
    admin = leases.client()
    before = _evalsha_calls(admin)
    assert holder.release(term)
    wait_for(lambda: winners, 5, what="a new holder")
    time.sleep(1.0)  # past the head start of the third in line and more
    assert winners == ["f0"], "the next in line takes over"
    assert _evalsha_calls(admin) - before == 2, "the release and one acquire: no herd"


def test_a_release_skips_waiters_the_holder_sees_dead(leases: Leases) -> None:
    holder = leases.lease("holder", 10.0)
    term = must_acquire(holder)
    ghost = leases.lease("ghost", 10.0)
    assert ghost.acquire().term is None
    winners, followers = _run_followers(leases, 2, 10.0)
    time.sleep(0.2)
    live = {holder.hostname, *(f.hostname for f in followers)}
    admin = leases.client()
    before = _evalsha_calls(admin)
    assert holder.release(term, live=live)
    wait_for(lambda: winners, 5, what="a new holder")
    time.sleep(0.3)
    assert winners == ["f0"] and _evalsha_calls(admin) - before == 2
    assert admin.zscore(holder.waiters_key, ghost.hostname) is None, "the dead waiter is dropped"


class _CountingEvent(threading.Event):
    """An Event that counts how often it was set: how often a waiter's thread was woken."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_renewals_wake_no_waiter_and_a_release_wakes_only_the_front_of_the_queue(
    leases: Leases,
) -> None:
    """A fleet of followers costs its workers nothing per renewal and a few wake-ups per
    release: waking every waiter's thread at every message is what made 2,000 activators
    take 100 ms to elect (bench/scale.py)."""
    count = lease_wait.NUDGE_RANKS + 4
    holder = leases.lease("holder", 10.0)
    term = must_acquire(holder)
    wakes: dict[str, _CountingEvent] = {}

    def count_wakes(follower: RedisLease) -> None:
        follower._nudged = wakes[follower.holder_id] = _CountingEvent()

    winners, followers = _run_followers(leases, count, 10.0, prepare=count_wakes)
    # Queued in this order, but two in the same millisecond rank by name (f10 before f9):
    # the rank each took as it joined is then stale until its thread looks again (the
    # first thing it does), so wait for those looks, not just for a rank each.
    wait_for(
        lambda: sorted(f.rank for f in followers if f.rank is not None) == list(range(count)),
        5,
        what="every follower queued, each at its own rank",
    )
    queue = sorted(followers, key=lambda f: f.rank or 0)

    # A lease that only listens: once it heard the fourth renewal, the listener has told
    # every waiter of the first three (it tells all of them of one message, then reads on).
    probe = leases.lease("probe", 10.0, listener=followers[0]._listener)
    heard: list[str] = []
    notify = probe.notify
    probe.notify = lambda kind, ttl_ms, extra="": (  # type: ignore[method-assign]
        heard.append(kind),
        notify(kind, ttl_ms, extra),
    )[1]
    for _ in range(4):
        assert holder.renew(term)
    wait_for(lambda: heard.count("renewed") >= 4, 5, what="renewals heard")
    assert sum(event.sets for event in wakes.values()) == 0, "a renewal woke a waiter"

    assert holder.release(term)
    wait_for(lambda: winners, 5, what="a new holder")
    near = queue[1 : lease_wait.NUDGE_RANKS + 1]  # ranks 1 .. NUDGE_RANKS
    far = queue[lease_wait.NUDGE_RANKS + 1 :]
    # The new term is announced after the release: once the far ones heard it, every
    # waiter heard the release.
    wait_for(lambda: all(f._acquired_until for f in far), 5, what="the new term heard")
    assert winners == [queue[0].holder_id]
    assert all(wakes[f.holder_id].sets == 1 for f in near), {
        f.holder_id: wakes[f.holder_id].sets for f in near
    }
    assert all(wakes[f.holder_id].sets == 0 for f in far), {
        f.holder_id: wakes[f.holder_id].sets for f in far
    }


def test_a_waiter_too_far_back_to_be_woken_still_takes_over_when_those_ahead_are_gone(
    leases: Leases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody ahead ever tries: the waiter the release did not wake tries at the deadline
    it already had (the released lease's expiry), so the Stoker is back within one TTL."""
    monkeypatch.setattr(lease_wait, "NUDGE_RANKS", 0)
    ttl = 1.0
    holder = leases.lease("holder", ttl)
    term = must_acquire(holder)
    ghost = leases.lease("ghost", ttl)
    assert ghost.acquire().term is None  # first in line, named by the release, never tries
    listener = leases.listener()
    far = leases.lease("far", ttl, listener=listener)
    far._nudged = wakes = _CountingEvent()
    result = far.acquire()
    assert result.term is None and far.rank == 1
    woke = threading.Event()

    def follow() -> None:
        woke.set() if far.wait(far.wait_timeout(result.holder)) else None

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    released_at = time.monotonic()
    assert holder.release(term)
    assert woke.wait(5 * ttl), "the waiter behind the silent first one never took its turn"
    assert wakes.sets == 0, "the release woke a waiter too far back"
    assert time.monotonic() - released_at <= ttl + 1.0
    assert must_acquire(far).token > term.token


def test_closing_a_term_gives_it_a_whole_ttl_and_lets_no_event_of_it_start(
    leases: Leases,
) -> None:
    """A stepping-down holder's one round trip: time for shutdown and the release, and
    the mark that keeps a queued event of its term from starting."""
    from celery_stoker.store import StokerStore

    ttl = 2.0
    lease = leases.lease("h", ttl)
    term = must_acquire(lease)
    admin = leases.client()
    store = StokerStore(leases.client(), "job", key_prefix=PREFIX)
    assert store.term_accepts_events(term.token)
    admin.pexpire(lease.lease_key, 100)  # nearly over in Redis
    before = time.monotonic()
    assert lease.close_term(term)
    assert admin.pttl(lease.lease_key) > 1500, "closing gives the term a whole TTL"
    assert term.valid_until >= before + lease_module.validity(ttl)
    assert not store.term_accepts_events(term.token), "no event of a closing term starts"

    assert lease.release(term)
    other = leases.lease("o", ttl)
    newer = must_acquire(other)
    assert not lease.close_term(term), "a term that is not ours any more is not closed"
    assert store.term_accepts_events(newer.token), "the newer term was left alone"
    admin.delete(lease.lease_key)
    assert not other.close_term(newer) and other.vanished


# --- lost history -----------------------------------------------------------------------------


def test_a_term_on_a_redis_restored_from_an_older_snapshot_says_history_was_lost(
    redis_server: RedisServer, own_leases: Leases, tmp_path: Path
) -> None:
    """ACQUIRE compares the counter with the caller's highest token (issue 23, point 2).

    A real ``redis-server`` is restored from an RDB file saved two terms ago: the
    counter comes back below a token the caller saw.  The new term's lease value
    carries ``lost`` (seen, held), parsed into ``Term.history_lost`` and
    ``Holder.history_lost``; a caller who saw nothing newer finds nothing amiss.
    """
    lease = own_leases.lease("a", 5.0)
    old_term = must_acquire(lease)
    assert old_term.history_lost is None
    assert lease.release(old_term)
    old_rdb = redis_server.snapshot(tmp_path / "old.rdb")
    highest = 0
    for _ in range(2):
        term = must_acquire(lease, min_token=highest)
        assert term.history_lost is None, "a term on an intact Redis claims lost history"
        highest = term.token
        assert lease.release(term)

    redis_server.restart_from(old_rdb)
    client = redis_server.client()
    assert int(client.get(token_key(PREFIX, "job"))) == old_term.token
    restored = must_acquire(lease, min_token=highest)
    assert restored.history_lost == (highest, old_term.token)
    assert restored.token > highest
    assert not restored.fresh
    holder = Holder.parse(client.get(lease_key(PREFIX, "job")), None)
    assert holder.history_lost == (highest, old_term.token)
    assert holder.token == restored.token  # COMMIT's digit match still finds the token
    assert lease.release(restored)
    # The next term, from a caller that saw the restored one, finds the counter in step.
    after = must_acquire(lease, min_token=restored.token)
    assert after.history_lost is None
    assert lease.release(after)

    # A caller that remembers nothing newer than Redis has is told nothing.
    redis_server.restart_from(old_rdb)
    assert must_acquire(lease, min_token=old_term.token).history_lost is None


def test_a_term_on_a_redis_that_lost_everything_says_history_was_lost_when_a_token_was_seen(
    redis_server: RedisServer, own_leases: Leases
) -> None:
    lease = own_leases.lease("a", 5.0)
    first = must_acquire(lease)
    assert first.fresh and first.history_lost is None  # the first term ever: nothing lost
    assert lease.release(first)
    redis_server.restart(empty=True)
    term = must_acquire(lease, min_token=first.token)
    assert term.fresh
    assert term.history_lost == (first.token, 0)
