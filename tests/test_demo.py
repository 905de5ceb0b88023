"""The zero-setup demo, run as a user would: ``python -m celery_stoker.demo``.

It starts its own Valkey and three workers, so these tests need nothing but
the package.  Every process the demo starts inherits its environment, so a
marker put there finds any process left behind afterwards, wherever it
re-parented.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support.workers import ROOT

from celery_stoker.keys import lease_key, token_key
from celery_stoker.lease import Holder
from celery_stoker.testing import wait_for
from celery_stoker.testing.redis_cluster import RedisCluster

pytestmark = [
    pytest.mark.workers,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc"),
]

MARKER = "STOKER_DEMO_TEST_RUN"
TTL = 2.0  # the demo's default
PREFIX, TICKER = "stoker-demo", "demo.ticker"  # the demo app's key prefix and Stoker
ROW = re.compile(
    r"^\W*(SIGTERM|SIGKILL) \((?:clean stop|crash)\)\W+(\d+)[^│|]*\W+(-|[\d.]+ s)\W+(-|[\d.]+ s)"
)


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "State:\tZ" in status:
            continue  # a zombie is already dead; its parent has not reaped it yet
        if marker.encode() in environ:
            found.append(f"{entry.name}: {cmdline}")
    return found


def demo(run_id: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, MARKER: run_id, "COLUMNS": "120", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "celery_stoker.demo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C must reach it even when the suite was started in the background (a
        # non-interactive shell's `cmd &` ignores SIGINT, and exec keeps that).
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def seconds(cell: str) -> float | None:
    return None if cell == "-" else float(cell.split()[0])


def test_demo_runs_failovers_prints_a_summary_and_leaves_nothing_behind() -> None:
    run_id = uuid.uuid4().hex
    proc = demo(run_id, "--duration", "8", "--interval", "2")
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out)
    assert proc.returncode == 0, out
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"SIGTERM", "SIGKILL"}, out
    term_count, _, term_max = rows["SIGTERM"]
    kill_count, _, kill_max = rows["SIGKILL"]
    assert int(term_count) >= 1, out
    # A clean stop hands over at once; a crash within TTL + renew interval.
    term_worst = seconds(term_max)
    assert term_worst is not None and term_worst < 1.0, out
    kill_worst = seconds(kill_max)
    if int(kill_count):
        assert kill_worst is not None and kill_worst <= TTL * 4 / 3 + 0.5, out
    assert "every process the demo started has stopped" in out
    assert processes_with(run_id) == []


def test_demo_with_its_leases_on_a_redis_cluster(stoker_redis_cluster: RedisCluster) -> None:
    """``--stoker-url <a cluster node> --cluster``: the broker stays the embedded Valkey,
    the leases live in the cluster, and the failovers are as quick as on one Redis."""
    cluster = stoker_redis_cluster
    run_id = uuid.uuid4().hex
    started = time.monotonic()
    proc = demo(
        run_id, "--stoker-url", cluster.url, "--cluster", "--duration", "5", "--interval", "2"
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out, f"\n(the demo ran {time.monotonic() - started:.1f} s)")
    assert proc.returncode == 0, out
    assert f"leases on {cluster.url} (a Redis Cluster)" in out
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"SIGTERM", "SIGKILL"}, out
    term_count, _, term_max = rows["SIGTERM"]
    assert int(term_count) >= 1, out
    term_worst = seconds(term_max)
    assert term_worst is not None and term_worst < 1.0, out
    # The demo's Stoker kept its fencing counter (and its last lease) in the cluster.
    client = cluster.client()
    try:
        token = int(client.get(token_key(PREFIX, TICKER)) or 0)
        raw = client.get(lease_key(PREFIX, TICKER))
    finally:
        client.close()
    assert token > 0, "no fencing counter of demo.ticker in the cluster"
    if raw is not None:  # the last leader stopped cleanly: released, or expiring
        holder = Holder.parse(raw, None)
        assert holder.token is not None and holder.token <= token
    assert "every process the demo started has stopped" in out
    assert processes_with(run_id) == []


def test_ctrl_c_stops_every_process_the_demo_started() -> None:
    run_id = uuid.uuid4().hex
    proc = demo(run_id, "--duration", "60")
    try:
        assert proc.stdout is not None
        lines: list[str] = []

        def leads() -> bool:
            line = proc.stdout.readline() if proc.stdout else ""
            lines.append(line)
            return " leads demo.ticker" in line or proc.poll() is not None

        wait_for(leads, 60, interval=0, what="the first leader")
        assert proc.poll() is None, "".join(lines)
        started = processes_with(run_id)
        # Valkey, three workers, each with its pool child.
        assert len(started) >= 4, started
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    print("".join(lines) + out)
    assert proc.returncode == 130
    assert "interrupted" in out
    assert processes_with(run_id) == []
