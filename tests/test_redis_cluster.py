"""The test cluster itself: six real nodes that form a cluster, fail over and move slots."""

from __future__ import annotations

import os

import pytest

from celery_stoker.testing.redis_cluster import RedisCluster, slot_of

KEY = "stoker:{selftest}:lease"


def test_a_cluster_forms_fails_over_moves_a_slot_and_leaves_no_process(
    stoker_redis_cluster: RedisCluster,
) -> None:
    cluster = stoker_redis_cluster
    assert len(cluster.primaries()) == 3
    client = cluster.client()
    client.set(KEY, b"v")
    primary, replica = cluster.nodes_for_key(KEY)
    assert replica is not None and replica is not primary

    target = next(p for p in cluster.primaries() if p is not primary)
    cluster.move_slot(slot_of(KEY), target)
    assert cluster.slot_owner(slot_of(KEY)) is target
    assert client.get(KEY) == b"v"  # the key moved with its slot; the client follows MOVED

    dead, promoted = cluster.kill_primary_of(KEY)
    assert dead is target and not dead.is_running
    assert cluster.slot_owner(slot_of(KEY)) is promoted
    assert cluster.client().get(KEY) == b"v"
    client.close()

    pids = [node.pid for node in cluster.nodes if node.pid]
    cluster.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
