"""The leader's own copy of each Stoker's last committed state, kept out of Redis.

A leader that loses its lease (a partition, Redis gone) must still tell its
Stoker to stop, with ``shutdown``, from the last state it committed, and
without asking Redis first.  So the worker's main process needs a copy of that
state.  It used to travel in every event's report, through Redis: a 10 MB
state cost a read, a commit and a second copy in and out of Redis per event
(23 MB each way).  Now the process that committed the state keeps the copy:

* the worker's main process itself (pools ``solo``, ``threads``, ``gevent``,
  ``eventlet``, and ``shutdown``, which runs there): in memory;
* a pool process (``prefork``): in a file of a directory private to the
  worker (mode 0700, a name no one can guess), which the main process reads
  only when a ``shutdown`` needs it.  Writing it is a copy into the page cache
  (point ``TMPDIR`` at a tmpfs to keep it off disk); reading it costs nothing
  per event.

Celery cannot carry the copy: a pool hands the worker's main process only the
repr of a task's return value (cut to ``resultrepr_maxsize``), and
``Request.on_success`` is replaced by the request class Celery builds.

Ordering: the copy is kept before the event's report is pushed, so once the
pump hears that an event is over, and so before any ``shutdown`` after it can
start (the election waits for the lane to be idle), the copy is at least as
new as that event's commit.  Each copy carries the event's sequence number
(one counter per worker, growing), and the newest copy wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import secrets
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .pids import pid_alive

logger = logging.getLogger("celery_stoker.copies")

#: The worker's main process (set again by :func:`claim`, before the pool forks): a
#: process with another pid is a pool process and keeps its copies in files.
_owner_pid = os.getpid()
#: Part of the directory's name: inherited by forked pool processes, unknown to others.
_secret = secrets.token_hex(8)
#: Directories of workers that are gone are removed when a worker starts.
PREFIX = "celery-stoker-"
#: The file in a worker's directory whose lock it holds while it lives.
LOCK = ".lock"


@dataclass(frozen=True)
class StateCopy:
    """A committed state as stored: content type, encoding, body; its version and event."""

    content_type: str
    encoding: str
    body: bytes
    #: The state's version in Redis (what a commit from it must name).
    version: int
    #: The sequence number of the event that committed it (newest wins).
    seq: int

    @property
    def encoded(self) -> tuple[str, str, bytes]:
        return self.content_type, self.encoding, self.body


class StateCopies:
    """Every copy of this worker: in memory in the main process, in files from pool processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, str], StateCopy] = {}
        #: Copies from events before this sequence number are of an earlier term: ignored.
        self._floor: dict[tuple[str, str], int] = {}
        #: Said once per worker, not per process: a copy that could not be written.  A
        #: page shared with the pool processes forked after this (``MAP_SHARED``):
        #: under ``--max-tasks-per-child 1`` each event runs in a new process.
        self._write_failed = mmap.mmap(-1, 1)
        #: The lock on this worker's directory (``claim``): held while the worker lives.
        self._lock_fd: int | None = None

    # --------------------------------------------------------------- main process

    def claim(self) -> None:
        """The worker's main process, before its pool forks: own the copies, sweep old ones."""
        global _owner_pid
        _owner_pid = os.getpid()
        _sweep(Path(tempfile.gettempdir()), directory().name)
        self._hold()

    def _hold(self) -> None:
        """Create this worker's directory and hold its lock while the worker lives.

        The lock, not the pid, tells a starting worker whether a directory's worker
        is alive: workers in other pid namespaces (containers sharing a TMPDIR) have
        pids this one cannot see.  Best effort: without it the sweep falls back to
        the pid.
        """
        try:
            folder = directory()
            _private(folder)
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self._lock_fd = fd
        except OSError as exc:
            logger.debug("celery-stoker: no lock on %s (%s)", directory(), exc)

    def close(self) -> None:
        """The worker stops: its copies go with it."""
        with self._lock:
            self._memory.clear()
        if os.getpid() == _owner_pid:
            shutil.rmtree(directory(), ignore_errors=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def begin_term(self, hostname: str, name: str, seq: int, copy: StateCopy | None) -> None:
        """A term starts from ``copy`` (the stored state, or None): older copies are void.

        A term that found nothing stored (or could not read Redis) must not hand
        its ``shutdown`` an earlier term's state: it starts from ``init()``.
        """
        with self._lock:
            self._floor[(hostname, name)] = seq
            if copy is None:
                self._memory.pop((hostname, name), None)
            else:
                self._memory[(hostname, name)] = copy

    def last(self, hostname: str, name: str) -> StateCopy | None:
        """The newest copy of ``name``'s state on this worker (this term's), or None."""
        with self._lock:
            found = self._memory.get((hostname, name))
            floor = self._floor.get((hostname, name), 0)
        from_file = _read(_path(hostname, name))
        if from_file is None or from_file.seq < floor:
            return found  # none from a pool process, or one of an earlier term
        return from_file if found is None or from_file.seq > found.seq else found

    # ------------------------------------------------------------ any process

    def keep(self, hostname: str, name: str, copy: StateCopy) -> None:
        """Keep ``copy`` as ``name``'s last committed state; never raises.

        In the main process it is kept in memory; in a pool process it is written
        to the worker's directory (atomically: a reader sees the old copy or the
        new one).  A copy that cannot be written is said once and skipped: a lost
        term's ``shutdown`` then starts from an older copy, its commit refused.
        """
        if os.getpid() == _owner_pid:
            with self._lock:
                old = self._memory.get((hostname, name))
                if old is None or copy.seq > old.seq:
                    self._memory[(hostname, name)] = copy
            return
        try:
            _write(_path(hostname, name), copy)
        except OSError as exc:
            log = logger.debug if self._write_failed[0] else logger.warning
            self._write_failed[0] = 1
            log(
                "Stoker %s: could not keep a copy of its state in %s (%s); a shutdown "
                "after a lost lease starts from an older one (said once until a copy "
                "is kept again)",
                name,
                directory(),
                exc,
            )
        else:
            self._write_failed[0] = 0


copies = StateCopies()


def directory() -> Path:
    """This worker's directory of copies (created by ``claim``, or by the first write)."""
    return Path(tempfile.gettempdir()) / f"{PREFIX}{_owner_pid}-{_secret}"


def _path(hostname: str, name: str) -> Path:
    digest = hashlib.sha256(f"{hostname}\0{name}".encode()).hexdigest()[:32]
    return directory() / f"{digest}.state"


def _private(folder: Path) -> None:
    """Create ``folder`` (mode 0700), or check that it is a private directory of ours."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{folder} is not a private directory of this user") from None


def _write(path: Path, copy: StateCopy) -> None:
    _private(path.parent)
    header = {
        "content_type": copy.content_type,
        "encoding": copy.encoding,
        "version": copy.version,
        "seq": copy.seq,
    }
    partial = path.with_suffix(f".{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(header).encode() + b"\n")
            out.write(copy.body)
        os.replace(partial, path)
    except BaseException:
        # A full TMPDIR fails the write part way: the half-written file must not
        # keep the space a later copy needs (each pool process has its own name).
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _read(path: Path) -> StateCopy | None:
    try:
        with open(path, "rb") as source:
            header = json.loads(source.readline())
            body = source.read()
        return StateCopy(
            str(header["content_type"]),
            str(header["encoding"]),
            body,
            int(header["version"]),
            int(header["seq"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("celery-stoker: ignored an unreadable state copy %s (%s)", path, exc)
        return None


def _sweep(base: Path, own: str) -> None:
    """Remove the copies of this user's workers that are gone (killed, not stopped).

    A directory with this process's pid but not its name (``own``) is of a worker
    that had this pid before: a container restarted in place keeps its TMPDIR and
    gives its worker the same pid every time.
    """
    with contextlib.suppress(OSError):
        for entry in base.glob(f"{PREFIX}*-*"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(entry.name[len(PREFIX) :].split("-", 1)[0])
                if entry.lstat().st_uid != os.getuid() or entry.name == own:
                    continue
                held = _held(entry / LOCK)
                if held is None:  # no lock file (a worker that could not take it): its pid
                    held = pid != os.getpid() and pid_alive(pid)
                if not held:
                    shutil.rmtree(entry, ignore_errors=True)


def _held(lock: Path) -> bool | None:
    """Whether a live worker holds ``lock``; None when there is no lock file."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False
