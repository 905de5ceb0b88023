"""Every Redis key, pub/sub channel and channel message celery-stoker uses, in one place.

A Stoker's keys share the hash tag ``{<name>}``, so each Lua script touches
one Cluster slot: the scripts read a Stoker's own draining mark, never the
prefix-wide draining set, and on a Redis Cluster they announce on the
Stoker's own shard channel (in its slot).  Per key prefix there is one
draining set (the list operators and ``status`` read) and, on a single Redis,
one channel; per worker, one report list, tagged ``{<hostname>}`` so a
worker's lists under several prefixes share a slot (one BLPOP reads them
all).  README's list of keys is checked against this module by a test.

=========================================  ===========================================
key                                        what
=========================================  ===========================================
``<prefix>:{<name>}:lease``                the lease: JSON naming the holder and token
``<prefix>:{<name>}:token``                the fencing-token counter (never expires)
``<prefix>:{<name>}:state``                hash: the Stoker's serialized state, version
``<prefix>:{<name>}:info``                 hash: the cluster record ``dump`` shows
``<prefix>:{<name>}:transitions``          list: the last leadership transitions
``<prefix>:{<name>}:closing``              token of a term that is stepping down
``<prefix>:{<name>}:handoff``              an operator's handoff request
``<prefix>:{<name>}:waiters``              sorted set: the followers, in the order
                                           they try after a release
``<prefix>:{<name>}:draining``             set: node names that must not lead it
``<prefix>:draining``                      set: node names that must not lead
``<prefix>:reports:{<hostname>}``          list: finished events of that worker
``<prefix>:lease-events`` (channel)        releases, renewals, new terms, pokes
``<prefix>:{<name>}:lease-events``         the same for one Stoker, on a Redis
(shard channel)                            Cluster (sharded pub/sub, in its slot)
``<prefix>:worker:<hostname>`` (channel)   nothing is sent on it: its subscriber count
                                           says the worker's listener is alive
=========================================  ===========================================
"""

from __future__ import annotations

#: Kinds of message on the lease channel; each reads ``<kind> <ttl ms> <name>[ <extra>]``.
RELEASED = "released"  # extra: the holder id of the waiter that tries first, if any
RENEWED = "renewed"
ACQUIRED = "acquired"  # a new term: waiters defer to its expiry; extra: the winner's holder id
POKE = "poke"  # an operator asks the holder to renew now and hear why
WAKE = "wake"  # waiters should look again (undrain); extra: only that worker's (drain)


#: What a Redis Cluster node reached with a plain client means, and the fix.
CLUSTER_HINT = (
    'stoker_url is a Redis Cluster node: set stoker_transport_options = {"cluster": True}'
)


def lease_key(prefix: str, name: str) -> str:
    """The key of ``name``'s lease; braces keep one Stoker's keys in one Cluster slot."""
    return f"{prefix}:{{{name}}}:lease"


def token_key(prefix: str, name: str) -> str:
    """The key of ``name``'s fencing-token counter (never expires)."""
    return f"{prefix}:{{{name}}}:token"


def state_key(prefix: str, name: str) -> str:
    """The hash that holds ``name``'s serialized state."""
    return f"{prefix}:{{{name}}}:state"


def info_key(prefix: str, name: str) -> str:
    """The hash that holds ``name``'s cluster-wide record."""
    return f"{prefix}:{{{name}}}:info"


def transitions_key(prefix: str, name: str) -> str:
    """The capped list of ``name``'s recent leadership transitions (newest first)."""
    return f"{prefix}:{{{name}}}:transitions"


def closing_key(prefix: str, name: str) -> str:
    """Holds the token of a term whose leader is stepping down: no new event may start."""
    return f"{prefix}:{{{name}}}:closing"


def handoff_key(prefix: str, name: str) -> str:
    """Where a handoff request for ``name`` waits for the holder's next renewal."""
    return f"{prefix}:{{{name}}}:handoff"


def waiters_key(prefix: str, name: str) -> str:
    """The followers of ``name`` in the order they try after a release (a sorted set)."""
    return f"{prefix}:{{{name}}}:waiters"


def draining_key(prefix: str) -> str:
    """The set of worker node names that must not lead any lease under ``prefix``.

    What operators and ``status`` read; the scripts read each Stoker's own mark
    (:func:`stoker_draining_key`), written before any leader is asked to step down.
    """
    return f"{prefix}:draining"


def stoker_draining_key(prefix: str, name: str) -> str:
    """``name``'s copy of the draining set, in its slot: ACQUIRE and RENEW read it atomically."""
    return f"{prefix}:{{{name}}}:draining"


def reports_key(prefix: str, hostname: str) -> str:
    """The list every finished callback of ``hostname``'s Stokers reports to (its pump reads it).

    Tagged with the hostname: a worker's lists under several prefixes share one
    Cluster slot, so its one BLPOP over them never crosses slots.
    """
    return f"{prefix}:reports:{{{hostname}}}"


def lease_channel(prefix: str) -> str:
    """The pub/sub channel every release, renewal and new term under ``prefix`` is announced on."""
    return f"{prefix}:lease-events"


def stoker_channel(prefix: str, name: str) -> str:
    """On a Redis Cluster: ``name``'s own shard channel, in its slot (SPUBLISH / SSUBSCRIBE)."""
    return f"{prefix}:{{{name}}}:lease-events"


def worker_channel(prefix: str, hostname: str) -> str:
    """A channel only ``hostname``'s listener subscribes to, and nobody publishes on.

    Its subscriber count (``PUBSUB NUMSUB``, asked inside ACQUIRE and RELEASE)
    says whether that worker still listens: a waiter whose worker died (SIGKILL,
    a lost pod) holds no subscription, because Redis drops a closed connection's
    subscriptions, so the scripts forget it instead of naming it at the next
    release.  This needs no gossip and costs nothing while nothing changes.
    """
    return f"{prefix}:worker:{hostname}"


def channel_for(prefix: str, name: str, *, sharded: bool) -> tuple[str, str]:
    """``(channel, publish command)`` that ``name``'s announcements go to.

    A single Redis: the prefix's one channel and ``PUBLISH`` (one subscription per
    worker).  A Redis Cluster: the Stoker's shard channel and ``SPUBLISH``, so a
    script announces on the shard that holds its keys.
    """
    if sharded:
        return stoker_channel(prefix, name), "SPUBLISH"
    return lease_channel(prefix), "PUBLISH"


def message(kind: str, name: str, ttl_ms: int = 0, extra: str = "") -> str:
    """A lease-channel message, as the Lua scripts also write them."""
    text = f"{kind} {ttl_ms} {name}"
    return f"{text} {extra}" if extra else text


def parse_message(data: bytes | str) -> tuple[str, int, str, str] | None:
    """``(kind, ttl_ms, name, extra)`` of a lease-channel message; None if it is not one.

    Names may not contain white space (``@stoker`` refuses them), so the name
    is the third word and anything after it is the extra.
    """
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    parts = text.split(" ", 3)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2], parts[3] if len(parts) == 4 else ""
