"""How leadership is spread: loads, who may take what, and which Stoker moves where (pure).

Everything here is plain data in, plain data out, with time as a parameter:
no Redis, no Celery, no threads (``balancer.py`` is the loop that feeds it and
acts on it).  So every worker that sees the same heartbeats makes the same
decisions, and the tests drive it without a fleet.

**What a worker says.**  Each worker's heartbeats carry, per key prefix, an
:class:`Announcement`: the Stokers it may lead (``eligible=`` applied), their
weights, the Stokers it leads with each term's token, the Stokers it just gave
away and to whom (``moving``), and whether it takes leadership at all
(``available``: not while draining or stopping).  Heartbeats already travel
to every worker (Celery's gossip), so this costs no Redis command.

**Loads and shares.**  A worker's load is the sum of the weights of the
Stokers it leads under the prefix (``@stoker(weight=N)``, default 1).  Shares
are counted pairwise, per Stoker, because eligibility narrows who may lead
each one: a Stoker moves from worker A to worker B only if B may lead it, B
is available, and A's load exceeds B's by at least twice the Stoker's weight.
After such a move B's load is at most A's, so it never moves back, and the
sum of the squared loads falls by at least ``2 w²``: moves stop.  When nothing
can move, any two workers that may both lead a Stoker differ by less than two
of its weights: with S Stokers of weight 1 that all W workers may lead,
everyone leads ``floor(S / W)`` or ``ceil(S / W)``.  A Stoker only one worker
may lead counts on that worker and never moves; a Stoker heavier than half the
gap stays where it is (a fair share may be impossible: one Stoker of weight 10
and two workers).

**One plan for all.**  :func:`plan` moves, greedily, the heaviest Stoker that
can move from the most loaded worker to the least loaded one that may take it,
until nothing can move.  Ties are broken by a hash of the Stoker's and the
worker's names, the same on every worker, so equally loaded targets share the
Stokers of a crashed or stopped worker instead of all getting the first.
Every worker computes the plan on what it sees and carries out only its own
moves (:func:`next_move`): three workers that each lead one too many give one
each to a worker that just joined, at the same time, and no more.

**Who takes a free lease.**  A release names the first live waiter of
:func:`release_order` (least loaded first); at an expiry each waiter waits
:func:`expiry_position` head starts, so the least loaded tries first and the
others hear its new term before their turn.

**Stale heartbeats.**  A heartbeat is up to one interval old.  A worker that
gave a Stoker away says so (``moving``) until the taker's heartbeat lists it,
and the token in each claim settles who leads when two heartbeats disagree
(the newer term has the larger token).  :class:`Ledger` keeps what this worker
gave away, and which targets it waits to hear from before giving them more.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The heartbeat field (inside ``stoker_scope``) that holds a worker's announcements.
BALANCE_FIELD = "balance"


@dataclass(frozen=True)
class Announcement:
    """What one worker says about one key prefix in its heartbeats."""

    #: The Stokers this worker may lead (``eligible=`` applied), whatever it does now.
    eligible: frozenset[str] = frozenset()
    #: Weights other than 1 (the worker's own ``@stoker(weight=...)``).
    weights: Mapping[str, int] = field(default_factory=dict)
    #: The Stokers it leads, each with its term's token.
    leads: Mapping[str, int] = field(default_factory=dict)
    #: Stokers it just gave away: name -> (the worker it named, the token it gave up).
    moving: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    #: False while draining or stopping: it takes no leadership.
    available: bool = True
    #: Stokers it will not take for a while (it just gave them away, or they failed here).
    resting: frozenset[str] = frozenset()

    def fields(self) -> dict[str, Any]:
        """The JSON-able form that rides in the heartbeat (empty parts left out)."""
        out: dict[str, Any] = {"eligible": sorted(self.eligible)}
        if self.weights:
            out["weights"] = dict(sorted(self.weights.items()))
        if self.leads:
            out["leads"] = dict(sorted(self.leads.items()))
        if self.moving:
            out["moving"] = {name: list(move) for name, move in sorted(self.moving.items())}
        if not self.available:
            out["available"] = False
        if self.resting:
            out["resting"] = sorted(self.resting)
        return out

    @classmethod
    def parse(cls, raw: Any) -> Announcement | None:
        """An announcement read from a heartbeat; None when it is not in our form."""
        if not isinstance(raw, dict) or not isinstance(raw.get("eligible"), list):
            return None

        def names(value: Any) -> frozenset[str]:
            return (
                frozenset(v for v in value if isinstance(v, str))
                if isinstance(value, list)
                else frozenset()
            )

        def ints(value: Any) -> dict[str, int]:
            if not isinstance(value, dict):
                return {}
            return {
                k: v
                for k, v in value.items()
                if isinstance(k, str) and type(v) is int  # JSON true is no weight
            }

        moving: dict[str, tuple[str, int]] = {}
        raw_moving = raw.get("moving")
        if isinstance(raw_moving, dict):
            for name, move in raw_moving.items():
                if (
                    isinstance(name, str)
                    and isinstance(move, list)
                    and len(move) == 2
                    and isinstance(move[0], str)
                    and type(move[1]) is int
                ):
                    moving[name] = (move[0], move[1])
        return cls(
            eligible=names(raw["eligible"]),
            weights={k: v for k, v in ints(raw.get("weights")).items() if v >= 1},
            leads=ints(raw.get("leads")),
            moving=moving,
            available=raw.get("available", True) is not False,
            resting=names(raw.get("resting")),
        )


def tie(name: str, node: str) -> int:
    """A tie-break the same on every worker: spreads equal choices over Stokers and workers."""
    return zlib.crc32(f"{name}\0{node}".encode())


@dataclass
class Placement:
    """Who leads what, as the announcements of the live workers of one prefix tell it.

    ``nodes`` maps each live worker (this one included) to its announcement.
    A Stoker two workers claim goes to the claim with the larger token; one a
    worker says it gave away counts at the worker it named until a newer term
    is claimed (the taker's heartbeat may come after the giver's).
    """

    nodes: Mapping[str, Announcement]
    leader: dict[str, str] = field(init=False)
    loads: dict[str, int] = field(init=False)
    weights: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        best: dict[str, tuple[float, str]] = {}
        ordered = sorted(self.nodes.items(), key=lambda item: item[0])
        for node, announced in ordered:
            for name, token in announced.leads.items():
                if name not in best or token > best[name][0]:
                    best[name] = (token, node)
        for _node, announced in ordered:
            for name, (target, token) in announced.moving.items():
                # Just above the term given up, below any newer term: the taker's own
                # claim wins as soon as its heartbeat says it.
                if target in self.nodes and (name not in best or token + 0.5 > best[name][0]):
                    best[name] = (token + 0.5, target)
        self.leader = {name: node for name, (_, node) in best.items()}
        self.weights = {}
        for announced in self.nodes.values():
            for name in announced.eligible | set(announced.leads):
                weight = announced.weights.get(name, 1)
                self.weights[name] = max(weight, self.weights.get(name, 1))
        self.loads = dict.fromkeys(self.nodes, 0)
        for name, node in self.leader.items():
            self.loads[node] += self.weight(name)

    def weight(self, name: str) -> int:
        return self.weights.get(name, 1)

    def takers(self, name: str) -> list[str]:
        """The workers that may take ``name`` now: eligible, available, not resting on it."""
        return [
            node
            for node, announced in self.nodes.items()
            if announced.available and name in announced.eligible and name not in announced.resting
        ]

    def led_by(self, node: str) -> list[str]:
        return [name for name, leader in self.leader.items() if leader == node]


@dataclass(frozen=True)
class Move:
    """Hand ``name`` from ``giver`` to ``target`` (a clean handoff, reason ``rebalance``)."""

    name: str
    giver: str
    target: str


def plan(
    placement: Placement, *, fixed: Iterable[str] = (), max_moves: int | None = None
) -> list[Move]:
    """Every move, in order, that brings the placement to where nothing can move.

    Greedy: the most loaded available worker gives its heaviest Stoker that
    some available worker at least two of its weights lighter may take, to
    the least loaded of those; again until no such move is left.  ``fixed``
    Stokers stay where they are (this worker's terms that are not acting yet,
    or busy with an event).  Each move lowers the sum of squared loads, so the
    loop ends; ``max_moves`` bounds it anyway.
    """
    limit = max_moves if max_moves is not None else 2 * len(placement.leader) + 1
    moves: list[Move] = []
    for move in _moves(placement, set(fixed)):
        if len(moves) >= limit:
            break
        moves.append(move)
    return moves


def _moves(placement: Placement, fixed: set[str]) -> Iterator[Move]:
    """The moves of :func:`plan`, one at a time (a caller may stop early)."""
    loads = dict(placement.loads)
    givers = [n for n, a in placement.nodes.items() if a.available]
    takers = {name: placement.takers(name) for name in placement.leader}
    held: dict[str, list[str]] = {node: [] for node in placement.nodes}
    for name, node in placement.leader.items():
        if name not in fixed:
            held[node].append(name)
    for names in held.values():
        names.sort(key=lambda x: (-placement.weight(x), tie(x, "")))
    while True:
        move = _best_move(placement, loads, givers, held, takers)
        if move is None:
            return
        weight = placement.weight(move.name)
        loads[move.giver] -= weight
        loads[move.target] += weight
        held[move.giver].remove(move.name)
        held[move.target].append(move.name)
        held[move.target].sort(key=lambda x: (-placement.weight(x), tie(x, "")))
        yield move


def _best_move(
    placement: Placement,
    loads: Mapping[str, int],
    givers: list[str],
    held: Mapping[str, list[str]],
    takers: Mapping[str, list[str]],
) -> Move | None:
    """The next move of :func:`plan`, or None when nothing can move."""
    for giver in sorted(givers, key=lambda n: (-loads[n], n)):
        for name in held[giver]:
            weight = placement.weight(name)
            candidates = [
                t
                for t in takers.get(name, ())
                if t != giver and loads[giver] - loads[t] >= 2 * weight
            ]
            if candidates:
                target = min(candidates, key=lambda t: (loads[t], tie(name, t)))
                return Move(name, giver, target)
    return None


def next_move(
    placement: Placement,
    me: str,
    *,
    fixed: Iterable[str] = (),
    held: Iterable[str] = (),
    look_ahead: int | None = None,
) -> Move | None:
    """This worker's next move: its first in the shared :func:`plan`, to a target not ``held``.

    ``held`` are the workers this one gave to and has not heard from since
    (their heartbeat may not yet show what others gave them).  Only the first
    ``look_ahead`` moves of the plan are looked at (default: four per worker):
    a move further back waits until the ones before it are made.
    """
    held = set(held)
    limit = look_ahead if look_ahead is not None else 4 * len(placement.nodes) + 8
    for count, move in enumerate(_moves(placement, set(fixed))):
        if count >= limit:
            break
        if move.giver == me and move.target not in held:
            return move
    return None


def release_order(placement: Placement, name: str, releaser: str) -> list[str]:
    """The workers a release of ``name`` should name first: the least loaded first."""
    takers = [n for n in placement.takers(name) if n != releaser]
    return sorted(takers, key=lambda n: (placement.loads[n], tie(name, n)))


def expiry_position(placement: Placement, name: str, me: str) -> int | None:
    """How many head starts ``me`` gives the others at an expiry of ``name``'s lease.

    0 for the least loaded worker that may take it; None when ``me`` may not
    (then the waiter's place in the Redis queue decides, as without balance).
    """
    order = release_order(placement, name, "")
    return order.index(me) if me in order else None


def signature(placement: Placement) -> frozenset[tuple[str, bool, frozenset[str]]]:
    """What must stay the same for the fleet to count as settled: who is there, and for what.

    Loads and moves are left out: a move must not restart the wait it ends.
    """
    return frozenset(
        (node, announced.available, announced.eligible)
        for node, announced in placement.nodes.items()
    )


@dataclass
class Transit:
    """A Stoker this worker gave away, not yet seen led by anyone newer."""

    target: str
    token: int
    since: float


class Ledger:
    """What this worker gave away lately, and the targets it waits to hear from.

    A move stays here until a heartbeat shows a term newer than the one given
    up (the target's, or anyone's), or ``timeout`` seconds pass (the target
    never took it: the lease expired to someone else, or Redis was down).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.moving: dict[str, Transit] = {}

    def gave(self, name: str, target: str, token: int, now: float) -> None:
        self.moving[name] = Transit(target, token, now)

    def settle(self, others: Mapping[str, Announcement], now: float) -> None:
        """Forget the moves a heartbeat confirmed (a newer term of the Stoker) or that timed out."""
        newest: dict[str, int] = {}
        for announced in others.values():
            for name, token in announced.leads.items():
                newest[name] = max(token, newest.get(name, 0))
        for name, move in list(self.moving.items()):
            if newest.get(name, 0) > move.token or now - move.since > self.timeout:
                del self.moving[name]

    def held(self) -> set[str]:
        """The targets of moves not yet confirmed."""
        return {move.target for move in self.moving.values()}

    def announced(self) -> dict[str, tuple[str, int]]:
        return {name: (move.target, move.token) for name, move in self.moving.items()}
