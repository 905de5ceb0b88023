"""A throwaway Redis Cluster on loopback: six ``redis-server`` nodes, three of them primaries.

What a cluster adds to a single Redis is exactly what a lease store must survive: a primary
that dies and is replaced by a replica that may lack its last writes, and a hash slot that
moves to another primary while clients use it.  Tests need both for real, so this starts the
real thing: each node is a :class:`~celery_stoker.testing.redis_server.RedisServer` with
``--cluster-enabled yes`` and a short ``--cluster-node-timeout`` (1 s, so a failover fits in a
test), joined by ``redis-cli --cluster create ... --cluster-replicas 1``.

Each node also gets its own cluster-bus port (``--cluster-port``): the default, port + 10000,
may lie beyond 65535 for a port the kernel chose.  Every process is registered with the
reaper, like any ``RedisServer``, so nothing outlives the interpreter.

``RedisCluster(tls=make_tls_files(dir))`` starts a cluster that speaks TLS only, as a managed
"cluster mode with in-transit encryption" does: clients, the cluster bus and replication
(``--tls-port`` with ``--port 0``, ``--tls-cluster yes``, ``--tls-replication yes``), so the
node addresses a client discovers are TLS ports and every connection to them must be TLS.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.cluster import key_slot

from .redis_server import HOST, RedisProcessError, RedisServer, TlsFiles, free_port

__all__ = ["ClusterNode", "RedisCluster", "slot_of"]


def slot_of(key: str) -> int:
    """The cluster hash slot of ``key`` (its ``{tag}`` when it has one)."""
    return int(key_slot(key.encode()))


class ClusterNode(RedisServer):
    """One cluster-enabled ``redis-server``: its own bus port and its own nodes.conf."""

    def __init__(
        self, *, node_timeout_ms: int, binary: str | None = None, tls: TlsFiles | None = None
    ) -> None:
        super().__init__(binary=binary, tls=tls)
        self.node_timeout_ms = node_timeout_ms
        self.bus_port: int | None = None
        self._revive = False

    def _command(self, port: int) -> list[str]:
        # A fresh bus port per attempt: a port race on it retries like one on the data port.
        # A node started again on its old port keeps its bus port too (its nodes.conf and
        # every other node still name it), unless that one is taken now.
        if not (self.bus_port is not None and self._port == port and self._revive):
            self.bus_port = free_port()
        self._revive = False
        args = [
            *super()._command(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.tmpdir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_port),
            # A replica of a primary that died a moment ago may still be promoted.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        if self.tls is not None:  # the bus and replication too; nodes announce their TLS port
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        return args

    def node_id(self) -> str:
        return str(self._command_reply("CLUSTER", "MYID"))

    def cluster_info(self) -> dict[str, str]:
        text = str(self._command_reply("CLUSTER", "INFO"))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    def role(self) -> str:
        """``master`` or ``slave``, as ``ROLE`` says."""
        reply = self._command_reply("ROLE")
        return str(reply[0])

    def _command_reply(self, *args: Any) -> Any:
        probe = self._raw_client(socket_timeout=2.0, decode_responses=True)
        try:
            return probe.execute_command(*args)
        finally:
            probe.close()


class RedisCluster:
    """Six nodes (or ``primaries * 2``), joined into one cluster, each primary with one replica.

    Usage::

        with RedisCluster() as cluster:
            cluster.url                      # redis://127.0.0.1:<port>/0, any node will do
            primary, replica = cluster.nodes_for_key("stoker:{poller}:lease")
            cluster.kill_primary_of("stoker:{poller}:lease")   # and wait for the promotion
            cluster.move_slot(slot_of("{poller}"), to=other_primary)
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """``tls`` (see :func:`~celery_stoker.testing.redis_server.make_tls_files`): every
        node speaks TLS only, on its clients' port, its cluster bus and its replication link,
        and :attr:`url` is a ``rediss://`` URL that verifies the nodes against that CA."""
        if primaries < 3:
            raise ValueError("a Redis Cluster needs at least three primaries")
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.nodes = [
            ClusterNode(node_timeout_ms=node_timeout_ms, binary=binary, tls=tls)
            for _ in range(primaries * 2)
        ]
        self._cli = shutil.which("redis-cli") or shutil.which("valkey-cli")

    # -- lifetime -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start every node, join them, and wait until every node says ``cluster_state:ok``."""
        if self._cli is None:
            raise RedisProcessError("redis-cli (or valkey-cli) is needed on PATH to form a cluster")
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{HOST}:{node.port}" for node in self.nodes]
            command = [self._cli, "--cluster", "create", *addresses]
            if self.tls is not None:
                command[1:1] = ["--tls", "--cacert", str(self.tls.ca_cert)]
            created = subprocess.run(
                [*command, "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if created.returncode != 0:
                raise RedisProcessError(
                    f"redis-cli --cluster create failed ({created.returncode}):\n"
                    f"{created.stdout[-2000:]}\n{created.stderr[-2000:]}"
                )
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop every node and delete their temp dirs (safe to call twice)."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- addresses ------------------------------------------------------------------------
    @property
    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.is_running]

    @property
    def url(self) -> str:
        """A URL naming one running node; a cluster client finds the others from it."""
        return self.running[0].url

    def urls(self) -> list[str]:
        return [node.url for node in self.running]

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A ``redis.RedisCluster`` (bytes replies) started from every running node."""
        from redis.cluster import ClusterNode as Startup

        options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca_cert))
        options.update(kwargs)
        return redis.RedisCluster(
            startup_nodes=[Startup(HOST, node.port) for node in self.running], **options
        )

    def node_at(self, port: int) -> ClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def primaries(self) -> list[ClusterNode]:
        return [node for node in self.running if node.role() == "master"]

    def slot_owner(self, slot: int) -> ClusterNode:
        """The primary serving ``slot``, as the running nodes agree (``CLUSTER SHARDS`` view)."""
        for node in self.running:
            with contextlib.suppress(redis.RedisError, OSError):
                for start, end, primary, *_ in node._command_reply("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return self.node_at(int(primary[1]))
        raise RedisProcessError(f"no running node says who serves slot {slot}")

    def nodes_for_key(self, key: str) -> tuple[ClusterNode, ClusterNode | None]:
        """The primary that holds ``key``'s slot and its (first running) replica."""
        primary = self.slot_owner(slot_of(key))
        return primary, self.replica_of(primary)

    def replica_of(self, primary: ClusterNode) -> ClusterNode | None:
        for node in self.running:
            if node is primary:
                continue
            with contextlib.suppress(redis.RedisError, OSError):
                replication = node._command_reply("INFO", "replication")
                if (
                    replication.get("role") == "slave"
                    and int(replication.get("master_port", 0)) == primary.port
                ):
                    return node
        return None

    # -- waiting --------------------------------------------------------------------------
    def wait_ok(self, timeout: float = 30.0, nodes: Iterable[ClusterNode] | None = None) -> None:
        """Until every running node says ``cluster_state:ok`` and agrees on the slot map."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            states = []
            for node in list(nodes) if nodes is not None else self.running:
                try:
                    info = node.cluster_info()
                    states.append(
                        info.get("cluster_state") == "ok"
                        and info.get("cluster_slots_ok") == "16384"
                    )
                    last = f"{node.port}: {info.get('cluster_state')}"
                except (redis.RedisError, OSError) as exc:
                    states.append(False)
                    last = f"{node.port}: {exc}"
            if states and all(states):
                return
            if time.monotonic() >= deadline:
                raise RedisProcessError(f"cluster not ok after {timeout:.0f}s ({last})")
            time.sleep(0.05)

    # -- faults ---------------------------------------------------------------------------
    def kill_primary_of(self, key: str, timeout: float = 20.0) -> tuple[ClusterNode, ClusterNode]:
        """SIGKILL the primary holding ``key``'s slot; return (dead, promoted) once its replica
        serves the slot and every running node says ``cluster_state:ok``."""
        primary, replica = self.nodes_for_key(key)
        if replica is None:
            raise RedisProcessError(f"the primary of {key!r} has no replica to promote")
        primary.kill()
        slot = slot_of(key)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if replica.role() == "master" and self.slot_owner(slot) is replica:
                    break
            if time.monotonic() >= deadline:
                raise RedisProcessError(
                    f"replica {replica.port} not promoted after {timeout:.0f}s\n"
                    + replica.log_tail()
                )
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return primary, replica

    def revive(self, node: ClusterNode, timeout: float = 20.0) -> None:
        """Start a killed ``node`` again on its port, bus port and nodes.conf, and wait until it
        is back as a synced replica (a primary whose slots were taken over while it was down
        rejoins as a replica of the node that replaced it) and the cluster is ok."""
        node._revive = True
        node.start(port=node.port)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                replication = node._command_reply("INFO", "replication")
                if (
                    replication.get("role") == "slave"
                    and replication.get("master_link_status") == "up"
                ):
                    break
            if time.monotonic() >= deadline:
                raise RedisProcessError(
                    f"node {node.port} not back as a synced replica after {timeout:.0f}s\n"
                    + node.log_tail()
                )
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def move_slot(self, slot: int, to: ClusterNode, *, batch: int = 100) -> None:
        """Move ``slot`` and its keys to the primary ``to``, as ``redis-cli --cluster reshard``:
        SETSLOT IMPORTING / MIGRATING, MIGRATE the keys, then SETSLOT NODE on every primary."""
        source = self.slot_owner(slot)
        if source is to:
            return
        source_id, target_id = source.node_id(), to.node_id()
        to._command_reply("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source._command_reply("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys: Sequence[str] = source._command_reply("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            source._command_reply("MIGRATE", HOST, to.port, "", 0, 5000, "REPLACE", "KEYS", *keys)
        # The target first, as redis-cli does, so it serves the slot before the source lets go.
        for node in [to, source] + [p for p in self.primaries() if p not in (to, source)]:
            node._command_reply("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        deadline = time.monotonic() + 10.0
        while self.slot_owner(slot) is not to:
            if time.monotonic() >= deadline:
                raise RedisProcessError(f"slot {slot} did not move to {to.port}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"=== node {n.port} ===\n{n.log_tail(lines)}" for n in self.nodes)

    @property
    def tmpdirs(self) -> list[Path]:
        return [node.tmpdir for node in self.nodes]
