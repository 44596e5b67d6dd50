"""The pure event table (orchestrator.agent.events), exhaustively.

A small model of what the agent's operations do to the store (ownership, the migration in
flight, the newest finished one, what each node's intake has seen) runs the table's
decisions: every event kind on every node in every role, delivered twice, and whole
scenarios in every order, must end in the same store state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest

from orchestrator.agent.events import (
    Decision,
    GuestFacts,
    MigrationFacts,
    OpName,
    Outcome,
    Role,
    decide,
    event_migration_id,
    reported_at,
)
from orchestrator.hypervisor import EventKind, GuestEvent
from orchestrator.store.base import MigrationRecord, Phase

NODES = ("n1", "n2", "n3")
G = "guest1"


@dataclass(frozen=True)
class Mig:
    id: str
    src: str
    dst: str
    phase: Phase
    reported: float

    def facts(self) -> MigrationFacts:
        return MigrationFacts(self.id, self.src, self.dst, self.phase, self.reported)


@dataclass(frozen=True)
class State:
    """The store as the table sees it, plus each node's newest event taken."""

    owner: str | None = "n1"
    active: Mig | None = None
    latest: Mig | None = None
    seen: tuple[tuple[str, float], ...] = ()
    closed: frozenset[str] = frozenset()  # source parts closed (not in the store)

    def seen_at(self, node: str) -> float:
        return dict(self.seen).get(node, 0.0)

    def facts(self, node: str) -> GuestFacts:
        known = max([self.seen_at(node)] + [m.reported for m in (self.active, self.latest)
                                            if m is not None])
        return GuestFacts(node, owner=self.owner,
                          active=self.active.facts() if self.active else None,
                          latest=self.latest.facts() if self.latest else None, known_at=known)

    def store(self) -> tuple[object, ...]:
        """What must agree at the end: who owns it, and what is in flight (ids aside)."""
        a = self.active
        return (self.owner, None if a is None else (a.src, a.dst, a.phase))


def ev(kind: EventKind, node: str, at: float, peer: str | None = None) -> GuestEvent:
    return GuestEvent(kind, G, node, "test", at, peer=peer, id=f"{kind}-{node}-{at}")


class Refused(Exception):
    """The agent would refuse this operation: the table must never ask for it."""


def run_op(s: State, node: str, name: OpName, args: dict) -> State:
    a = s.active
    if name == OpName.PREPARE:
        if a is not None or s.owner != args["src"] or args["src"] == node:
            raise Refused(f"prepare from {args['src']} with {s}")
        rep = int(args["id"][1:].split("-")[0], 16) / 1e6
        return replace(s, active=Mig(args["id"], args["src"], node, Phase.PRECOPY, rep))
    if name == OpName.RESUMED:
        if a is None or a.dst != node or a.phase not in (Phase.PREPARE, Phase.PRECOPY):
            raise Refused(f"resumed with {s}")
        return replace(s, owner=node, active=None, latest=replace(a, phase=Phase.DONE))
    if name == OpName.ABORT:
        if a is None or a.dst != node or a.phase == Phase.FINALIZE:
            raise Refused(f"abort with {s}")
        return replace(s, active=None, latest=replace(a, phase=Phase.ABORTED))
    if name == OpName.FINALIZE:
        mig = a if a is not None and a.src == node else s.latest
        if mig is None or mig.src != node:
            raise Refused(f"finalize with {s}")
        return replace(s, closed=s.closed | {mig.id})
    if name == OpName.STARTED:
        if s.owner not in (None, node) or (a is not None and a.dst != node):
            raise Refused(f"started with {s}")
        return replace(s, owner=node)
    if name == OpName.STOPPED:
        if s.owner != node or a is not None:
            raise Refused(f"stopped with {s}")
        return replace(s, owner=None)
    raise AssertionError(name)


def deliver(s: State, e: GuestEvent) -> tuple[State, Decision]:
    d = decide(e, s.facts(e.node))
    for op in d.ops:
        s = run_op(s, e.node, op.name, dict(op.args))
    seen = dict(s.seen)
    seen[e.node] = max(seen.get(e.node, 0.0), e.at)
    return replace(s, seen=tuple(sorted(seen.items()))), d


# --- every event on every node in every state -------------------------------------------

T0 = 100.0


def migs(phases: tuple[Phase, ...], at: float) -> list[Mig | None]:
    out: list[Mig | None] = [None]
    for src, dst in itertools.permutations(NODES, 2):
        out += [Mig(f"m-{src}-{dst}-{p}", src, dst, p, at) for p in phases]
    return out


ACTIVE = migs((Phase.PREPARE, Phase.PRECOPY, Phase.CUTOVER, Phase.FINALIZE, Phase.ABORT), T0)
LATEST = migs((Phase.DONE, Phase.ABORTED), T0 - 50)


def consistent(owner: str | None, active: Mig | None) -> bool:
    # before its cutover a migration's source owns the guest; after it, its destination
    if active is None:
        return True
    if active.phase in (Phase.PREPARE, Phase.PRECOPY, Phase.ABORT):
        return owner == active.src
    return owner in (active.src, active.dst)


STATES = [State(o, a, la) for o in (*NODES, None) for a in ACTIVE for la in LATEST
          if consistent(o, a)]
CASES = [(s, n, k, p) for s in STATES for n in NODES for k in EventKind
         for p in (None, "n1")]


def test_the_table_sees_every_role():
    roles = {s.facts(n).role for s in STATES for n in NODES}
    assert roles == set(Role)
    assert len(CASES) > 20_000


@pytest.mark.parametrize("kind", list(EventKind))
def test_every_event_in_every_role_is_total_idempotent_and_valid(kind):
    outcomes: set[Outcome] = set()
    for s, node, k, peer in CASES:
        if k != kind:
            continue
        e = ev(k, node, T0 + 10, peer)
        once, d = deliver(s, e)  # Refused: the table asked for an op the agent refuses
        outcomes.add(d.outcome)
        twice, d2 = deliver(once, e)
        assert twice == once, (s, node, k, d, d2)
        assert d2.outcome == Outcome.IGNORE and not d2.ops
        if d.outcome != Outcome.APPLY:
            assert not d.ops and once.store() == s.store() and once.closed == s.closed
        assert consistent(once.owner, once.active), (s, node, k, d)
        # history (older than the newest event this node took) changes nothing
        known = replace(s, seen=((node, T0 - 40),))
        old = ev(k, node, T0 - 60, peer)
        stale, ds = deliver(known, old)
        assert ds.outcome == Outcome.IGNORE and stale.store() == s.store(), (s, old, ds)
    assert Outcome.APPLY in outcomes


def test_an_unknown_guest_and_a_split_owner_are_reported_never_acted_on():
    for kind in EventKind:
        d = decide(ev(kind, "n2", 1.0), GuestFacts("n2", known=False))
        assert d.outcome == Outcome.REPORT and "unknown guest" in d.reason and not d.ops
        assert d.veto  # refused where the hypervisor waits for a verdict (migrate begin)
        d = decide(ev(kind, "n2", 1.0), GuestFacts("n2", owner="n1", split=("n1", "n3")))
        assert d.outcome == Outcome.REPORT and d.veto
    d = decide(ev(EventKind.INCOMING, "n2", 1.0), GuestFacts("n3", owner="n1"))
    assert d.outcome == Outcome.REPORT and "delivered to n3" in d.reason


# --- the table's own answers, spelled out ------------------------------------------------

def one(state: State, kind: EventKind, node: str, peer: str | None = None) -> Decision:
    return decide(ev(kind, node, T0 + 10, peer), state.facts(node))


def test_what_a_plain_migration_means_on_each_node():
    idle = State("n1")
    assert one(idle, EventKind.INCOMING, "n2").names == ("migration.prepare",)
    assert one(idle, EventKind.INCOMING, "n2").ops[0].args["src"] == "n1"
    arriving = State("n1", Mig("m1", "n1", "n2", Phase.PRECOPY, T0))
    assert arriving.facts("n2").role == Role.DESTINATION
    assert arriving.facts("n1").role == Role.SOURCE
    assert arriving.facts("n3").role == Role.BYSTANDER
    assert one(arriving, EventKind.RESUMED, "n2").names == ("migration.resumed",)
    assert one(arriving, EventKind.FAILED, "n2").names == ("migration.abort",)
    assert one(arriving, EventKind.STOPPED, "n2").names == ("migration.abort",)
    assert one(arriving, EventKind.GONE, "n1").ops[0].args["how"] == "gone"
    assert one(arriving, EventKind.STOPPED, "n1").ops[0].args["how"] == "stopped"
    assert one(arriving, EventKind.INCOMING, "n3").veto  # libvirt's begin hook says no
    done = State("n2", latest=Mig("m1", "n1", "n2", Phase.DONE, T0))
    assert one(done, EventKind.GONE, "n1").names == ("migration.finalize",)
    assert one(done, EventKind.STOPPED, "n1").names == ("migration.finalize",)
    assert one(done, EventKind.STOPPED, "n2").names == ("guest.stopped",)


def test_a_resume_without_a_prepared_migration_still_hands_over_and_claims():
    d = one(State("n1"), EventKind.RESUMED, "n2")
    assert d.names == ("migration.prepare", "migration.resumed")
    assert one(State(None), EventKind.RESUMED, "n2").names == ("guest.started",)


def test_conflicts_are_reported():
    assert one(State("n1"), EventKind.STARTED, "n2").outcome == Outcome.REPORT
    assert one(State("n1"), EventKind.INCOMING, "n2", peer="n3").outcome == Outcome.REPORT
    assert one(State("n1"), EventKind.GONE, "n1").outcome == Outcome.REPORT
    assert one(State("n1"), EventKind.INCOMING, "n1").veto


# --- whole scenarios, in every order, each event delivered twice -------------------------

def run(events: list[GuestEvent], start: State) -> State:
    s = start
    for e in events:
        s, _ = deliver(s, e)
    return s


def every_order(events: list[GuestEvent], start: State, want: tuple[object, ...],
                truth: str | None = None) -> int:
    """Every permutation, with every event repeated right away or at the end: the same
    store state each time. ``truth``: then the agent's truth pass on that node (the guest
    runs there: a fresh resume) settles what a delivery order against causality left."""
    n = 0
    for order in itertools.permutations(events):
        for doubled in (list(order) + list(order), [x for e in order for x in (e, e)]):
            end = run(doubled, start)
            if truth is not None:
                end = run([ev(EventKind.RESUMED, truth, 1000.0)], end)
            assert end.store() == want, ([f"{e.kind}@{e.node}" for e in doubled], end)
            n += 1
    return n


def test_a_migration_in_any_order_ends_on_the_destination():
    for gone in (EventKind.GONE, EventKind.STOPPED):
        events = [ev(EventKind.INCOMING, "n2", 1), ev(EventKind.RESUMED, "n2", 2),
                  ev(gone, "n1", 3)]
        assert every_order(events, State("n1"), ("n2", None)) == 12


def test_a_failed_migration_in_any_order_stays_on_the_source():
    events = [ev(EventKind.INCOMING, "n2", 1), ev(EventKind.FAILED, "n2", 2)]
    every_order(events, State("n1"), ("n1", None))
    events = [ev(EventKind.INCOMING, "n2", 1), ev(EventKind.STOPPED, "n2", 2)]
    every_order(events, State("n1"), ("n1", None))


def test_a_start_and_a_stop_in_any_order():
    events = [ev(EventKind.STARTED, "n1", 1), ev(EventKind.STOPPED, "n1", 2)]
    every_order(events, State(None), (None, None))
    events = [ev(EventKind.STOPPED, "n1", 1), ev(EventKind.STARTED, "n1", 2)]
    every_order(events, State("n1"), ("n1", None))


TOUR = [ev(EventKind.INCOMING, "n2", 1), ev(EventKind.RESUMED, "n2", 2),
        ev(EventKind.GONE, "n1", 3), ev(EventKind.INCOMING, "n3", 4),
        ev(EventKind.RESUMED, "n3", 5), ev(EventKind.GONE, "n2", 6)]


def test_a_tour_in_causal_order_per_guest_ends_where_it_last_resumed():
    """Deliveries race across nodes, but each node hears its own events in order, and n3
    cannot hear of its resume before n2 heard of its own (the guest left n2 for n3 after
    it): every interleaving that keeps that."""
    n = 0
    for order in itertools.permutations(TOUR):
        pos = {(e.kind, e.node): i for i, e in enumerate(order)}
        if pos[(EventKind.RESUMED, "n2")] > pos[(EventKind.RESUMED, "n3")]:
            continue
        if any(pos[(a.kind, a.node)] > pos[(b.kind, b.node)]  # each node hears in order
               for a, b in itertools.combinations(TOUR, 2) if a.node == b.node):
            continue
        for doubled in (list(order) + list(order), [x for e in order for x in (e, e)]):
            assert run(doubled, State("n1")).store() == ("n3", None), order
            n += 1
    assert n == 2 * 42  # of the 60 interleavings that keep each node's order


def test_a_tour_in_any_order_at_all_ends_where_the_guest_runs_after_a_truth_pass():
    assert every_order(TOUR, State("n1"), ("n3", None), truth="n3") == 2 * 720


# --- the ids that carry their report time -----------------------------------------------

def test_a_migration_id_carries_when_it_was_reported():
    e = ev(EventKind.INCOMING, "n2", 1_700_000_000.123456)
    mid = event_migration_id(e)
    assert mid == event_migration_id(e)  # the same event: the same migration
    assert mid != event_migration_id(replace(e, id="other"))
    rec = MigrationRecord(mid, G, (), "n1", "n2", Phase.PREPARE, started=1_800_000_000.0,
                          updated=0.0)
    assert e.at <= reported_at(rec) < e.at + 1e-5  # never earlier than the event
    api = replace(rec, id="0123456789ab")
    assert reported_at(api) == api.started
