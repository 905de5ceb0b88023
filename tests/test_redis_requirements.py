"""What celery-stoker needs of its Redis, and what a worker says when it does not get it.

Real ``redis-server`` processes with real ACL users and memory policies, real
``celery worker`` processes and the real ``celery stoker status`` command: the
the docs' ``ACL SETUSER`` line (docs/redis.md) is enough for a worker and the CLI; a user that
lacks a command is named at start, shows in health, never flaps, and recovers
when the ACL is fixed; an election error shows in ``status`` and ``inspect``;
an eviction policy other than ``noeviction`` and a lease that vanishes are said
in the log, and the vanished term's ``shutdown`` is marked stale.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from support.workers import ROOT, Fleet, Records, check_terms, status_views, stoker_status

from celery_stoker import access
from celery_stoker.lease import RedisLease
from celery_stoker.testing import RedisServer, wait_for

APP = "tests.apps.recorder"
PASSWORD = "s3cret"


def docs_acl_line() -> str:
    """The ``ACL SETUSER`` line docs/redis.md ("Redis requirements") tells users to run."""
    text = (ROOT / "docs" / "redis.md").read_text()
    found = re.findall(r"^(ACL SETUSER stoker .*)$", text, flags=re.MULTILINE)
    assert len(found) == 1, f"docs/redis.md should show one ACL SETUSER line, found {found}"
    return found[0].strip()


def create_user(server: RedisServer, line: str, *changes: str) -> str:
    """Run an ``ACL SETUSER`` line (password filled in), then ``changes``; the user's URL."""
    admin = server.client()
    admin.execute_command(*shlex.split(line.replace("PASSWORD", PASSWORD)))
    if changes:
        admin.execute_command("ACL", "SETUSER", "stoker", *changes)
    return f"redis://stoker:{PASSWORD}@127.0.0.1:{server.port}/0"


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery stoker status`` as a user runs it, with the workers' environment."""
    return stoker_status(APP, env, *args)


def status_json(env: dict[str, str]) -> dict[str, Any]:
    return next(v for v in status_views(APP, env, "--timeout", "2") if v["name"] == "recorder")


def recorder_row(env: dict[str, str]) -> str:
    out = status(env, "--timeout", "2")
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("recorder"))


# ------------------------------------------------------------------- the ACL


def test_the_documented_acl_line_is_the_one_the_code_needs() -> None:
    assert docs_acl_line() == access.acl_line("stoker", user="stoker", password="PASSWORD")


@pytest.mark.workers
def test_a_worker_and_status_run_as_the_documented_acl_user(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    url = create_user(redis_server, docs_acl_line())
    fleet = fleets("prefork", STOKER_TEST_URL=url, STOKER_TEST_TIMER="0.25")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 3, 30, what="timers as the ACL user")
    w2 = fleet.start("w2@%h").wait_ready()
    w1.sigterm()  # a release, a handover and a new term: every script, as that user
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node], 30, what="w2 leads"
    )
    row = recorder_row(fleet.env)
    assert w2.node in row and row.rstrip().endswith("ok"), row
    view = status_json(fleet.env)
    assert view["leader"] == w2.node
    assert view["workers"][w2.node]["health"]["status"] == "ok"
    w1.wait_exit()
    for worker in (w1, w2):
        log = worker.log()
        for refusal in ("NOPERM", "no permissions", "can't run this command"):
            assert refusal not in log, f"{worker.node}: {refusal!r} in its log"
    check_terms(records.events())


def test_scripts_do_not_fail_half_way_when_publish_is_refused(redis_server: RedisServer) -> None:
    """Announcements are best effort: the lease is taken, renewed and released all the same."""
    url = create_user(redis_server, docs_acl_line(), "-publish")
    import redis

    client = redis.Redis.from_url(url)
    lease = RedisLease(client, "half", holder_id="h1", hostname="w1@test", ttl=2.0)
    result = lease.acquire()
    assert result.term is not None
    admin = redis_server.client()
    admin.pexpire(lease.lease_key, 500)
    assert lease.renew(result.term) is True
    assert admin.pttl(lease.lease_key) > 1500  # the PEXPIRE before the refused PUBLISH stood
    assert lease.release(result.term) is True
    assert admin.get(lease.lease_key) is None


@pytest.mark.workers
@pytest.mark.parametrize("missing", ["publish", "evalsha"])
def test_a_user_without_a_command_is_told_at_start_and_recovers(
    fleets: Callable[..., Fleet],
    redis_server: RedisServer,
    records: Records,
    missing: str,
) -> None:
    url = create_user(redis_server, docs_acl_line(), f"-{missing}")
    fleet = fleets("solo", STOKER_TEST_URL=url, STOKER_TEST_ACL_RECHECK="1")
    w1 = fleet.start("w1@%h").wait_ready()

    def error_lines() -> list[str]:
        return [line for line in w1.log().splitlines() if "ERROR" in line and "ACL" in line]

    first = wait_for(error_lines, 20, what="the ERROR naming the missing command")[0]
    assert f"may not run {missing}" in first
    assert "ACL SETUSER <user> on ><password> resetkeys ~stoker:* resetchannels &stoker:*" in first
    view = wait_for(
        lambda: (v := status_json(fleet.env))["workers"].get(w1.node, {}).get("health", {}) and v,
        20,
        what="w1 in status",
    )
    activator = view["workers"][w1.node]
    assert activator["health"]["status"] == "error"
    assert missing in activator["health"]["error"]
    assert activator["health"]["since"]
    assert missing in (activator["last_error"] or "")  # what `inspect stoker` shows
    row = recorder_row(fleet.env)
    assert "(none)" in row and f"error on {w1.node}: NOPERM" in row, row
    # Several rechecks later (one a second): still quiet, and no term ever taken (no flapping).
    since = datetime.fromisoformat(activator["health"]["since"])
    wait_for(
        lambda: (datetime.now(timezone.utc) - since).total_seconds() > 3.5, 10, what="rechecks"
    )
    assert records.events() == []
    assert len(error_lines()) == 1
    assert "Traceback" not in w1.log()

    redis_server.client().execute_command("ACL", "SETUSER", "stoker", f"+{missing}")
    wait_for(lambda: records.of("now_leader"), 20, what="a leader once the ACL is fixed")
    assert "may now run every command" in w1.log()
    wait_for(
        lambda: status_json(fleet.env)["workers"][w1.node]["health"]["status"] == "ok",
        10,
        what="health ok again",
    )


@pytest.mark.workers
def test_a_command_taken_away_while_leading_steps_down_and_both_recover(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """EVALSHA revoked under a leader and a follower, then given back: no overlap, and
    both say ``ok`` again at once (the follower, whose wait moves with each of the new
    leader's renewals, kept showing the NOPERM error for as long as that leader led)."""
    url = create_user(redis_server, docs_acl_line())
    fleet = fleets(
        "solo", STOKER_TEST_URL=url, STOKER_TEST_ACL_RECHECK="1", STOKER_TEST_TIMER="0.25"
    )
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads")
    w2 = fleet.start("w2@%h").wait_ready()
    workers = (w1, w2)
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "stoker", "-evalsha")

    def healths() -> dict[str, str]:
        view = status_json(fleet.env)
        return {
            w.node: view["workers"].get(w.node, {}).get("health", {}).get("status", "")
            for w in workers
        }

    wait_for(lambda: set(healths().values()) == {"error"}, 20, what="both say error")
    wait_for(lambda: records.of("shutdown"), 10, what="w1's shutdown")
    for worker in workers:  # nothing answered yet: nothing is "working again"
        assert "election working again" not in worker.log(), worker.node
    admin.execute_command("ACL", "SETUSER", "stoker", "+evalsha")
    restored = records.events()[-1].at
    wait_for(lambda: [r for r in records.of("timer") if r.at > restored], 20, what="a leader again")
    wait_for(lambda: set(healths().values()) == {"ok"}, 10, what="both say ok again")
    for worker in workers:
        acl_errors = [
            line for line in worker.log().splitlines() if "ERROR" in line and "ACL" in line
        ]
        assert len(acl_errors) == 1, (worker.node, acl_errors)
    check_terms(records.events())


@pytest.mark.workers
def test_reports_refused_while_leading_are_said_once(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """LPUSH taken away: every event's report is refused; said once per end, not per event."""
    url = create_user(redis_server, docs_acl_line())
    fleet = fleets("solo", STOKER_TEST_URL=url, STOKER_TEST_TIMER="0.25")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads")
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "stoker", "-lpush")
    revoked = records.events()[-1].at
    wait_for(
        lambda: len([r for r in records.of("timer") if r.at > revoked]) >= 5,
        30,
        what="five timers without their reports",
    )
    log = w1.log()
    assert log.count("could not report the end of timer") == 1, log
    assert log.count("its report never arrived") == 1, log
    admin.execute_command("ACL", "SETUSER", "stoker", "+lpush")
    wait_for(lambda: "report their end again" in w1.log(), 20, what="reports again")
    check_terms(records.events())


@pytest.mark.workers
def test_a_lease_channel_refused_by_the_acl_is_said_once_without_reconnecting(
    fleets: Callable[..., Fleet], redis_server: RedisServer, records: Records
) -> None:
    """The channel pattern taken away: Redis drops the listener, and its SUBSCRIBE is refused.

    The listener said "lost Redis (ConnectionError ...)", then reconnected (a new
    connection, AUTH and a refused SUBSCRIBE) every 0.5 s and at every lease
    command, forever, without a word of NOPERM.
    """
    url = create_user(redis_server, docs_acl_line())
    fleet = fleets("solo", STOKER_TEST_URL=url, STOKER_TEST_TIMER="0.25")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads")
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "stoker", "resetchannels")

    def said() -> list[str]:
        return [ln for ln in w1.log().splitlines() if "may not subscribe" in ln]

    line = wait_for(said, 20, what="the listener's NOPERM said")[0]
    assert "ERROR" in line and "&<prefix>:*" in line, line
    before = int(admin.info("stats")["total_connections_received"])
    seen = len(records.of("timer"))
    wait_for(lambda: len(records.of("timer")) >= seen + 8, 20, what="the leader carries on")
    after = int(admin.info("stats")["total_connections_received"])
    assert after - before <= 1, f"{after - before} new connections while refused"
    assert len(said()) == 1
    check_terms(records.events())


# ------------------------------------------------------ election errors shown


@pytest.mark.workers
def test_an_election_refused_by_oom_shows_in_status_and_inspect(
    fleets: Callable[..., Fleet], make_redis_server: Callable[..., RedisServer]
) -> None:
    full = make_redis_server(extra_args=["--maxmemory", "1", "--maxmemory-policy", "noeviction"])
    fleet = fleets("solo", STOKER_TEST_URL=full.url)
    w1 = fleet.start("w1@%h").wait_ready()
    wait_for(lambda: "OutOfMemoryError" in w1.log(), 20, what="the OOM in the log")
    view = status_json(fleet.env)
    activator = view["workers"][w1.node]
    assert activator["health"]["status"] == "error"
    assert "OutOfMemoryError" in activator["health"]["error"]
    assert "maxmemory" in activator["health"]["error"]
    assert activator["election_error_since"] and activator["health"]["since"]
    assert "OutOfMemoryError" in (activator["last_error"] or "")
    assert activator["state"] != "leader" and view["leader"] is None
    row = recorder_row(fleet.env)
    assert f"error on {w1.node}: OutOfMemoryError" in row, row


# ------------------------------------------------------------------ eviction


@pytest.mark.workers
def test_an_eviction_policy_is_warned_and_a_vanished_lease_is_said_and_stale(
    fleets: Callable[..., Fleet],
    make_redis_server: Callable[..., RedisServer],
    records: Records,
) -> None:
    server = make_redis_server(extra_args=["--maxmemory-policy", "volatile-lru"])
    fleet = fleets("solo", STOKER_TEST_URL=server.url, STOKER_TEST_TIMER="0.2")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: len(records.of("timer")) >= 2, 30, what="w1 leads, with timers")
    warnings = [line for line in w1.log().splitlines() if "maxmemory-policy volatile-lru" in line]
    assert len(warnings) == 1 and "noeviction" in warnings[0], warnings
    first = records.of("now_leader")[0]
    server.client().delete("stoker:{recorder}:lease")  # as an eviction would
    shutdown = wait_for(
        lambda: [r for r in records.raw("event") if r["event"] == "shutdown"], 20, what="shutdown"
    )[0]
    assert shutdown["token"] == first.token and shutdown["reason"] == "lease_lost"
    assert shutdown["stale"] is True
    said = [line for line in w1.log().splitlines() if "vanished" in line]
    assert len(said) == 1 and "possible eviction (maxmemory-policy volatile-lru" in said[0]
    # The next term starts from the state the stale shutdown could not store.
    nxt = wait_for(
        lambda: [r for r in records.of("now_leader") if r.token > first.token], 20, what="next"
    )[0]
    assert nxt.events == shutdown["events"]
    check_terms(records.events())
