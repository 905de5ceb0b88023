"""Real ``celery worker`` processes (and other commands) for tests, benchmarks and the demo.

Leader election is about processes that stop, crash or hang, so the helpers run the real
thing: ``celery -A <app> worker -n <name>`` as a child process, never an in-process worker
thread (which would share one interpreter, one lease client and one signal handler with
the test).  Every process runs

* in its own session and process group, so a crash can be modelled by SIGKILLing the
  worker *and* its pool children at once, and a Ctrl-C in the terminal reaches only the
  parent, which then stops its children in order;
* with its output in a log file that a test can search ("ready.", "following ...") and
  show when it fails;
* registered for a SIGKILL at interpreter exit, so a crashed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from signal import SIGTERM  # the method ManagedProcess.signal hides the module in the class
from typing import Any, TypeVar

from ._reaper import forget, track

__all__ = [
    "Fleet",
    "ManagedProcess",
    "WaitTimeout",
    "WorkerExited",
    "WorkerProcess",
    "wait_for",
]

T = TypeVar("T")
_P = TypeVar("_P", bound="ManagedProcess")
_W = TypeVar("_W", bound="WorkerProcess")


class WaitTimeout(AssertionError, TimeoutError):
    """:func:`wait_for` ran out of time.

    An ``AssertionError`` so pytest reports a condition that never came as a failed test,
    and a ``TimeoutError`` for code outside tests (benchmarks, scripts) that catches that.
    """


class WorkerExited(RuntimeError):
    """A worker died while we waited for it; the message carries the end of its log."""


def wait_for(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Polling rather than sleeping a fixed time keeps tests fast on a quiet machine and
    correct on a busy one; ``timeout`` is the bound a test asserts.  The predicate runs at
    least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what or predicate!r}")
        time.sleep(min(interval, remaining))


class ManagedProcess:
    """A command in its own process group, logging to a file, killed at exit if still alive.

    ``env`` is laid over this process's environment; ``pythonpath`` entries go first on
    ``PYTHONPATH`` (a worker must import its app from ``cwd`` even when that is not where
    the parent runs).  The log goes to ``log_path``, else to ``<log_dir>/<name>.log``,
    else to a fresh temporary directory.  :meth:`start` may be called again once the
    process has exited: it appends to the same log, and :meth:`log` can read only what
    the current run wrote.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        pythonpath: Sequence[str | Path] = (),
        log_dir: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self.pythonpath = [str(p) for p in pythonpath]
        if log_path is None:
            directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="stoker-p-"))
            log_path = directory / f"{name.replace('%', '_').replace('/', '_')}.log"
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._group_killed = False

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<{type(self).__name__} {self.name} pid={pid} alive={self.alive()}>"

    # -- running ------------------------------------------------------------------------------
    def start(self: _P) -> _P:
        """Spawn the command; returns ``self`` so ``p = ManagedProcess(...).start()`` reads."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        env = {**os.environ, **self.env}
        if self.pythonpath:
            inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *inherited])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.seek(0, os.SEEK_END)
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: pool children die with it; Ctrl-C spares it
            )
        self._group_killed = False
        track(self)
        return self

    @property
    def pid(self) -> int:
        """The main process's pid (also its process group's id)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once it exited (negative: killed by that signal), else ``None``."""
        return self.proc.poll() if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- stopping -----------------------------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process only, as a supervisor or a terminal would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def sigterm(self) -> None:
        """A clean stop: Celery's warm shutdown (the leader hands over at once)."""
        self.signal(signal.SIGTERM)

    def sigquit(self) -> None:
        """Celery's cold shutdown: no waiting for tasks, but shutdown hooks still run."""
        self.signal(signal.SIGQUIT)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it: a crash, pool children included."""
        proc = self.proc
        if proc is not None and not self._group_killed:
            # Also after the main process exited: its pool children may linger in the group.
            # Only once per run, though: long after, the group's id may belong to a stranger.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            self._group_killed = True
        forget(self)

    def sigkill(self) -> None:
        """The same as :meth:`kill`, named alongside :meth:`sigterm` and :meth:`sigquit`."""
        self.kill()

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for an exit already asked for; raises ``subprocess.TimeoutExpired``."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0, sig: int | None = SIGTERM) -> int | None:
        """Send ``sig``, give the process ``timeout`` seconds to exit, then kill what is left.

        ``sig=None`` only waits, for a stop already asked for: a second SIGTERM or SIGINT
        would change its meaning (Celery turns a repeated warm shutdown into a cold one).
        Returns the exit code (``None`` if it never started).
        """
        if sig is not None:
            self.signal(sig)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill()
        return self.returncode

    def cleanup(self) -> None:
        """Teardown: kill the group now, whatever state it is in."""
        self.stop(0, sig=None)

    # -- output -------------------------------------------------------------------------------
    def log(self, *, current: bool = False) -> str:
        """The log so far; ``current=True``: only what the current (last) run wrote."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return (data[self._log_offset :] if current else data).decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]


class WorkerProcess(ManagedProcess):
    """One ``celery -A <app> worker -n <name>`` process.

    The defaults suit tests: the solo pool (one process, quick to start), two pool
    processes otherwise, ``--without-mingle`` (nothing to sync with, and it costs a second
    at start).  ``pool=None``/``concurrency=None``/``without_mingle=False`` leave Celery's
    own defaults, to run a worker exactly as a user's command line would; ``celery`` is
    the command that runs Celery (``python -m celery`` of this interpreter by default).
    """

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for an exit already asked for; raises ``subprocess.TimeoutExpired``.

        A worker that does not exit in time is asked for the stack of every thread
        (Celery's SIGUSR1 handler logs them), so its log says where it hangs.
        """
        try:
            return super().wait_exit(timeout)
        except subprocess.TimeoutExpired:
            assert self.proc is not None
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)  # time for the handler to write the stacks
            raise

    def __init__(
        self,
        name: str,
        app: str,
        env: Mapping[str, str] | None = None,
        pool: str | None = "solo",
        concurrency: int | None = 2,
        *,
        loglevel: str = "info",
        without_mingle: bool = True,
        extra_args: Sequence[str] = (),
        celery: Sequence[str] = (sys.executable, "-m", "celery"),
        cwd: str | Path | None = None,
        pythonpath: Sequence[str | Path] = (),
        log_dir: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        args = [*celery, "-A", app, "worker", "-n", name, "-l", loglevel]
        if pool is not None:
            args += ["-P", pool]
        if without_mingle:
            args.append("--without-mingle")
        if concurrency is not None and pool != "solo":
            args += ["-c", str(concurrency)]
        args += extra_args
        super().__init__(
            name,
            args,
            env=env,
            cwd=cwd,
            pythonpath=pythonpath,
            log_dir=log_dir,
            log_path=log_path,
        )
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = list(extra_args)

    @property
    def node(self) -> str:
        """The node name the worker reports (``%h`` etc. expanded, as Celery does)."""
        from celery.utils.nodenames import default_nodename, host_format

        return str(default_nodename(host_format(self.name)))

    def ready(self) -> bool:
        """Celery logs ``<node> ready.`` once the worker consumes (this run, not a past one)."""
        return self.alive() and f"{self.node} ready." in self.log(current=True)

    def wait_ready(self: _W, timeout: float = 60.0) -> _W:
        """Until :meth:`ready`; raises :class:`WorkerExited` at once if the worker died."""

        def ready() -> bool:
            if not self.alive():
                raise WorkerExited(f"{self.node} exited:\n{self.log(current=True)[-3000:]}")
            return self.ready()

        wait_for(ready, timeout, interval=0.05, what=f"{self.node} ready")
        return self


class Fleet:
    """The workers of one test (or benchmark): one app, shared settings, one teardown.

    ``env`` and ``pool`` are every worker's defaults, and ``worker_options`` (``cwd``,
    ``pythonpath``, ``log_dir``...) go to every :class:`WorkerProcess`; :meth:`start`
    overrides any of them for one worker (``env`` is merged).
    """

    def __init__(
        self,
        app: str,
        env: Mapping[str, str] | None = None,
        pool: str = "solo",
        **worker_options: Any,
    ) -> None:
        self.app = app
        self.env = dict(env or {})
        self.pool = pool
        self.worker_options = worker_options
        self.workers: list[WorkerProcess] = []

    def start(self, name: str, **overrides: Any) -> WorkerProcess:
        options = {**self.worker_options, **overrides}
        env = {**self.env, **options.pop("env", {})}
        pool = options.pop("pool", self.pool)
        worker = WorkerProcess(name, self.app, env, pool, **options).start()
        self.workers.append(worker)
        return worker

    def by_node(self, node: str) -> WorkerProcess:
        """The worker with that node name, the live one if it was restarted."""
        matches = [w for w in self.workers if w.node == node]
        if not matches:
            raise KeyError(node)
        alive = [w for w in matches if w.alive()]
        return (alive or matches)[-1]

    def logs(self, chars: int = 6000) -> str:
        """The end of every worker's log, for a failed test's report."""
        return "\n".join(f"===== {w.node} =====\n{w.log()[-chars:]}" for w in self.workers)

    def cleanup(self) -> None:
        """Kill every worker (and its pool) still running."""
        for worker in self.workers:
            worker.cleanup()
