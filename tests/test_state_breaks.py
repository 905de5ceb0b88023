"""Breaks of issue 23 (state you can trust): the worker's state copies on disk.

Real forked processes and a real TMPDIR; no mocks.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.tcp_proxy import TcpProxy
from support.workers import Fleet, Records, shutdown_after_cut, status_views

from celery_stoker import copies as module
from celery_stoker.copies import StateCopies, StateCopy
from celery_stoker.keys import lease_key
from celery_stoker.testing import RedisServer, wait_for


@pytest.fixture
def tmpdir_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A TMPDIR of the test's own, as the worker would see it."""
    base = tmp_path / "tmp"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base


def test_a_killed_worker_s_copies_are_swept_when_its_pid_comes_back(tmpdir_base: Path) -> None:
    """A container restarted in place (``docker restart``) keeps its /tmp, and its
    worker gets the same pid (1, or 7 under an init) every time.  The copies a
    killed worker left behind (up to one state per Stoker, 10 MB each) carry that
    pid, with another secret: they are of a process that is gone, and must be swept
    like any other, not kept forever because the pid is ours again."""
    leftover = tmpdir_base / f"{module.PREFIX}{os.getpid()}-0123456789abcdef"
    leftover.mkdir(mode=0o700)
    (leftover / "x.state").write_bytes(b"{}\n" + b"x" * 1024)
    kept = StateCopies()
    kept.claim()
    try:
        assert not leftover.exists(), "a dead worker's copies kept because its pid came back"
    finally:
        kept.close()


#: A pid no process has here (above the kernel's pid_max).
UNSEEN_PID = 4_194_305


def test_a_live_worker_in_another_pid_namespace_keeps_its_copies(tmpdir_base: Path) -> None:
    """Two containers sharing a TMPDIR (a pod's emptyDir mounted at /tmp): the other
    worker's pid is not a process here, yet it is alive and its copies are in use.
    A starting worker must not sweep them; once that worker is gone, it may."""
    other = tmpdir_base / f"{module.PREFIX}{UNSEEN_PID}-fedcba9876543210"
    other.mkdir(mode=0o700)
    (other / "x.state").write_bytes(b"{}\n{}")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(other / module.LOCK)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        kept = StateCopies()
        kept.claim()
        kept.close()
        assert (other / "x.state").exists(), "a live worker's copies were swept"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    again = StateCopies()
    again.claim()
    again.close()
    assert not other.exists(), "a gone worker's copies were kept"


def test_a_copy_that_cannot_be_written_leaves_no_partial_file(tmpdir_base: Path) -> None:
    """A TMPDIR that fills up (a tmpfs sized for the states, a full disk) fails a
    pool process's write part way: the half-written ``.part`` file must go, not
    hold the space a later copy needs (each pool process has its own name, so
    with ``--max-tasks-per-child`` they pile up)."""
    kept = StateCopies()
    kept.claim()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, as a prefork pool process
            try:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
                big = StateCopy("application/json", "utf-8", b"x" * (1024 * 1024), 1, 1)
                kept.keep("w1@h", "s", big)  # never raises: said once and skipped
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        folder = module.directory()
        left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert not [n for n in left if n.endswith(".part")], left
        assert kept.last("w1@h", "s") is None
    finally:
        kept.close()


def copy_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if "could not keep a copy of its state" in line]


@pytest.mark.workers
def test_a_tmpdir_gone_under_one_task_per_child_is_said_once_not_per_event(
    fleets: Callable[..., Fleet], records: Records, tmp_path: Path
) -> None:
    """TMPDIR removed under a running worker (a tmp cleaner, a volume unmounted):
    every pool process fails to keep its copy.  With ``--max-tasks-per-child 1``
    each event runs in a new process, so "said once per process" is a WARNING per
    event, forever: the log must say it once per worker."""
    base = tmp_path / "worker-tmp"
    base.mkdir()
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.2", TMPDIR=str(base))
    w1 = fleet.start("w1@%h", extra_args=("--max-tasks-per-child", "1"))
    wait_for(lambda: len(records.of("timer")) >= 3, 60, what="timers on w1")
    shutil.rmtree(base)
    seen = len(records.of("timer"))
    wait_for(lambda: len(records.of("timer")) >= seen + 10, 60, what="10 timers more")
    said = copy_warnings(w1.log())
    assert 1 <= len(said) <= 2, said


@pytest.mark.workers
def test_unreplicated_commits_under_one_task_per_child_are_said_once_not_per_event(
    fleets: Callable[..., Fleet], records: Records
) -> None:
    """``stoker_min_replicas`` above the replicas a Redis has: every commit fails
    (documented).  "Said once until a commit is replicated again" must hold for
    the worker, not for each pool process: under ``--max-tasks-per-child 1``
    each event runs in a new one."""
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.2", STOKER_TEST_MIN_REPLICAS="1")
    w1 = fleet.start("w1@%h", extra_args=("--max-tasks-per-child", "1"))
    wait_for(lambda: len(records.events()) >= 10 and records.events(), 90, what="10 failed events")
    said = [
        line
        for line in w1.log().splitlines()
        if "does not count as stored" in line and "WARNING" in line
    ]
    assert 1 <= len(said) <= 2, said


@pytest.mark.workers
@pytest.mark.parametrize("pool", ["solo", "gevent", "prefork-one-task-per-child"])
def test_a_10_mb_state_cut_off_leader_runs_shutdown_from_its_last_commit(
    pool: str,
    redis_server: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    """With a 10 MB state the cut-off leader's shutdown starts from the last commit:
    kept in memory (solo, gevent), or in the file of a pool process that is gone
    by then (each event in a new process)."""
    if pool == "gevent":
        pytest.importorskip("gevent")
    extra: tuple[str, ...] = ()
    if pool == "prefork-one-task-per-child":
        pool, extra = "prefork", ("--max-tasks-per-child", "1")
    proxy = tcp_proxy(redis_server.port)
    fleet = fleets(
        pool, ttl=3.0, STOKER_TEST_TIMER="0.3", STOKER_TEST_STATE_BYTES=str(10 * 1024 * 1024)
    )
    w1 = fleet.start(
        "w1@%h",
        env={"STOKER_TEST_BROKER": f"redis://127.0.0.1:{proxy.port}/0"},
        extra_args=extra,
    )
    wait_for(lambda: len(records.of("timer")) >= 3, 90, what="timers on w1")
    proxy.blackhole()
    shutdown_after_cut(records, w1.node, least=3, timeout=30)
    proxy.heal()


#: A state as the json serializer writes it; a worker set to yaml cannot read it.
JSON_STATE = {
    b"body": b'{"events": 7, "timers": 0}',
    b"content_type": b"application/json",
    b"content_encoding": b"utf-8",
    b"token": b"1",
    b"version": b"3",
}


@pytest.mark.workers
def test_a_leader_cut_off_while_its_state_is_unreadable_stops_cleanly(
    redis_server: RedisServer,
    records: Records,
    fleets: Callable[..., Fleet],
    tcp_proxy: Callable[[int], TcpProxy],
) -> None:
    """A term retrying an unreadable state loses its lease (a partition): its
    shutdown must neither hang nor crash the worker, and the unreadable state
    stays untouched."""
    client = redis_server.client()
    client.hset("stoker:{recorder}:state", mapping=JSON_STATE)
    proxy = tcp_proxy(redis_server.port)
    fleet = fleets("prefork", ttl=2.0, STOKER_TEST_STATE_SERIALIZER="yaml")
    w1 = fleet.start("w1@%h", env={"STOKER_TEST_BROKER": f"redis://127.0.0.1:{proxy.port}/0"})
    wait_for(lambda: "cannot be read" in w1.log(), 60, what="the unreadable-state ERROR")
    proxy.blackhole()
    wait_for(lambda: "steps down (lease_lost)" in w1.log(), 30, what="the term cut off")
    # No callback of the term ran (no shutdown to send), or its shutdown starts from the
    # worker's copy, as unreadable as the key: no callback either way.
    wait_for(
        lambda: any(
            said in w1.log() for said in ("no shutdown to send", "as this worker copied it")
        ),
        30,
        what="the cut-off term's shutdown skipped",
    )
    assert not records.of("shutdown"), "shutdown ran on a state it could not read"
    proxy.heal()
    assert w1.stop(timeout=30) is not None, "the worker did not stop"
    assert "Traceback" not in w1.log(), w1.log_tail()
    assert client.hgetall("stoker:{recorder}:state") == JSON_STATE


@pytest.mark.workers
@pytest.mark.parametrize(
    "lost",
    ['"lost"', '{"seen":true,"held":false}', '{"seen":[1],"held":{}}', '{"seen":1e999}'],
)
def test_garbage_in_a_lease_value_s_lost_field_never_crashes_and_is_not_shown(
    lost: str, redis_server: RedisServer, records: Records, fleets: Callable[..., Fleet]
) -> None:
    """A lease value of another making (by hand, another version) with a ``lost``
    field that is not two integers: the worker waits it out, status shows no
    history_lost, and the next term is the worker's own."""
    client = redis_server.client()
    value = (
        '{"v":1,"token":5,"since":1,"holder":"ghost","host":"ghost@h",'
        f'"app":"tests.apps.recorder","lost":{lost}}}'
    )
    client.set(lease_key("stoker", "recorder"), value, px=4000)
    fleet = fleets("solo", STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h")
    view = wait_for(
        lambda: next(
            (
                v
                for v in status_views("tests.apps.recorder", fleet.env, "--timeout", "2")
                if v["name"] == "recorder" and v.get("leader")
            ),
            None,
        ),
        30,
        what="status naming the ghost leader",
    )
    assert view.get("history_lost") is None, view
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads once the ghost's lease ends")
    assert "Traceback" not in w1.log(), w1.log_tail()


@pytest.mark.workers
def test_a_stoker_redis_restarted_empty_waits_one_ttl_said_once(
    records: Records,
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """Redis restarted empty is now "history lost" too (the fleet saw tokens the
    missing counter cannot account for): the term waits one TTL, once, and says
    one thing, not also the "no record of earlier terms" quarantine."""
    ttl = 3.0
    store = make_redis_server()
    fleet = fleets(ttl=ttl, STOKER_TEST_URL=store.url_for(0), STOKER_TEST_TIMER="0.3")
    workers = [fleet.start(f"w{i}@%h") for i in (1, 2)]
    first = wait_for(lambda: records.of("now_leader"), 30, what="a leader")[0]
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers")
    before = [len(w.log()) for w in workers]
    store.restart(empty=True)
    again = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token],
        60,
        what="now_leader after the restart",
    )[0]
    told = [e for e in records.raw("event") if int(e["token"]) == again.token]
    assert told and all(e["history_lost"] is True for e in told), told
    logs = "".join(w.log()[n:] for w, n in zip(workers, before, strict=True))
    said = [line for line in logs.splitlines() if "holds less history than the fleet" in line]
    assert len(said) == 1, said
    assert f"acts in {ttl:.1f} s" in said[0], said
    assert "holds no record of earlier terms" not in logs


@pytest.mark.workers
def test_reports_refused_by_a_full_redis_under_one_task_per_child_are_said_once(
    records: Records,
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """A full Stoker Redis (maxmemory, noeviction) refuses each event's report:
    "said once until a report goes through" must hold for the worker, not for
    each pool process (under ``--max-tasks-per-child 1``, one per event)."""
    store = make_redis_server()
    fleet = fleets("prefork", STOKER_TEST_URL=store.url_for(0), STOKER_TEST_TIMER="0.3")
    w1 = fleet.start("w1@%h", extra_args=("--max-tasks-per-child", "1"))
    wait_for(lambda: len(records.of("timer")) >= 3, 60, what="timers on w1")
    client = store.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    seen = len(records.of("timer"))
    try:
        wait_for(lambda: len(records.of("timer")) >= seen + 6, 60, what="6 timers more")
    finally:
        client.config_set("maxmemory", "0")
    said = [x for x in w1.log().splitlines() if "could not report the end of" in x]
    assert 1 <= len(said) <= 2, said
