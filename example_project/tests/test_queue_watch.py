"""Testing QueueWatch the two ways celery-stoker's pytest plugin offers.

* ``stoker_harness``: the Stoker's logic alone, no Redis and no worker (the
  queue measurement and the publish are this project's own I/O, replaced here);
* ``stoker_fleet`` + ``stoker_redis``: two real ``celery worker`` processes on a
  private Redis, the leader's summary, and a handover on SIGTERM.

Run from the repository root: ``pytest example_project/tests``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_stoker.testing import wait_for
from example_project import stokers
from example_project.stokers import QueueWatch


def test_queue_watch_logic_with_the_harness(
    stoker_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    depths = iter([{"celery": 3, "reports": 0}, {"celery": 7, "reports": 2}])
    published: list[tuple[dict[str, Any], int]] = []
    monkeypatch.setattr(stokers, "queue_depths", lambda: next(depths))
    monkeypatch.setattr(
        stokers, "publish", lambda summary, token: published.append((summary, token)) or True
    )

    harness = stoker_harness(QueueWatch, members=("w1@test", "w2@test"))
    harness.elect()
    assert harness.state == {"checks": 1, "peak": 3}
    assert harness.next_timer == stokers.CHECK_EVERY
    harness.timer()
    assert harness.state == {"checks": 2, "peak": 9}
    assert [token for _, token in published] == [harness.token, harness.token]

    harness.cluster_change("w2@test", "lost")
    assert harness.state == {"checks": 2, "peak": 9}, "a cluster change measures nothing"
    assert harness.context.members == frozenset({"w1@test"})


@pytest.mark.workers
def test_two_workers_one_summary_then_a_handover(stoker_fleet: Any, stoker_redis: Any) -> None:
    fleet = stoker_fleet(
        "example_project",
        env={"EXAMPLE_BROKER_URL": stoker_redis.url, "EXAMPLE_CHECK_EVERY": "0.3"},
    )
    workers = [fleet.start("w1@%h"), fleet.start("w2@%h")]
    client = stoker_redis.client()

    def summary() -> dict[str, Any] | None:
        raw = client.hget(stokers.SUMMARY_KEY, "summary")
        return json.loads(raw) if raw else None

    first = wait_for(summary, 30, what="a first summary")
    leader = next(w for w in workers if w.node == first["by"])
    other = next(w for w in workers if w is not leader)
    wait_for(lambda: "following" in other.log(), 30, what="the other worker follows")
    leader.sigterm()
    after = wait_for(
        lambda: (s := summary()) and s["by"] == other.node and s, 30, what="a new leader's summary"
    )
    assert after["token"] > first["token"]
