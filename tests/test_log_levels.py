"""Routine is INFO: a clean failover logs no WARNING or ERROR from the package.

Becoming leader, following, stepping down for a stop, a handoff or a drain,
a first start on a new Redis: a person need not look at any of them, so none
of them may be a WARNING (an operator's alert on WARNING lines would fire on
every deploy).  What a person must look at (a lost lease, failures, lost
history, refused messages) stays WARNING or ERROR, and other tests find
those lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from support.workers import Fleet, Records, check_terms, heard_join

from celery_stoker.testing import wait_for

pytestmark = pytest.mark.workers

#: A worker log line at WARNING or above from one of the package's loggers, in the
#: format the recorder app uses with STOKER_TEST_LOG_NAMES (the logger's name after
#: the process's).
LOUD = re.compile(r"^\[[^\]]*: (WARNING|ERROR|CRITICAL)/\S+ celery_stoker[\w.]*\] .*$", re.M)


def loud_lines(log: str) -> list[str]:
    return [m.group(0) for m in LOUD.finditer(log)]


def test_a_clean_failover_logs_nothing_above_info(
    fleets: Callable[..., Fleet], records: Records
) -> None:
    fleet = fleets("prefork", STOKER_TEST_TIMER="0.3", STOKER_TEST_LOG_NAMES="1")
    w1 = fleet.start("w1@%h")
    wait_for(lambda: records.of("now_leader"), 30, what="w1 leads")
    w2 = fleet.start("w2@%h")
    heard_join(records, w2.node)
    wait_for(lambda: len(records.of("timer")) >= 3, 20, what="timers")
    w1.sigterm()
    wait_for(
        lambda: [r for r in records.of("now_leader") if r.host == w2.node],
        20,
        what="w2 takes over",
    )
    assert w1.wait_exit(45) == 0
    wait_for(lambda: len([r for r in records.of("timer") if r.host == w2.node]) >= 2, 20)
    # The routine lines are there, at INFO, with their logger named.
    assert re.search(r"INFO/MainProcess celery_stoker[\w.]*\] .* became leader", w2.log())
    stepped = r"INFO/MainProcess celery_stoker[\w.]*\] .* steps down \(worker_stopping"
    assert re.search(stepped, w1.log())
    for worker in (w1, w2):
        assert not loud_lines(worker.log()), "\n".join(loud_lines(worker.log()))
    check_terms(records.events())
