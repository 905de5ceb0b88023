"""The pure logic of spreading leadership (``balance.py``): loads, plans, orders, the ledger.

No Redis, no workers: announcements as plain data, time as a number.  The
fleet tests (``test_spread.py``) show the same with real workers.
"""

from __future__ import annotations

import random

import pytest

from celery_stoker.balance import (
    Announcement,
    Ledger,
    Move,
    Placement,
    expiry_position,
    next_move,
    plan,
    release_order,
    signature,
)

NAMES = [f"s{i:02d}" for i in range(12)]


def worker(
    leads: list[str] = (),  # type: ignore[assignment]
    *,
    eligible: list[str] | None = None,
    weights: dict[str, int] | None = None,
    token: int = 100,
    **kwargs: object,
) -> Announcement:
    return Announcement(
        eligible=frozenset(NAMES if eligible is None else eligible),
        weights=weights or {},
        leads={name: token + i for i, name in enumerate(leads)},
        **kwargs,  # type: ignore[arg-type]
    )


def apply(placement: Placement, moves: list[Move]) -> dict[str, int]:
    loads = dict(placement.loads)
    for move in moves:
        loads[move.giver] -= placement.weight(move.name)
        loads[move.target] += placement.weight(move.name)
    return loads


def stable(placement: Placement, loads: dict[str, int], leader: dict[str, str]) -> bool:
    """No Stoker's leader is two of its weights above a worker that may take it."""
    return all(
        loads[node] - loads[t] < 2 * placement.weight(name)
        for name, node in leader.items()
        for t in placement.takers(name)
    )


def test_a_cold_start_spreads_one_workers_leases_evenly() -> None:
    placement = Placement({"a": worker(NAMES), "b": worker(), "c": worker(), "d": worker()})
    moves = plan(placement)
    assert {m.giver for m in moves} == {"a"}
    assert len(moves) == 9
    assert apply(placement, moves) == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_nothing_moves_when_the_spread_is_one_or_less() -> None:
    placement = Placement(
        {
            "a": worker(NAMES[:4]),
            "b": worker(NAMES[4:7]),
            "c": worker(NAMES[7:10]),
            "d": worker(NAMES[10:]),
        }
    )
    assert placement.loads == {"a": 4, "b": 3, "c": 3, "d": 2}
    assert [(m.giver, m.target) for m in plan(placement)] == [("a", "d")]  # a spread of 2
    even = Placement(
        {
            "a": worker(NAMES[:3]),
            "b": worker(NAMES[3:6]),
            "c": worker(NAMES[6:9]),
            "d": worker(NAMES[9:]),
        }
    )
    assert plan(even) == []
    off_by_one = Placement(
        {"a": worker(NAMES[:4]), "b": worker(NAMES[4:8]), "c": worker(NAMES[8:])}
    )
    assert plan(off_by_one) == []


def test_three_loaded_workers_each_give_one_to_a_newcomer_at_once() -> None:
    """The issue's join: 4/4/4 and a new worker: three moves, one by each, and no more."""
    placement = Placement(
        {"a": worker(NAMES[:4]), "b": worker(NAMES[4:8]), "c": worker(NAMES[8:]), "n": worker()}
    )
    moves = plan(placement)
    assert [(m.giver, m.target) for m in moves] == [("a", "n"), ("b", "n"), ("c", "n")]
    for me in "abc":
        move = next_move(placement, me)
        assert move is not None and (move.giver, move.target) == (me, "n")
    assert next_move(placement, "n") is None


def test_a_move_never_moves_back() -> None:
    """Random fleets: after the plan nothing moves, and no Stoker changes hands twice."""
    rng = random.Random(25)
    for _ in range(200):
        nodes = [f"w{i}" for i in range(rng.randint(1, 7))]
        names = [f"x{i}" for i in range(rng.randint(0, 30))]
        weights = {n: rng.choice((1, 1, 1, 2, 5)) for n in names}
        leads: dict[str, list[str]] = {node: [] for node in nodes}
        for name in names:
            leads[rng.choice(nodes)].append(name)
        placement = Placement(
            {
                node: Announcement(
                    eligible=frozenset(n for n in names if rng.random() < 0.8 or n in leads[node]),
                    weights=weights,
                    leads={n: 1 for n in leads[node]},
                )
                for node in nodes
            }
        )
        moves = plan(placement)
        moved = [m.name for m in moves]
        squares = sum(v * v for v in placement.loads.values())
        loads = dict(placement.loads)
        for move in moves:
            assert move.target in placement.takers(move.name)
            w = placement.weight(move.name)
            assert loads[move.giver] - loads[move.target] >= 2 * w
            loads[move.giver] -= w
            loads[move.target] += w
            after = sum(v * v for v in loads.values())
            assert after < squares
            squares = after
        leader = dict(placement.leader)
        for move in moves:
            leader[move.name] = move.target
        assert stable(placement, loads, leader)
        # Never back: no Stoker returns to a worker it left.
        for name in set(moved):
            hops = [m for m in moves if m.name == name]
            left = {hops[0].giver}
            for hop in hops:
                assert hop.target not in left, hops
                left.add(hop.giver)


def test_shares_with_eligibility_count_where_each_stoker_may_go() -> None:
    """A Stoker only ``a`` may lead stays on ``a`` and counts there; the rest make up for it."""
    only_a = ["s00", "s01", "s02"]
    placement = Placement(
        {
            "a": worker(NAMES, eligible=NAMES),
            "b": worker(eligible=[n for n in NAMES if n not in only_a]),
            "c": worker(eligible=[n for n in NAMES if n not in only_a]),
        }
    )
    moves = plan(placement)
    assert not {m.name for m in moves} & set(only_a)
    loads = apply(placement, moves)
    assert loads == {"a": 4, "b": 4, "c": 4}


def test_a_heavy_stoker_counts_as_its_weight_and_moves_only_where_it_helps() -> None:
    heavy = {"s00": 5}
    placement = Placement({"a": worker(NAMES[:4], weights=heavy), "b": worker(weights=heavy)})
    assert placement.loads == {"a": 8, "b": 0}
    moves = plan(placement)
    assert "s00" not in {m.name for m in moves}  # 8 - 0 < 2 * 5: moving it would not help
    assert apply(placement, moves) == {"a": 5, "b": 3}
    # Heavier first where it fits: one move instead of three.
    placement = Placement({"a": worker(NAMES[:4], weights={"s00": 3}), "b": worker()})
    assert [m.name for m in plan(placement)] == ["s00"]


def test_an_impossible_fair_share_is_left_alone() -> None:
    """One Stoker of weight 10 and two workers: nothing to gain, nothing moves, ever."""
    placement = Placement({"a": worker(["s00"], weights={"s00": 10}), "b": worker()})
    assert plan(placement) == []
    assert next_move(placement, "a") is None


def test_draining_stopping_and_resting_workers_take_nothing() -> None:
    placement = Placement(
        {
            "a": worker(NAMES[:6]),
            "drained": worker(available=False),
            "rest": worker(resting=frozenset(NAMES)),
            "b": worker(NAMES[6:]),
        }
    )
    assert plan(placement) == []
    assert release_order(placement, "s00", "a") == ["b"]
    assert expiry_position(placement, "s00", "drained") is None
    # A draining worker's own leases are its to release, not to give away by plan.
    placement = Placement({"drained": worker(NAMES, available=False), "b": worker()})
    assert plan(placement) == []


def test_fixed_stokers_stay() -> None:
    placement = Placement({"a": worker(NAMES[:4]), "b": worker()})
    moves = plan(placement, fixed=NAMES[:3])
    assert [m.name for m in moves] == [NAMES[3]]


def test_a_release_names_the_least_loaded_first_and_spreads_ties() -> None:
    placement = Placement(
        {
            "a": worker(NAMES[:4]),
            "b": worker(NAMES[4:7]),
            "c": worker(NAMES[7:9]),
            "d": worker(NAMES[9:11]),
            "e": worker(NAMES[11:]),
        }
    )
    assert release_order(placement, "s00", "a")[0] == "e"
    assert release_order(placement, "s00", "a")[-1] == "b"
    # Two releases of different Stokers among equal loads do not all name one worker.
    even = Placement({"a": worker(NAMES[:3])} | {n: worker() for n in "bcdef"})
    firsts = {release_order(even, name, "a")[0] for name in NAMES}
    assert len(firsts) >= 3


def test_at_an_expiry_the_least_loaded_tries_first() -> None:
    placement = Placement({"a": worker(NAMES[:5]), "b": worker(NAMES[5:8]), "c": worker()})
    assert expiry_position(placement, "s11", "c") == 0
    assert expiry_position(placement, "s11", "b") == 1
    assert expiry_position(placement, "s11", "a") == 2
    # Not eligible: the queue's rank decides.
    assert expiry_position(Placement({"c": worker(eligible=[])}), "s11", "c") is None


def test_two_claims_of_one_stoker_go_to_the_newer_term() -> None:
    """The giver's heartbeat is older than the taker's: the larger token wins."""
    placement = Placement({"a": worker(["s00"], token=100), "b": worker(["s00"], token=200)})
    assert placement.leader == {"s00": "b"}
    assert placement.loads == {"a": 0, "b": 1}


def test_a_stoker_given_away_counts_at_its_target_until_the_target_says_so() -> None:
    gave = worker(NAMES[1:4], moving={"s00": ("b", 100)})
    placement = Placement({"a": gave, "b": worker()})
    assert placement.leader["s00"] == "b"
    assert placement.loads == {"a": 3, "b": 1}
    # The target's newer term: its own claim; an older claim elsewhere loses to the move.
    later = Placement({"a": gave, "b": worker(["s00"], token=150), "c": worker(["s00"], token=50)})
    assert later.leader["s00"] == "b" and later.loads["c"] == 0
    # A target no longer live: the Stoker counts nowhere until someone claims it.
    gone = Placement({"a": gave})
    assert "s00" not in gone.leader


def test_the_ledger_holds_a_target_until_its_heartbeat_shows_the_move() -> None:
    ledger = Ledger(timeout=10.0)
    ledger.gave("s00", "b", 100, now=0.0)
    assert ledger.held() == {"b"}
    assert ledger.announced() == {"s00": ("b", 100)}
    ledger.settle({"b": worker()}, now=1.0)
    assert ledger.held() == {"b"}
    ledger.settle({"b": worker(["s00"], token=150)}, now=2.0)
    assert ledger.held() == set() and ledger.announced() == {}
    ledger.gave("s01", "c", 100, now=3.0)
    ledger.settle({}, now=13.5)  # never taken (the target died): forgotten
    assert ledger.held() == set()


def test_next_move_skips_held_targets() -> None:
    placement = Placement({"a": worker(NAMES[:6]), "b": worker(), "c": worker()})
    first = next_move(placement, "a")
    assert first is not None
    other = next_move(placement, "a", held={first.target})
    assert other is not None and other.target != first.target
    assert next_move(placement, "a", held={"b", "c"}) is None


def test_the_signature_ignores_loads_but_not_who_is_there() -> None:
    one = Placement({"a": worker(NAMES), "b": worker()})
    moved = Placement({"a": worker(NAMES[1:]), "b": worker(["s00"])})
    assert signature(one) == signature(moved)
    assert signature(one) != signature(Placement({"a": worker(NAMES)}))
    assert signature(one) != signature(
        Placement({"a": worker(NAMES), "b": worker(available=False)})
    )


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "x",
        {},
        {"eligible": "s00"},
        {"eligible": [1, 2]},
    ],
)
def test_announcements_not_in_our_form_are_ignored_or_cleaned(raw: object) -> None:
    parsed = Announcement.parse(raw)
    assert parsed is None or parsed.eligible == frozenset()


def test_an_announcement_round_trips_and_drops_what_is_not_ours() -> None:
    announced = worker(
        NAMES[:2], weights={"s00": 3}, moving={"s05": ("b", 7)}, resting=frozenset({"s09"})
    )
    assert Announcement.parse(announced.fields()) == announced
    noisy = announced.fields() | {"weights": {"s00": True, "s01": 0}, "leads": {"s00": "1"}}
    parsed = Announcement.parse(noisy)
    assert parsed is not None and parsed.weights == {} and parsed.leads == {}


def test_a_large_fleet_plans_quickly_enough_to_run_every_tick() -> None:
    """2,000 Stokers on one of 20 workers: the first move is found at once (not timed here)."""
    names = [f"x{i}" for i in range(2000)]
    nodes = {f"w{i}": Announcement(eligible=frozenset(names)) for i in range(1, 20)}
    nodes["w0"] = Announcement(eligible=frozenset(names), leads=dict.fromkeys(names, 1))
    placement = Placement(nodes)
    move = next_move(placement, "w0")
    assert move is not None and move.giver == "w0"
    assert next_move(placement, "w5") is None
