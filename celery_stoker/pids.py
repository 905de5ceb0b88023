"""Whether a process lives, asked by its pid: the pump's watchdog and the copies' sweep ask.

Two questions, two answers: :func:`pid_alive` is the kernel's (a zombie, killed
but not reaped, still has its pid), :func:`process_exists` the watchdog's (a
zombie runs nothing: the pool process running an event is gone).
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while the kernel knows ``pid`` (another user's process too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_exists(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie, killed but not reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        return pid_alive(pid)
