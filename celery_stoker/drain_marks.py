"""This worker's draining marks in Redis, made true at start and taken away at a clean stop.

The scripts read each Stoker's own copy of the draining set (one Cluster slot
per script), so a worker's start makes the copies of its Stokers agree with the
set, and its clean stop leaves the set.  ``StokerStep`` calls these once each;
the operator's ``drain`` / ``undrain`` are ``control.py``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import redis

from .connection import redis_client
from .control import mark_draining
from .keys import draining_key
from .settings import StokerSettings

logger = logging.getLogger("celery_stoker.bootstep")

#: Longest a stopping worker waits for Redis to take it out of the draining set.
LEAVE_TIMEOUT = 1.0


def sync_drain_marks(
    hostname: str, settings: Mapping[str, StokerSettings], *, draining: bool
) -> None:
    """Before any election: this worker's draining marks, per Stoker, as the set says.

    ``--stoker-drain`` / ``stoker_drain`` joins the set and every copy;
    otherwise the copies of this worker's Stokers are made to agree with the
    set, so a drain or undrain done by an app that did not know all of them (or
    a Stoker added since) still holds.
    """
    for prefix, prefix_settings, names, client in _drain_clients(settings):
        try:
            drained = draining or bool(client.sismember(draining_key(prefix), hostname))
            mark_draining(client, prefix, names, [hostname], draining=drained)
            if draining:
                logger.info("celery-stoker: %s starts draining: it will not lead", hostname)
        except Exception as exc:
            if draining:
                logger.error(
                    "celery-stoker: could not mark %s as draining in %s (%s)",
                    hostname,
                    prefix_settings.masked_url,
                    exc,
                )
        finally:
            client.close()


def leave_draining_set(hostname: str, settings: Mapping[str, StokerSettings]) -> None:
    """A clean stop ends this worker's drain: its name leaves the draining set.

    A drain moves leadership off a worker for the rest of its run (a rolling
    deploy, a Kubernetes ``preStop`` hook).  Kept past the stop, the mark made
    a pod that came back under the same name (a StatefulSet) draining for
    good -- after a rollout every pod, and the Stoker had no leader at all --
    and with fresh pod names it grew the set by one name per pod.  Runs once
    every election has stopped (none acquires from ``worker_shutting_down``
    on), so this worker cannot lead on its way out.  A crash runs nothing:
    its mark stays until ``undrain``, or until that name's next clean stop.
    """
    for prefix, prefix_settings, names, client in _drain_clients(settings, LEAVE_TIMEOUT):
        try:
            if client.sismember(draining_key(prefix), hostname):
                mark_draining(client, prefix, names, [hostname], draining=False)
                logger.info("celery-stoker: %s leaves the draining set as it stops", hostname)
        except Exception as exc:
            logger.warning(
                "celery-stoker: could not take %s out of the draining set in %s (%s); "
                "a worker started under that name will not lead until "
                "`celery stoker undrain %s`",
                hostname,
                prefix_settings.masked_url,
                exc,
                hostname,
            )
        finally:
            client.close()


def _drain_clients(
    settings: Mapping[str, StokerSettings], timeout: float | None = None
) -> Iterator[tuple[str, StokerSettings, list[str], redis.Redis]]:
    """Per key prefix: its settings, this worker's Stokers under it, and a client of its own.

    ``timeout`` caps the client's socket timeout (a stopping worker waits less).
    """
    by_prefix: dict[str, tuple[StokerSettings, list[str]]] = {}
    for name, stoker_settings in settings.items():
        by_prefix.setdefault(stoker_settings.key_prefix, (stoker_settings, []))[1].append(name)
    for prefix, (prefix_settings, names) in by_prefix.items():
        client = redis_client(
            prefix_settings.url,
            transport_options=prefix_settings.transport_options,
            socket_timeout=min(
                prefix_settings.socket_timeout, timeout or prefix_settings.socket_timeout
            ),
        )
        yield prefix, prefix_settings, names, client
