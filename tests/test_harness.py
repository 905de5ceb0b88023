"""``StokerHarness`` and the pytest plugin: a Stoker tested with no Redis and no worker.

The harness runs the very function the pool runs (``callbacks.run_callbacks``)
against a store in memory; these tests check it behaves as a worker would
(the serializer round trip, fencing, init only when nothing is stored) and
that it lets the Stoker's mistakes reach the test.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from celery_stoker import Stoker
from celery_stoker.callbacks import run_callbacks
from celery_stoker.store import StateError
from celery_stoker.testing import StokerHarness
from celery_stoker.testing import harness as harness_module

pytest_plugins = ["pytester"]


class Counter(Stoker):
    inits = 0

    def init(self) -> dict[str, Any]:
        type(self).inits += 1
        return {"n": 0, "seen": []}

    def event(self, state: dict[str, Any], event: str, reason: Any) -> dict[str, Any]:
        if event == "timer" and state["n"] == 99:
            raise RuntimeError("ninety-nine")
        return {"n": state["n"] + 1, "seen": [*state["seen"], event]}

    def next_timer_in(self, state: dict[str, Any]) -> float:
        return 5.0 + state["n"]


def test_a_term_runs_init_then_now_leader_then_timers() -> None:
    Counter.inits = 0
    harness = StokerHarness(Counter, members=("w1@test", "w2@test"))
    harness.elect()
    assert Counter.inits == 1
    assert harness.state == {"n": 1, "seen": ["now_leader"]}
    assert harness.next_timer == 6.0
    harness.timer()
    harness.cluster_change("w3@test", "joined")
    assert harness.context is not None
    assert harness.context.members == frozenset({"w1@test", "w2@test", "w3@test"})
    assert harness.context.name == harness.name and harness.context.hostname == "w1@test"
    harness.cluster_change("w2@test", "lost")
    assert harness.context.members == frozenset({"w1@test", "w3@test"})
    assert harness.events == [
        ("now_leader", None),
        ("timer", None),
        ("cluster_change", {"node": "w3@test", "change": "joined"}),
        ("cluster_change", {"node": "w2@test", "change": "lost"}),
    ]


def test_state_carries_over_terms_and_tokens_only_grow() -> None:
    Counter.inits = 0
    harness = StokerHarness(Counter)
    harness.elect()
    first = harness.token
    harness.timer()
    harness.shutdown()
    assert harness.events[-1] == ("shutdown", "worker_stopping")
    assert not harness.leading
    with pytest.raises(RuntimeError, match="call elect"):
        harness.timer()
    harness.elect()
    assert harness.token is not None and first is not None and harness.token > first
    assert Counter.inits == 1, "init() runs only when nothing is stored"
    assert harness.state["seen"] == ["now_leader", "timer", "shutdown", "now_leader"]


def test_a_raising_callback_reaches_the_test_and_the_state_is_unchanged() -> None:
    harness = StokerHarness(Counter)
    harness.elect()
    harness.store.encoded = harness.store.encode({"n": 99, "seen": []})
    before = harness.state
    with pytest.raises(RuntimeError, match="ninety-nine"):
        harness.timer()
    assert harness.state == before


def test_an_unstorable_state_names_the_stoker_the_serializer_and_the_type() -> None:
    class Locky(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return {"lock": threading.Lock()}

    harness = StokerHarness(Locky)
    with pytest.raises(StateError) as info:
        harness.elect()
    text = str(info.value)
    assert "Locky" in text and "'json'" in text and "lock" in text.lower()
    assert harness.state is None


def test_the_state_is_what_the_serializer_gives_back() -> None:
    class Tupled(Stoker):
        def event(self, state: Any, event: str, reason: Any) -> Any:
            return {"pair": (1, 2)}

    assert StokerHarness(Tupled).elect() is not None
    harness = StokerHarness(Tupled)
    harness.elect()
    assert harness.state == {"pair": [1, 2]}, "JSON turns a tuple into a list, as in Redis"
    pickled = StokerHarness(Tupled, serializer="pickle")
    pickled.elect()
    assert pickled.state == {"pair": (1, 2)}


def test_cluster_change_names_only_the_changes_gossip_reports() -> None:
    harness = StokerHarness(Counter)
    harness.elect()
    with pytest.raises(ValueError, match="joined"):
        harness.cluster_change("w2@test", "arrived")


def test_the_harness_runs_the_workers_own_event_function() -> None:
    assert harness_module.run_callbacks is run_callbacks


def test_the_plugin_gives_users_a_harness_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from celery_stoker import Stoker

        class Poller(Stoker):
            def init(self):
                return {"seen": 0}

            def event(self, state, event, reason):
                return {"seen": state["seen"] + 1}

            def next_timer_in(self, state):
                return 30.0

        def test_poller(stoker_harness):
            harness = stoker_harness(Poller, members=("w1@test", "w2@test"))
            harness.elect()
            harness.timer()
            assert harness.state == {"seen": 2}
            assert harness.next_timer == 30.0
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
