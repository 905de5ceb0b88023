"""The balancer's own bookkeeping (``balancer.py``) on plain stand-ins: no Redis, no workers.

What it announces, which of its Stokers it may move, and one move from the
first look to its end, driven tick by tick on a clock the test sets.  The
stand-ins are plain objects with the few fields the balancer reads of an
activator and its election; the election, the lease and the fleet with real
workers are in ``test_spread.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from celery_stoker.balance import Announcement, next_move
from celery_stoker.balancer import Balancer
from celery_stoker.membership import SCOPE_FIELD, Scope

ME = "me@h"


@dataclass
class FakeElection:
    term: Any = None
    accepting: bool = True
    suspended: bool = False
    active_from: float | None = None
    eligible: bool = True
    draining: bool = False
    state: str = "follower"
    cooling: bool = False
    stepped_down: int | None = None
    leader: str | None = None
    settings: Any = field(default_factory=lambda: SimpleNamespace(lease_ttl=2.0, stop_timeout=4.0))
    handoffs: list[tuple[int, str, str]] = field(default_factory=list)
    #: Whom the last release named (``RedisLease.named``).
    lease: Any = field(default_factory=lambda: SimpleNamespace(named=None))

    def resting(self) -> bool:
        return self.cooling

    def request_handoff(self, token: int, to: str, reason: str = "rebalance") -> None:
        self.handoffs.append((token, to, reason))


@dataclass
class FakeStoker:
    name: str
    election: FakeElection
    weight: int = 1
    key_prefix: str = "stoker"
    running: bool = False

    def busy(self) -> bool:
        return self.running


def leading(token: int, *, age: float = 60.0, **kwargs: Any) -> FakeElection:
    return FakeElection(
        term=SimpleNamespace(token=token),
        state="leader",
        active_from=time.time() - age,
        **kwargs,
    )


class FakeMembership:
    """What the balancer reads of the fleet: the others' announcements, by prefix."""

    def __init__(self) -> None:
        self.scope = Scope("app", frozenset({"stoker"}), "0.3.0")
        self.others: dict[str, Announcement] = {}

    def heard(self, prefix: str) -> dict[str, Announcement]:
        return dict(self.others)


@pytest.fixture(autouse=True)
def software_info() -> Iterator[None]:
    """The balancer writes Celery's SOFTWARE_INFO (what heartbeats carry): put it back."""
    from celery.worker.state import SOFTWARE_INFO

    saved = dict(SOFTWARE_INFO)
    yield
    SOFTWARE_INFO.clear()
    SOFTWARE_INFO.update(saved)


def balancer(stokers: list[FakeStoker], clock: list[float]) -> tuple[Balancer, FakeMembership]:
    membership = FakeMembership()
    made = Balancer(ME, membership, enabled=True, clock=lambda: clock[0])  # type: ignore[arg-type]
    for stoker in stokers:
        made.add(stoker)
    made.attach(True, 1.0)
    return made, membership


def test_it_announces_what_it_leads_may_lead_and_will_not_take_now() -> None:
    stokers = [
        FakeStoker("a", leading(11), weight=3),
        FakeStoker("b", FakeElection()),
        FakeStoker("c", FakeElection(cooling=True)),
        FakeStoker("d", FakeElection(state="unk")),
        FakeStoker("e", FakeElection(eligible=False)),
    ]
    made, _ = balancer(stokers, [0.0])
    mine = made.own("stoker")
    assert mine.eligible == {"a", "b", "c", "d"}
    assert mine.weights == {"a": 3}
    assert mine.leads == {"a": 11}
    assert mine.resting == {"c", "d"}  # given away lately, or not waiting yet
    assert mine.available
    made.announce()
    from celery.worker.state import SOFTWARE_INFO

    sent = SOFTWARE_INFO[SCOPE_FIELD]["balance"]["stoker"]
    assert Announcement.parse(sent) == mine
    stokers[1].election.draining = True
    assert not made.own("stoker").available
    stokers[1].election.draining = False
    made.begin_stopping()
    assert not made.own("stoker").available


def test_only_its_own_stokers_are_fixed() -> None:
    """The plan applies ``fixed`` by name: another worker's Stokers must not be in it."""
    stokers = [
        FakeStoker("mine-busy", leading(1), running=True),
        FakeStoker("mine-young", leading(2, age=0.5)),
        FakeStoker("mine-waiting", leading(3, accepting=False)),
        FakeStoker("mine-free", leading(4)),
        FakeStoker("theirs", FakeElection()),
    ]
    made, _ = balancer(stokers, [0.0])
    assert made._fixed("stoker") == {"mine-busy", "mine-young", "mine-waiting"}
    # When nothing idle can move: a busy one may (its step-down waits for its event).
    assert made._fixed("stoker", busy_too=False) == {"mine-young", "mine-waiting"}


def test_a_move_waits_for_a_settled_fleet_then_hands_over_and_counts_at_the_target() -> None:
    names = [f"s{i}" for i in range(4)]
    stokers = [FakeStoker(name, leading(100 + i)) for i, name in enumerate(names)]
    clock = [100.0]
    made, membership = balancer(stokers, clock)
    membership.others = {"other@h": Announcement(eligible=frozenset(names))}

    def tick() -> float:
        return made._tick()

    tick()  # the fleet is new to it: settle first
    assert not any(s.election.handoffs for s in stokers)
    clock[0] += 2 * 1.0 + 1.0 + 0.1  # two heartbeats and a second
    tick()
    asked = [(s, s.election.handoffs[0]) for s in stokers if s.election.handoffs]
    assert len(asked) == 1
    stoker, (token, to, reason) = asked[0]
    assert (to, reason) == ("other@h", "rebalance")
    # One at a time: nothing more until that step-down is over.
    clock[0] += 1.0
    tick()
    assert sum(len(s.election.handoffs) for s in stokers) == 1
    # The election stepped down and released, naming the target.
    stoker.election.term, stoker.election.stepped_down = None, token
    stoker.election.lease.named = "other@h"
    made.released(stoker.name, "other@h", token)
    tick()
    assert made.moves == 1
    assert made.own("stoker").moving == {stoker.name: ("other@h", token)}
    # The target's heartbeat does not show it yet: it is held, and 3 - 1 leaves nothing to do.
    clock[0] += 1.0
    tick()
    assert sum(len(s.election.handoffs) for s in stokers) == 1
    placement = made.placement("stoker")
    assert placement.loads == {ME: 3, "other@h": 1}
    # Its heartbeat shows the new term: confirmed, no longer in transit.
    membership.others = {
        "other@h": Announcement(eligible=frozenset(names), leads={stoker.name: token + 1})
    }
    made.placement("stoker")
    assert made.own("stoker").moving == {}


def test_without_gossip_or_with_balance_off_it_names_no_one_and_moves_nothing() -> None:
    stokers = [FakeStoker(f"s{i}", leading(i + 1)) for i in range(4)]
    clock = [0.0]
    made, membership = balancer(stokers, clock)
    membership.others = {"other@h": Announcement(eligible=frozenset(s.name for s in stokers))}
    assert made.release_order("s0") == ["other@h"]
    assert made.expiry_position("s0") == 1  # the other one leads nothing: it goes first
    made.attach(False, None)
    assert made.release_order("s0") is None and made.expiry_position("s0") is None
    for _ in range(3):
        clock[0] += 10.0
        made._tick()
    assert not any(s.election.handoffs for s in stokers)
    off = Balancer(ME, membership, enabled=False)  # type: ignore[arg-type]
    off.add(stokers[0])
    off.attach(True, 2.0)
    assert off.release_order("s0") is None


def test_a_target_the_release_could_not_reach_gets_nothing_more_for_a_while() -> None:
    """It died (its listener is gone) or drains: the release named another; not it again."""
    names = [f"s{i}" for i in range(6)]
    stokers = [FakeStoker(name, leading(100 + i)) for i, name in enumerate(names)]
    clock = [100.0]
    made, membership = balancer(stokers, clock)
    membership.others = {
        "gone@h": Announcement(eligible=frozenset(names)),
        "live@h": Announcement(eligible=frozenset(names), leads={"x": 1, "y": 2}),
    }
    names.extend(["x", "y"])
    made._tick()
    clock[0] += 3.1
    made._tick()
    (stoker,) = [s for s in stokers if s.election.handoffs]
    token, to, _ = stoker.election.handoffs[0]
    assert to == "gone@h"  # the least loaded, as far as the heartbeats tell
    stoker.election.term, stoker.election.stepped_down = None, token
    stoker.election.lease.named = "live@h"
    made.released(stoker.name, "live@h", token)
    made._tick()
    clock[0] += 1.0
    made._tick()
    asked = [s.election.handoffs for s in stokers if s.election.handoffs and s is not stoker]
    alone = next_move(made.placement("stoker"), ME, fixed=made._fixed("stoker"))
    assert alone is not None and alone.target == "gone@h"  # the heartbeats alone would
    assert asked == []


def test_at_an_expiry_the_holder_that_let_it_expire_goes_last() -> None:
    """Its heartbeats may outlive it by a couple of intervals: nobody waits on it."""
    stokers = [FakeStoker("s0", FakeElection(leader="dead@h"))]
    made, membership = balancer(stokers, [0.0])
    membership.others = {
        # As light as this worker, and first of the two by the tie-break of names.
        "dead@h": Announcement(eligible=frozenset({"s0"})),
        "busy@h": Announcement(eligible=frozenset({"s0"}), leads={"x": 1}),
    }
    assert made.expiry_position("s0") == 0  # not behind the dead holder
    stokers[0].election.leader = None  # a waiter that never saw who held it: by load only
    assert made.expiry_position("s0") == 1
