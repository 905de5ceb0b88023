"""``celery stoker status --watch`` under a real terminal, and ``handoff`` of an unknown name.

``--watch`` runs in a pseudo-terminal (:mod:`pty`), as it would in an operator's
shell: it must redraw, show the last transitions, and end cleanly on Ctrl-C.
Both views escape what they print from Redis: a crafted record (anyone with
write access to Redis can make one) must not reach the terminal as control
sequences.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

import pytest
from support.workers import ROOT, Fleet, Records, stoker_status

from celery_stoker.keys import draining_key, info_key, lease_key, transitions_key
from celery_stoker.testing import RedisServer, wait_for

APP = "tests.apps.recorder"
STAMP = re.compile(r"updated (\d\d:\d\d:\d\d)")


def _env(fleet_env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        **fleet_env,
        "PYTHONPATH": str(ROOT),
        "TERM": "xterm",
        "COLUMNS": "200",
        "LINES": "50",
    }


def run_in_terminal(
    argv: list[str], env: dict[str, str], until: Callable[[str], bool], timeout: float = 60
) -> tuple[str, int, str]:
    """Run ``argv`` on a pseudo-terminal until ``until(output)``, then Ctrl-C it.

    Returns the output up to the interrupt, the exit status, and the output after it.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr are the terminal
        try:
            # Ctrl-C must reach it even when the suite was started in the background
            # (a non-interactive shell's `cmd &` ignores SIGINT, and exec keeps that).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    out = ""
    deadline = time.monotonic() + timeout
    try:
        while not until(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the terminal showed:\n{out[-3000:]}")
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    out += os.read(fd, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal: it exited
                    raise AssertionError(f"exited early; the terminal showed:\n{out}") from None
        os.kill(pid, signal.SIGINT)
        after = ""
        end = time.monotonic() + 20
        reading = True
        while time.monotonic() < end:
            ready, _, _ = select.select([fd] if reading else [], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the terminal is closed (EIO): only the exit is left
                    chunk = b""
                reading = bool(chunk)
                after += chunk.decode(errors="replace")
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return out, os.waitstatus_to_exitcode(status), after
        raise AssertionError(f"still running 20 s after Ctrl-C; it showed:\n{after[-2000:]}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


@pytest.mark.workers
def test_watch_redraws_in_a_terminal_until_ctrl_c(
    fleets: Callable[..., Fleet], records: Records
) -> None:
    fleet = fleets("solo")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    argv = [sys.executable, "-m", "celery", "-A", APP, "stoker", "status", "--watch"]

    def two_redraws(out: str) -> bool:
        return len(set(STAMP.findall(out))) >= 2 and w1.node in out

    out, code, _ = run_in_terminal(argv, _env(fleet.env), two_redraws)
    assert code == 0
    assert "STOKER" in out and "LEADER" in out and "recorder" in out
    assert "last transitions (newest first)" in out
    assert "elected" in out  # w1's election, under the table
    assert "\x1b[" in out  # drawn with the terminal's control sequences (rich)


@pytest.mark.workers
def test_watch_without_a_terminal_prints_once(
    fleets: Callable[..., Fleet], records: Records
) -> None:
    fleet = fleets("solo")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    out = stoker_status(APP, _env(fleet.env), "--watch")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["STOKER", "LEADER", "TOKEN"]
    assert sum(line.startswith("STOKER") for line in lines) == 1
    assert w1.node in next(line for line in lines if line.startswith("recorder"))
    assert "\x1b[" not in out.stdout


def test_watch_without_rich_says_how_to_install_it(redis_server: RedisServer) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"  # as if rich were not installed
        "from celery.bin.celery import main\n"
        f"sys.argv = ['celery', '-A', '{APP}', 'stoker', 'status', '--watch']\n"
        "main()\n"
    )
    env = _env({"STOKER_TEST_BROKER": redis_server.url_for(0)})
    out, _, _ = run_in_terminal(
        [sys.executable, "-c", code], env, lambda out: "pip install" in out or "Error" in out
    )
    assert "status --watch needs the rich package: pip install rich" in out
    assert "celery-stoker[demo]" in out


def test_handoff_of_an_unknown_name_lists_the_known_ones(redis_server: RedisServer) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STOKER_TEST_BROKER": redis_server.url_for(0),
        "STOKER_TEST_EXTRA_STOKERS": "2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "stoker", "handoff", "nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "no Stoker named nope; known: idle-0, idle-1, recorder" in out.stderr


#: Retitles the terminal (OSC 0, ended by BEL), then clears the screen (CSI 2J).
EVIL = "\x1b]0;pwned\x07\x1b[2J"
EVIL_SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J"


def craft_record(server: RedisServer) -> None:
    """A lease, a record, a transition and a draining mark whose names carry :data:`EVIL`."""
    client = server.client()
    lease = {
        "v": 1,
        "host": f"leader{EVIL}@h",
        "holder": "x",
        "token": 7,
        "since": int(time.time() * 1000),
        "app": "recorder",
    }
    client.set(lease_key("stoker", "recorder"), json.dumps(lease), px=120_000)
    client.hset(
        info_key("stoker", "recorder"),
        mapping={
            "token": "7",
            "followers": json.dumps([f"follower{EVIL}@h"]),
            "last_event": f"timer{EVIL}",
        },
    )
    transition = {"event": "elected", "node": f"node{EVIL}@h", "token": 7, "at": time.time()}
    client.lpush(transitions_key("stoker", "recorder"), json.dumps(transition))
    client.sadd(draining_key("stoker"), f"drained{EVIL}@h")


def test_status_escapes_what_it_reads_from_redis(redis_server: RedisServer) -> None:
    craft_record(redis_server)
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP, "stoker", "status", "--timeout", "0.5"],
        cwd=ROOT,
        env=_env({"STOKER_TEST_BROKER": redis_server.url_for(0)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    for name in ("leader", "follower", "timer", "node", "drained"):
        assert f"{name}{EVIL_SHOWN}" in out.stdout, (name, out.stdout)


def test_watch_escapes_what_it_reads_from_redis(redis_server: RedisServer) -> None:
    craft_record(redis_server)
    argv = [sys.executable, "-m", "celery", "-A", APP, "stoker", "status", "--watch"]
    argv += ["--timeout", "0.5"]
    env = _env({"STOKER_TEST_BROKER": redis_server.url_for(0)})
    out, code, _ = run_in_terminal(argv, env, lambda out: "drained" in out and "node" in out)
    assert code == 0
    # rich draws with control sequences of its own; none of the crafted ones get through.
    assert "]0;pwned" not in out.replace("\\x1b]0;pwned", "")
    for name in ("leader", "follower", "node", "drained"):
        assert f"{name}{EVIL_SHOWN}" in out, (name, out[-3000:])
