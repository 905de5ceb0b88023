"""What every benchmark shares: statistics, tables, machine facts, /proc readers, cleanup.

The benchmarks run real processes (``redis-server``, ``celery worker``,
``celery beat``) with the helpers of :mod:`celery_stoker.testing`, as the tests
do, and must never leave one behind, also when interrupted: those helpers kill
what is left at exit, and every other thing the benchmarks start (servers,
proxies, threads) is registered here, where :func:`cleanup_all` runs on normal
exit, on Ctrl-C and on SIGTERM.

Run the benchmarks as modules from the repository root (``python -m
bench.run_all --quick``), so that ``bench`` and the test apps import without
any ``sys.path`` edits.

CPU, RSS and socket ownership are read from ``/proc`` (Linux only) so the
benchmarks need nothing beyond the test dependencies; matplotlib is the only
optional extra (for the plot).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from celery_stoker.testing import ManagedProcess, RedisServer, WorkerProcess, resolve_binary

ROOT = Path(__file__).resolve().parents[1]

MODES = ("smoke", "quick", "full")

# --------------------------------------------------------------------------- cleanup

_cleanups: list[Callable[[], None]] = []
_cleanup_lock = threading.Lock()


def on_cleanup(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` at :func:`cleanup_all` (exit, Ctrl-C, SIGTERM); returns ``fn``."""
    with _cleanup_lock:
        _cleanups.append(fn)
    return fn


def forget_cleanup(fn: Callable[[], None]) -> None:
    """``fn`` already ran (the bench cleaned up itself): do not run it again."""
    with _cleanup_lock, contextlib.suppress(ValueError):
        _cleanups.remove(fn)


def cleanup_all() -> None:
    """Stop everything still registered, newest first; never raises."""
    while True:
        with _cleanup_lock:
            if not _cleanups:
                return
            fn = _cleanups.pop()
        with contextlib.suppress(Exception):
            fn()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so every ``finally`` runs, then clean up."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _raise_interrupt)


atexit.register(cleanup_all)


def start_redis() -> RedisServer:
    """A private ``redis-server`` on a free loopback port (never 6379), stopped at cleanup."""
    server = RedisServer()
    server.start()
    on_cleanup(server.close)
    return server


class RunDir:
    """One temporary directory for the logs of a run; removed at the end unless kept."""

    path: Path | None = None
    keep = False

    @classmethod
    def get(cls) -> Path:
        if cls.path is None:
            cls.path = Path(tempfile.mkdtemp(prefix="stoker-bench-"))
            on_cleanup(cls._remove)
        return cls.path

    @classmethod
    def sub(cls, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=cls.get()))
        return path

    @classmethod
    def _remove(cls) -> None:
        if cls.path is not None and not cls.keep:
            shutil.rmtree(cls.path, ignore_errors=True)
        elif cls.path is not None:
            print(f"logs kept in {cls.path}", file=sys.stderr)
        cls.path = None


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100), as numpy's default computes it."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float], *, capped: int = 0) -> dict[str, Any]:
    """Median, min, max, p95 and count of ``values``; ``capped`` rounds hit a timeout.

    A capped round's value is the cap itself, so every figure computed with one
    is a lower bound; tables print those with ``>=``.
    """
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "p95": None, "capped": 0}
    return {
        "n": len(vals),
        "median": percentile(vals, 50),
        "min": min(vals),
        "max": max(vals),
        "p95": percentile(vals, 95),
        "capped": capped,
    }


def fmt_num(value: float | None, unit: str = "", digits: int | None = None) -> str:
    """A number with a sensible precision for a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits is None:
        mag = abs(value)
        digits = 0 if mag >= 100 else 1 if mag >= 10 else 2 if mag >= 1 else 3
        if mag == 0:
            digits = 0
    return f"{value:,.{digits}f}{unit}"


def fmt_duration(seconds: float | None, *, lower_bound: bool = False) -> str:
    """Milliseconds under a second, seconds above (minutes too past ten); ``>=`` when capped."""
    if seconds is None:
        return "-"
    prefix = ">= " if lower_bound else ""
    if seconds < 0.1:
        return f"{prefix}{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{prefix}{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{prefix}{seconds:.2f} s"
    if seconds < 600:
        return f"{prefix}{seconds:.1f} s"
    return f"{prefix}{seconds:,.0f} s ({seconds / 60:.1f} min)"


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A printed table that also renders as Markdown for BENCHMARKS.md."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        line = "  ".join("-" * w for w in widths)
        out = [self.title, line]
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(self.columns, widths, strict=False))
            )
        )
        out.append(line)
        for row in self.rows:
            out.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=False))
                )
            )
        out.append(line)
        out.extend(f"  {note}" for note in self.notes)
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("| " + " | ".join(["---"] + ["---:"] * (len(self.columns) - 1)) + " |")
        for row in self.rows:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        if self.notes:
            out.append("")
            out.extend(f"- {note}" for note in self.notes)
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }


def print_table(table: Table) -> None:
    print()
    print(table.text(), flush=True)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (atomically, so a Ctrl-C never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- machine


def _first_match(path: str, pattern: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            found = re.match(pattern, line)
            if found:
                return found.group(1).strip()
    return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _invocation() -> list[str]:
    """How this run was started: ``-m bench.run_all`` rather than the file's full path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return ["-m", spec.name] if spec is not None else sys.argv[:1]


def machine_info() -> dict[str, Any]:
    """What BENCHMARKS.md quotes with every figure: machine, software versions, commit, date."""
    binary = resolve_binary()
    server_version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    mem_kb = _first_match("/proc/meminfo", r"MemTotal:\s+(\d+)")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "celery_stoker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": _first_match("/proc/cpuinfo", r"model name\s*:\s*(.*)")
        or platform.processor(),
        "ram_gib": round(int(mem_kb) / 1024 / 1024, 1) if mem_kb else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_server": server_version,
        "redis_binary": binary,
        "celery": _version("celery"),
        "redis_py": _version("redis"),
        "celery_redbeat": _version("celery-redbeat"),
        "celery_stoker": _version("celery-stoker"),
        "git_commit": commit or None,
        # Uncommitted changes to the package at the start (workers import the tree).
        "package_dirty": bool(dirty),
        "command": " ".join([Path(sys.executable).name, *_invocation(), *sys.argv[1:]]),
    }


# --------------------------------------------------------------------------- /proc


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (a prefork worker's pool children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds the live ``pids`` have used so far."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    value = _first_match(f"/proc/{pid}/status", r"VmRSS:\s+(\d+)")
    return int(value) * 1024 if value else 0


def thread_count(pid: int) -> int:
    value = _first_match(f"/proc/{pid}/status", r"Threads:\s+(\d+)")
    return int(value) if value else 0


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def local_ports_to(pids: Iterable[int], remote_port: int) -> set[int]:
    """Local TCP ports of the sockets ``pids`` hold to ``127.0.0.1:remote_port``.

    MONITOR names each command's client by address; this maps an address back
    to the process that owns it.
    """
    inodes: set[int] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) < 10 or int(parts[9]) not in inodes:
                    continue
                local_port = int(parts[1].rsplit(":", 1)[1], 16)
                peer_port = int(parts[2].rsplit(":", 1)[1], 16)
                if peer_port == remote_port:
                    ports.add(local_port)
    return ports


# --------------------------------------------------------------------------- MONITOR

_MONITOR_LINE = re.compile(rb'^\+(\d+\.\d+) \[\d+ ([^\]]+)\] "([^"]*)"(.*)$')

#: One MONITOR line: (Redis's timestamp, client address, COMMAND, the raw rest of the line).
MonitorLine = tuple[float, str, str, bytes]


class MonitorStream:
    """Every command one Redis runs, read from a raw MONITOR stream on a named thread.

    A raw socket rather than redis-py's ``monitor()``: a read timeout there
    closes the connection, and this thread must poll a stop flag.  Commands a
    Lua script runs show as client ``lua`` and are skipped: they are part of
    the EVALSHA that the client did send.  Subclasses say what to keep of each
    line in :meth:`consume`.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"monitor-{port}", daemon=True)

    def start(self: _Stream) -> _Stream:
        self._thread.start()
        self._ready.wait(5)
        on_cleanup(self.stop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        forget_cleanup(self.stop)

    def consume(self, lines: list[MonitorLine]) -> None:
        """Keep what the subclass needs of ``lines``; called under ``self._lock``."""
        raise NotImplementedError

    def _run(self) -> None:
        sock = socket.create_connection(self.address, timeout=5)
        try:
            sock.sendall(b"MONITOR\r\n")
            buf = b""
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            _ok, buf = buf.split(b"\r\n", 1)  # the +OK
            self._ready.set()
            sock.setblocking(False)
            while not self._stop.is_set():
                readable, _, _ = select.select([sock], [], [], 0.2)
                if not readable:
                    continue
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
                *raw, buf = buf.split(b"\r\n")
                parsed = [
                    (
                        float(found.group(1)),
                        found.group(2).decode(),
                        found.group(3).decode().upper(),
                        found.group(4),
                    )
                    for found in map(_MONITOR_LINE.match, raw)
                    if found and found.group(2) != b"lua"
                ]
                with self._lock:
                    self.consume(parsed)
        finally:
            self._ready.set()
            sock.close()


_Stream = TypeVar("_Stream", bound=MonitorStream)


class CommandCounter(MonitorStream):
    """Counts the commands each client sends to one Redis."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.counts: Counter[tuple[str, str]] = Counter()  # (client addr, COMMAND)

    def take(self) -> Counter[tuple[str, str]]:
        """The counts since the last call, and start counting afresh."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def consume(self, lines: list[MonitorLine]) -> None:
        for _at, client, command, _rest in lines:
            self.counts[(client, command)] += 1


class CommandLog(MonitorStream):
    """Every command one Redis runs, with Redis's timestamp, kept in order."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.lines: list[MonitorLine] = []

    def since(self, t0: float, t1: float = float("inf")) -> list[MonitorLine]:
        with self._lock:
            return [x for x in self.lines if t0 <= x[0] <= t1]

    def clear(self) -> None:
        with self._lock:
            self.lines = []

    def consume(self, lines: list[MonitorLine]) -> None:
        self.lines.extend(lines)


def by_owner(
    counts: Counter[tuple[str, str]], owners: dict[str, set[int]]
) -> dict[str, Counter[str]]:
    """Split MONITOR counts by owner (name -> local ports); the rest is ``other``."""
    port_owner = {port: name for name, ports in owners.items() for port in ports}
    out: dict[str, Counter[str]] = {name: Counter() for name in [*owners, "other"]}
    for (addr, command), n in counts.items():
        port = int(addr.rsplit(":", 1)[1]) if ":" in addr else -1
        out[port_owner.get(port, "other")][command] += n
    return out


# --------------------------------------------------------------------------- processes


def command(name: str, args: Sequence[str], env: dict[str, str], cwd: Path) -> ManagedProcess:
    """A process (not yet started) run in ``cwd`` that can import ``bench`` and ``tests``."""
    return ManagedProcess(name, args, env=env, cwd=cwd, pythonpath=[ROOT], log_path=cwd / "out.log")


def celery_worker(
    name: str,
    app: str,
    env: dict[str, str],
    *,
    pool: str = "prefork",
    concurrency: int = 2,
    loglevel: str = "info",
    extra: Sequence[str] = (),
) -> WorkerProcess:
    """A ``celery worker`` process (not yet started), as the tests run one; logs in the run dir."""
    return WorkerProcess(
        name,
        app,
        env,
        pool,
        concurrency,
        loglevel=loglevel,
        extra_args=extra,
        cwd=ROOT,
        pythonpath=[ROOT],
        log_dir=RunDir.sub("worker"),
    )


def run_standalone(
    description: str,
    modes: Iterable[str],
    run: Callable[[str], tuple[dict[str, Any], list[Table]]],
) -> None:
    """``python -m bench.<name>``: parse ``--mode`` and ``--json``, run, print every table.

    Every process the run started is stopped again, also on Ctrl-C.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mode", choices=sorted(modes), default="quick")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.monotonic()
    try:
        data, tabs = run(args.mode)
        for tab in tabs:
            print_table(tab)
        if args.json:
            write_json(args.json, data)
    finally:
        cleanup_all()
    print(f"\n{time.monotonic() - started:.0f} s")
