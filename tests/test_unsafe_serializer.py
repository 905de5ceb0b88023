"""A serializer that can run code stores the state only with an explicit opt-in.

Real workers: with ``stoker_state_serializer = "pickle"`` and no
``stoker_state_allow_unsafe_serializer``, the worker stops at start naming both
settings and why; with the opt-in it elects.  The settings' own checks are in
test_settings.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.workers import Fleet, Records

from celery_stoker.testing import wait_for


@pytest.mark.workers
@pytest.mark.parametrize("opted_in", [False, True])
def test_a_worker_with_pickle_starts_only_with_the_opt_in(
    fleets: Callable[..., Fleet], records: Records, opted_in: bool
) -> None:
    env = {"STOKER_TEST_STATE_SERIALIZER": "pickle"}
    if opted_in:
        env["STOKER_TEST_ALLOW_UNSAFE_SERIALIZER"] = "1"
    worker = fleets("solo", **env).start("w1@%h")
    if opted_in:
        wait_for(lambda: records.of("now_leader"), 60, what="w1 leads with pickle")
        assert worker.alive()
        return
    code = worker.wait_exit(60)
    assert code != 0
    log = worker.log()
    assert "stoker_state_serializer='pickle' can run code when it decodes" in log
    assert "stoker_state_allow_unsafe_serializer = True" in log
    assert not records.of("now_leader")  # it stopped before any election
