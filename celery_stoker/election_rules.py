"""The election's decisions about time, as pure functions: a clock reading in, a choice out.

The election's thread (``election.py``) reads the clock and Redis, then asks
these functions what to do: renew now, wait (how long), or step down; when a
held term may start acting; how long to rest after giving leadership away.
Kept apart from the thread, Redis and the handler so that the arithmetic that
keeps two leaders from acting at once can be tested on a fake clock, without a
thread or a server (``tests/test_election_rules.py``), as h11 keeps its
protocol apart from its I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: A renewal may take a reconnect and the command, each up to the socket timeout:
#: a holder with less validity left than this many timeouts steps down instead.
RENEW_ATTEMPT = 2
#: After a ``too_many_failures`` step-down this worker leaves the Stoker to others
#: for one lease TTL, doubling on each repeat up to this (or one TTL, if longer).
FAILURE_COOLDOWN_MAX = 300.0


@dataclass(frozen=True)
class HoldStep:
    """What a holder does next: step down, renew now, or wait ``wait`` seconds (then ask again)."""

    action: Literal["step_down", "renew", "wait"]
    wait: float = 0.0


def renew_too_late(left: float, socket_timeout: float) -> bool:
    """True when a renewal sent now might answer after the lease ends (``left`` seconds)."""
    return left <= RENEW_ATTEMPT * socket_timeout


def next_hold_step(
    *,
    now: float,
    renew_at: float,
    left: float,
    socket_timeout: float,
    suspended: bool,
    act_not_before: float,
) -> HoldStep:
    """The holder's next step at ``now`` (monotonic), with ``left`` seconds of validity.

    It never waits past the point where a renewal could still answer in time;
    a suspended term also wakes when its quarantine ends, to start acting then.
    """
    if renew_too_late(left, socket_timeout):
        return HoldStep("step_down")
    if now >= renew_at:
        return HoldStep("renew")
    wait = min(renew_at - now, left - socket_timeout)
    if suspended and act_not_before > now:
        wait = min(wait, act_not_before - now)
    return HoldStep("wait", wait)


def may_start_acting(
    *, now: float, act_not_before: float, left: float, socket_timeout: float, stopping: bool
) -> bool:
    """Whether a held term may start acting: not stopping, quarantine over, time to renew left."""
    return not stopping and now >= act_not_before and not renew_too_late(left, socket_timeout)


def retry_wait(backoff: float, left: float | None, socket_timeout: float) -> float:
    """How long to wait after an error: ``backoff``, but a leader never past its last renewal.

    ``left``: the held term's validity, or None for a follower.
    """
    if left is None:
        return backoff
    return max(0.0, min(backoff, left - RENEW_ATTEMPT * socket_timeout))


def failure_cooldown(ttl: float, step_downs: int) -> float:
    """How long a worker rests after its ``step_downs``-th step-down for failures in a row.

    One TTL, doubling on each repeat, up to ``FAILURE_COOLDOWN_MAX`` (or one TTL, if longer).
    """
    return min(ttl * 2 ** (step_downs - 1), max(ttl, FAILURE_COOLDOWN_MAX))


def fresh_quarantine(ttl: float, uptime: float) -> float:
    """How long a term that found Redis without history waits: until ``ttl`` after Redis started.

    An earlier leader's last renewal came before Redis started, so its term is
    surely over ``ttl`` after that.
    """
    return max(0.0, ttl - uptime)


def finish_wait(
    *, deadline: float, now: float, renew_interval: float, left: float, socket_timeout: float
) -> float:
    """How long a stepping-down leader waits for its running event before renewing again.

    Never past ``deadline`` (its grace), a renewal interval, or the last moment a
    renewal can still answer in time; zero or less: stop waiting.
    """
    margin = left - RENEW_ATTEMPT * socket_timeout
    return min(deadline - now, renew_interval, margin)
