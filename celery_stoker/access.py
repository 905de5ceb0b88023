"""What a Redis user must be allowed, and a check of it at start (Redis ACLs).

A user that lacks one command the lease scripts run fails in ways that are
hard to read: the script is refused half-way at "a script line", the lease
flaps, or no worker ever leads while every worker says it is fine.  So before
a worker's first election it asks Redis once (:data:`scripts.PROBE`, run the
way the lease scripts run: ``SCRIPT LOAD`` then ``EVALSHA``) which of them
this user may not run.  While any is refused the elections do not start: the
worker logs one ERROR naming the commands and the ``ACL SETUSER`` line that
fixes it, shows the fault in ``health``, and asks again every
:data:`RECHECK_INTERVAL` quietly, so fixing the ACL needs no restart.

:data:`COMMANDS` is the single list of what celery-stoker runs: the lease and
state scripts' commands, and what the worker and the CLI send themselves.
README's "Redis requirements" line is :func:`acl_line` of it (a test keeps the
two equal and runs a real worker and ``status`` as that user).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import redis

from . import scripts
from .connection import is_cluster_client
from .keys import CLUSTER_HINT, channel_for

logger = logging.getLogger("celery_stoker.activator")

#: Every command celery-stoker sends to ``stoker_url`` (workers and the CLI), in ACL form.
COMMANDS = (
    # running the Lua scripts (redis-py: EVALSHA, and SCRIPT LOAD when not cached)
    "evalsha",
    "script|load",
    # inside the scripts
    "get",
    "set",
    "del",
    "exists",
    "incr",
    "pttl",
    "pexpire",
    "time",
    "sismember",
    "zadd",
    "zrank",
    "zrange",
    "zrem",
    "hget",
    "hset",
    "publish",
    # a waiter's liveness (its presence channel's subscribers); not probed: without
    # it the scripts trust every waiter, as before, and a worker still elects
    "pubsub|numsub",
    # sent by the worker and the CLI themselves
    "hgetall",
    "lpush",
    "ltrim",
    "lrange",
    "blpop",
    "sadd",
    "srem",
    "smembers",
    "scan",  # the CLI of an app that registers no Stokers finds them by their token keys
    "subscribe",
    "ping",
    "info",
    "multi",
    "exec",
)
#: What a Redis Cluster needs besides :data:`COMMANDS`: redis-py's ``RedisCluster``
#: reads the slot map (``CLUSTER SLOTS``) and the key positions (``COMMAND``), and
#: announcements travel by sharded pub/sub.
CLUSTER_COMMANDS = ("cluster|slots", "command", "spublish", "ssubscribe")
#: What ``stoker_min_replicas`` >= 1 needs besides: a commit waits for its replicas.
REPLICA_COMMANDS = ("wait",)
#: Optional: lets the worker check ``maxmemory-policy`` at start (it says nothing without).
OPTIONAL_COMMANDS = ("config|get",)
#: While permissions are missing, how often the worker asks again (quietly).
RECHECK_INTERVAL = 30.0

_COMMAND_IN_ERROR = re.compile(r"run the '([^']+)' command")


def acl_line(
    prefix: str = "stoker",
    user: str = "stoker",
    password: str = "PASSWORD",
    *,
    cluster: bool = False,
    replicas: bool = False,
) -> str:
    """The ``ACL SETUSER`` line that gives ``user`` exactly what celery-stoker needs.

    On a Redis Cluster (``cluster=True``) it adds :data:`CLUSTER_COMMANDS`; run it
    on every node.  With ``stoker_min_replicas`` >= 1 (``replicas=True``) it adds
    :data:`REPLICA_COMMANDS`.
    """
    needed = (
        COMMANDS + (CLUSTER_COMMANDS if cluster else ()) + (REPLICA_COMMANDS if replicas else ())
    )
    commands = " ".join(f"+{c}" for c in needed)
    return (
        f"ACL SETUSER {user} on >{password} resetkeys ~{prefix}:* "
        f"resetchannels &{prefix}:* -@all {commands}"
    )


#: The probe's hash tag: its scratch key and (on a cluster) its shard channel share a slot.
PROBE_NAME = "stoker-probe"


def probe_key(prefix: str) -> str:
    """A scratch key under ``prefix`` (its own hash tag: one Cluster slot)."""
    return f"{prefix}:{{{PROBE_NAME}}}:probe"


def _refused_command(exc: redis.ResponseError) -> str | None:
    """The command a permission error names, or None if ``exc`` is not one."""
    text = str(exc)
    if not isinstance(exc, redis.exceptions.NoPermissionError) and "NOPERM" not in text:
        return None
    found = _COMMAND_IN_ERROR.search(text)
    return found.group(1) if found else "(a key or channel outside the prefix)"


class AccessCheck:
    """Whether this worker's Redis user may run what the elections need; shared by them.

    Thread-safe: every election of one Redis URL and key prefix asks the same
    instance; while the answer is "refused" it is reused for
    :data:`RECHECK_INTERVAL`, so many Stokers cost one probe, and one log line.
    """

    def __init__(self, client: redis.Redis, prefix: str, masked_url: str = "") -> None:
        self.client = client
        self.prefix = prefix
        self.masked_url = masked_url
        self.cluster = is_cluster_client(client)
        self._lock = threading.Lock()
        self._ok = False
        self._refused: tuple[str, ...] = ()
        self._checked_at = float("-inf")
        #: The server's ``maxmemory-policy`` once read (None: not read, or not allowed).
        self.policy: str | None = None
        self._policy_checked = False
        #: The most ``stoker_min_replicas`` of the Stokers that share this check.
        self.min_replicas = 0
        #: The replicas the primary had connected when last probed (None: not asked).
        self.replicas: int | None = None
        self._replicas_warned: tuple[int, int] | None = None
        #: Set when ``stoker_url`` names a Redis Cluster node but the client is a plain
        #: one (``cluster`` missing from the transport options): the scripts of every
        #: Stoker whose slot lives elsewhere would be refused with MOVED.
        self.mode_error: str | None = None

    def refused(self) -> tuple[str, ...]:
        """The commands this user may not run (empty: all allowed); asks Redis when due.

        Raises what the client raises when Redis cannot be reached.
        """
        with self._lock:
            if not self._policy_checked:
                self._check_policy()
                self._check_mode()
            if self.mode_error is not None:
                return ("cluster mode",)
            if self._ok:
                return ()
            if time.monotonic() - self._checked_at < RECHECK_INTERVAL:
                return self._refused
            refused = self._probe()
            self._checked_at = time.monotonic()
            if refused and refused != self._refused:
                logger.error(
                    "celery-stoker: the Redis user of %s may not run %s, which the election "
                    "needs; no Stoker is elected on this worker until it may (checked again "
                    "every %.0f s). Grant it with: %s",
                    self.masked_url or "stoker_url",
                    ", ".join(refused),
                    RECHECK_INTERVAL,
                    acl_line(
                        self.prefix,
                        user="<user>",
                        password="<password>",
                        cluster=self.cluster,
                        replicas=self.min_replicas >= 1,
                    ),
                )
            elif not refused and self._refused:
                logger.info(
                    "celery-stoker: the Redis user of %s may now run every command the "
                    "election needs; electing",
                    self.masked_url or "stoker_url",
                )
            self._refused = refused
            self._ok = not refused
            return refused

    def require_replicas(self, count: int) -> None:
        """A Stoker sharing this check commits only once ``count`` replicas have it."""
        with self._lock:
            if count > self.min_replicas:
                self.min_replicas = count
                self._ok = False  # probe again: WAIT's permission, the replicas connected
                self._checked_at = float("-inf")

    def retry_in(self) -> float:
        """Seconds until the next probe is due (for a waiting election)."""
        with self._lock:
            return max(0.0, self._checked_at + RECHECK_INTERVAL - time.monotonic())

    def invalidate(self) -> None:
        """A command was refused at run time (the ACL changed): probe again before electing."""
        with self._lock:
            if self._ok:
                self._ok = False
                self._checked_at = float("-inf")

    def describe(self) -> str:
        """The fault as ``health`` shows it."""
        if self.mode_error is not None:
            return self.mode_error
        return f"NOPERM: the Redis user may not run {', '.join(self._refused)} (see the log)"

    def _check_policy(self) -> None:
        """Warn once if Redis may evict our keys: only ``noeviction`` keeps the lease safe.

        The lease has a TTL, so a ``volatile-*`` policy evicts it first (two leaders
        may act, leadership churns); ``allkeys-*`` evicts the state and the token
        counter too.  A user not allowed ``CONFIG GET`` is not told (debug only).
        """
        try:
            reply = self.client.config_get("maxmemory-policy")
        except redis.ResponseError as exc:
            self._policy_checked = True
            logger.debug("celery-stoker: maxmemory-policy not readable (%s)", exc)
            return
        self._policy_checked = True
        policy = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
        if isinstance(policy, bytes):
            policy = policy.decode()
        self.policy = policy
        if policy and policy != "noeviction":
            logger.warning(
                "celery-stoker: the Redis at %s has maxmemory-policy %s; celery-stoker needs "
                "noeviction: under memory pressure Redis would evict %s, and two workers "
                "could lead at once (CONFIG SET maxmemory-policy noeviction, or a Redis of "
                "its own for stoker_url)",
                self.masked_url or "stoker_url",
                policy,
                "the lease first (it has a TTL)"
                if policy.startswith("volatile")
                else "the lease, the state and the token counter",
            )

    def _check_mode(self) -> None:
        """Refuse a Redis Cluster node reached with a plain client, once, saying the fix."""
        if self.cluster:
            return
        try:
            enabled = str(self.client.info("cluster").get("cluster_enabled", 0)) == "1"
        except redis.ResponseError:  # INFO refused (checked by the probe) or not supported
            return
        if not enabled:
            return
        self.mode_error = CLUSTER_HINT
        logger.error(
            "celery-stoker: %s names a node of a Redis Cluster, but celery-stoker was not "
            "told: the lease scripts of every Stoker whose slot lives on another node would "
            'be refused (MOVED). Set stoker_transport_options = {"cluster": True}; no '
            "Stoker is elected on this worker until then",
            self.masked_url or "stoker_url",
        )

    def _probe(self) -> tuple[str, ...]:
        key = probe_key(self.prefix)
        # The channel and command the leases announce with (SPUBLISH on a cluster).
        channel, publish = channel_for(self.prefix, PROBE_NAME, sharded=self.cluster)
        refused: list[str] = []
        try:
            sha = self.client.script_load(scripts.PROBE)
        except redis.ResponseError as exc:
            command = _refused_command(exc)
            if command is None:
                raise
            refused.append(command)
            sha = None
        if sha is not None:
            try:
                reply = self.client.evalsha(sha, 1, key, channel, publish)
            except redis.ResponseError as exc:
                command = _refused_command(exc)
                if command is None:
                    raise
                refused.append(command)
            else:
                refused += [c.decode() if isinstance(c, bytes) else str(c) for c in reply]
        if self.min_replicas >= 1:
            refused += self._check_replicas()
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.pttl(key)
            pipe.execute()
        except redis.ResponseError as exc:
            # redis-py drops MULTI's own refusal; Redis then answers EXEC without MULTI.
            command = "multi" if "EXEC without MULTI" in str(exc) else _refused_command(exc)
            if command is not None:
                refused.append(command)
        return tuple(dict.fromkeys(refused))

    def _check_replicas(self) -> list[str]:
        """The replicas the primary has online (``INFO replication``); warn once if too few.

        A worker whose ``stoker_min_replicas`` exceeds the replicas its primary
        has would fail every commit; it says so once, with both numbers, and
        again only when either changes.  On a Redis Cluster every primary is
        asked and the fewest counts.  Returns ``["wait"]`` if WAIT is refused.
        """
        targets: list[Any] = [self.client]
        if self.cluster:
            cluster: Any = self.client  # a RedisCluster
            targets = [node.redis_connection for node in cluster.get_primaries()]
        counts = []
        for target in targets:
            try:
                # WAIT 0 0 answers at once; it is here for its permission only (a WAIT
                # refused would fail every commit).  The count is INFO's online replicas.
                target.execute_command("WAIT", 0, 0)
            except redis.ResponseError as exc:
                if _refused_command(exc) is None:
                    raise
                return ["wait"]
            info = target.info("replication")
            counts.append(
                sum(
                    1
                    for key, value in info.items()
                    if key.startswith("slave")
                    and isinstance(value, dict)
                    and value.get("state") == "online"
                )
            )
        self.replicas = min(counts) if counts else 0
        seen = (self.min_replicas, self.replicas)
        if self.replicas < self.min_replicas and seen != self._replicas_warned:
            self._replicas_warned = seen
            logger.warning(
                "celery-stoker: stoker_min_replicas is %d, but the Redis at %s has %d "
                "replica(s) connected%s: every state commit will fail (the events count as "
                "failed) until enough replicas are connected; add replicas, or lower "
                "stoker_min_replicas",
                self.min_replicas,
                self.masked_url or "stoker_url",
                self.replicas,
                " (on its primary with the fewest)" if self.cluster else "",
            )
        return []
