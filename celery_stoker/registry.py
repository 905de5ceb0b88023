"""Registering Stokers: the ``@stoker`` decorator, StokerSpec, the per-app registry, eligibility.

The registry lives on the Celery app (``app._stoker_registry``), so two apps in
one process never see each other's Stokers, and a client process that imports
the app knows the same names as the workers.  Options are checked here, at
import time, so a typo fails where it was written, not at worker start.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import ImproperlyConfigured

from .stoker import Stoker
from .text import control_character

if TYPE_CHECKING:
    from celery import Celery


class StokerRegistrationError(ImproperlyConfigured):
    """A Stoker class cannot be registered (duplicate name, missing callback, bad option)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What an ``eligible=`` callable is told about a worker."""

    hostname: str
    queues: frozenset[str]
    app: Any = None


Eligibility = str | Sequence[str] | Callable[[WorkerInfo], bool] | None

#: The heaviest ``@stoker(weight=...)``: a typo guard (a weight is counted, not timed).
MAX_WEIGHT = 1000


def consuming(*queues: str) -> Callable[[WorkerInfo], bool]:
    """``eligible=consuming("critical")``: only workers that consume one of ``queues`` lead."""
    wanted = frozenset(queues)

    def check(worker: WorkerInfo) -> bool:
        return bool(wanted & worker.queues)

    check.__name__ = f"consuming({', '.join(sorted(wanted))})"
    return check


def is_eligible(eligible: Eligibility, worker: WorkerInfo) -> bool:
    """Whether ``worker`` may lead under the Stoker's ``eligible=`` rule.

    A string or list of strings are ``fnmatch`` patterns on the node name
    (``"beat-*@*"``); a callable gets a :class:`WorkerInfo`; None lets anyone lead.
    """
    if eligible is None:
        return True
    if isinstance(eligible, str):
        return fnmatch.fnmatchcase(worker.hostname, eligible)
    if callable(eligible):
        return bool(eligible(worker))
    return any(fnmatch.fnmatchcase(worker.hostname, pattern) for pattern in eligible)


@dataclass(frozen=True)
class StokerSpec:
    """A registered Stoker: its name, its class, its setting overrides and its limits."""

    name: str
    cls: type[Stoker]
    options: Mapping[str, Any] = field(default_factory=dict)
    eligible: Eligibility = None
    min_members: int = 1
    #: Step down after this many failed events in a row (None: never).
    max_failures: int | None = None
    #: How much this Stoker counts when leadership is spread (``balance.py``): a heavy
    #: one as several light ones.
    weight: int = 1

    def instantiate(self) -> Stoker:
        """A fresh instance of the user's class."""
        return self.cls()


class StokerRegistry(Mapping[str, StokerSpec]):
    """The Stokers registered on one Celery app, by name."""

    def __init__(self) -> None:
        self._specs: dict[str, StokerSpec] = {}

    def add(self, spec: StokerSpec) -> None:
        """Register ``spec``; a second class under one name is an error."""
        existing = self._specs.get(spec.name)
        if existing is not None and _qualname(existing.cls) != _qualname(spec.cls):
            raise StokerRegistrationError(
                f"two Stokers are named {spec.name!r}: {_qualname(existing.cls)} and "
                f"{_qualname(spec.cls)}; give one of them another name with "
                "@stoker(app, name='...')"
            )
        self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> StokerSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def registry_of(app: Celery) -> StokerRegistry:
    """The app's registry, created on first use."""
    registry = app.__dict__.get("_stoker_registry")
    if registry is None:
        registry = StokerRegistry()
        app.__dict__["_stoker_registry"] = registry
        _add_worker_option(app)
    return registry


def app_name(app: Celery) -> str:
    """The app as workers tell each other apart: its main name (``Celery("proj")``: ``proj``).

    Membership, ``status`` and the lease's holder carry it, so two apps that
    share a broker or a Redis keep to their own workers.
    """
    return str(app.main or "__main__")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


S = TypeVar("S", bound=type)


def stoker(
    app: Celery,
    name: str | None = None,
    *,
    eligible: Eligibility = None,
    min_members: int = 1,
    max_failures: int | None = None,
    weight: int = 1,
    **options: Any,
) -> Callable[[S], S]:
    """Register the decorated class as a Stoker of ``app``.

    ``name`` defaults to ``"<module>.<QualName>"``.  ``options`` may override
    ``lease_ttl``, ``renew_interval``, ``key_prefix``, ``soft_time_limit`` and
    ``time_limit`` for this Stoker alone.  ``eligible`` limits which workers may
    lead it (node-name patterns, or a callable such as :func:`consuming`);
    ``min_members`` makes the leader act only while it sees at least that many
    live workers, itself included; ``max_failures`` makes a leader whose events
    fail that many times in a row step down, as the original's supervisor gives
    up on a child that keeps crashing; ``weight`` is how much it counts when the
    fleet spreads leadership (default 1: a Stoker of weight 3 counts as three).
    """
    from .settings import OVERRIDABLE

    if eligible is not None and not (
        isinstance(eligible, str)
        or callable(eligible)
        or (isinstance(eligible, Sequence) and all(isinstance(p, str) for p in eligible))
    ):
        raise StokerRegistrationError(
            f"@stoker eligible={eligible!r} is not a node-name pattern, a list of patterns or "
            "a callable taking a WorkerInfo"
        )
    if isinstance(min_members, bool) or not isinstance(min_members, int) or min_members < 1:
        raise StokerRegistrationError(
            f"@stoker min_members={min_members!r} must be a whole number >= 1"
        )
    if max_failures is not None and (
        isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1
    ):
        raise StokerRegistrationError(
            f"@stoker max_failures={max_failures!r} must be a whole number >= 1, or None (off)"
        )
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise StokerRegistrationError(
            f"@stoker weight={weight!r} must be a whole number from 1 to {MAX_WEIGHT}: how "
            "many light Stokers this one counts as when leadership is spread (default 1)"
        )
    unknown = sorted(set(options) - set(OVERRIDABLE))
    if unknown:
        raise StokerRegistrationError(
            f"@stoker got unknown option(s) {unknown}; it accepts name=, eligible=, "
            f"min_members=, max_failures=, weight= and {', '.join(OVERRIDABLE)}"
        )
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise StokerRegistrationError(f"@stoker name must be a non-empty string, got {name!r}")

    def register(cls: S) -> S:
        if not isinstance(cls, type):
            raise StokerRegistrationError(f"@stoker decorates a class, got {cls!r}")
        event = getattr(cls, "event", None)
        if not callable(event) or event is Stoker.event:
            raise StokerRegistrationError(
                f"{_qualname(cls)} has no event(self, state, event, reason) method: a Stoker "
                "must implement event() and return the new state"
            )
        spec_name = name or _qualname(cls)
        control = control_character(spec_name)
        if control is not None:
            position, char = control
            raise StokerRegistrationError(
                f"Stoker name {spec_name!r} has a control character, {char}, at position "
                f"{position}: names are shown in terminals and logs, so they may hold only "
                "printable characters"
            )
        if any(ch.isspace() for ch in spec_name) or "{" in spec_name or "}" in spec_name:
            raise StokerRegistrationError(
                f"Stoker name {spec_name!r} may not contain white space or braces"
            )
        from .settings import check_limits, check_min_replicas, check_timing

        # Check the overrides alone now (no app.conf: it may not be configured
        # yet), so a typo fails at import, not at worker start.
        try:
            if options and ("lease_ttl" in options or "renew_interval" not in options):
                check_timing({}, options)
            if "soft_time_limit" in options or "time_limit" in options:
                check_limits({}, options)
            if "min_replicas" in options:
                check_min_replicas({}, options)
        except ImproperlyConfigured as exc:
            raise StokerRegistrationError(f"@stoker({spec_name!r}): {exc}") from exc
        registry_of(app).add(
            StokerSpec(spec_name, cls, dict(options), eligible, min_members, max_failures, weight)
        )
        cls.stoker_name = spec_name  # type: ignore[attr-defined]
        return cls

    return register


def _add_worker_option(app: Celery) -> None:
    """``celery worker --stoker-drain``: start this worker draining (it never leads)."""
    import click

    option = click.Option(
        ["--stoker-drain"],
        is_flag=True,
        default=False,
        help="celery-stoker: start draining; this worker never takes a leadership.",
    )
    with contextlib.suppress(Exception):  # an app without the worker CLI (tests, clients)
        app.user_options["worker"].add(option)
