"""What one guest event means on this node: one pure table (DESIGN §5).

``decide(event, facts)`` maps a ``GuestEvent`` and what the store knows of the guest
(``GuestFacts``: this node's role, the owner, the migration in flight, the newest finished
one, how recent all that is) to the agent operations to run, or to "ignore" (a replay, a
moment that needs nothing) or "report" (an unknown guest, a conflict between what the
hypervisor says and what the store says: counted, in ``status`` and the audit log, never
acted on by guessing).

Three rules make replays and reordering harmless:
- every event is judged against the store's facts, so the same event on the same node in
  the same state always does the same thing, and a repeated one finds its work done;
- an event no newer than what is already known of the guest (``known_at``: the report
  time of its newest migration, the newest event this agent took for it and, for a spool
  replay, the ownership's ``since``) is history and changes nothing;
- a hypervisor's report of where the guest runs beats the store's plan: a resume here
  without a prepared migration still hands over (after the fact) and claims.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.hypervisor import EventKind, GuestEvent
from orchestrator.store.base import MigrationRecord, Phase

PRE_CUTOVER = frozenset({Phase.PREPARE, Phase.PRECOPY})


class Role(StrEnum):
    DESTINATION = "destination"  # a migration of the guest to this node is in flight
    SOURCE = "source"  # a migration of the guest from this node is in flight
    OWNER = "owner"  # this node owns the guest's addresses; nothing in flight
    BYSTANDER = "bystander"  # another node owns it, nobody does, or it moves elsewhere


class Outcome(StrEnum):
    APPLY = "apply"  # run ``ops``, in order
    IGNORE = "ignore"  # nothing to do: a replay, history, or a moment that needs nothing
    REPORT = "report"  # the event contradicts the store: counted and audited, not acted on


class OpName(StrEnum):
    PREPARE = "migration.prepare"
    RESUMED = "migration.resumed"
    FINALIZE = "migration.finalize"  # the source closes its part (the guest left it)
    ABORT = "migration.abort"
    STARTED = "guest.started"
    STOPPED = "guest.stopped"


@dataclass(frozen=True)
class Op:
    name: OpName
    args: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    ops: tuple[Op, ...] = ()
    veto: bool = False  # a hypervisor waiting for a verdict should be told no

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(op.name.value for op in self.ops)


@dataclass(frozen=True)
class MigrationFacts:
    id: str
    src: str
    dst: str
    phase: Phase
    reported: float  # when the hypervisor reported its start (else when it was created)

    @classmethod
    def of(cls, m: MigrationRecord) -> MigrationFacts:
        return cls(m.id, m.src, m.dst, m.phase, reported_at(m))


@dataclass(frozen=True)
class GuestFacts:
    """What the store and this agent know of one guest, as seen from ``node``."""

    node: str
    known: bool = True  # the guest resolves (the cluster file, or the hypervisor's metadata)
    owner: str | None = None  # the node owning its addresses (None: nobody)
    split: tuple[str, ...] = ()  # several nodes own some of its addresses: a conflict
    active: MigrationFacts | None = None
    latest: MigrationFacts | None = None  # the newest finished migration
    known_at: float = 0.0  # events at or before this are history

    @property
    def role(self) -> Role:
        a = self.active
        if a is not None and a.dst == self.node:
            return Role.DESTINATION
        if a is not None and a.src == self.node:
            return Role.SOURCE
        if a is None and self.owner == self.node:
            return Role.OWNER
        return Role.BYSTANDER


# --- migration ids that carry the moment they were reported -------------------------

_ID_PREFIX = "m"


def event_migration_id(event: GuestEvent) -> str:
    """The id of the migration an event prepares: time-ordered like a UUIDv7 (the report
    time in microseconds, rounded up) and derived from the event, so the same event
    delivered twice (spooled by a hook that gave up, and answered late) prepares the same
    migration, and later events can be told from earlier ones after a restart."""
    micros = int(event.at * 1_000_000) + 1
    digest = hashlib.sha256(f"{event.id}|{event.guest}|{event.at!r}".encode()).hexdigest()
    return f"{_ID_PREFIX}{micros:x}-{digest[:8]}"


def reported_at(m: MigrationRecord) -> float:
    """When the hypervisor reported ``m``'s start; its creation time for an id that does
    not carry one (prepared through the API)."""
    head, sep, _ = m.id.partition("-")
    if sep and head.startswith(_ID_PREFIX):
        try:
            return int(head[len(_ID_PREFIX):], 16) / 1_000_000
        except ValueError:
            pass
    return m.started


# --- the table -------------------------------------------------------------------------


def decide(event: GuestEvent, facts: GuestFacts) -> Decision:
    if event.node != facts.node:
        return _report(f"reported by {event.node} but delivered to {facts.node}")
    if not facts.known:
        # a destination waiting for a verdict (libvirt's migrate begin) refuses it: the
        # cluster cannot place a guest it knows no addresses of (issue 12)
        return _report(f"unknown guest {event.guest!r}: not in the cluster file and the "
                       "hypervisor gave no addresses", veto=True)
    if facts.split:
        return _report(f"its addresses are owned by several nodes ({', '.join(facts.split)})",
                       veto=True)
    if event.at <= facts.known_at:
        return _ignore(f"older than what is known of {event.guest} "
                       f"({event.at:.6f} <= {facts.known_at:.6f})")
    return _BY_KIND[event.kind](event, facts)


def _incoming(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None:
        if a.dst == f.node:
            return _ignore(f"already migrating here (migration {a.id})")
        return _report(f"incoming here while it migrates {a.src} -> {a.dst} "
                       f"(migration {a.id})", veto=True)
    if f.owner == f.node:
        return _report(f"incoming to {f.node}, which already owns it", veto=True)
    if f.owner is None:
        return _ignore("nobody owns it: nothing to hand over (its resume here claims it)")
    if ev.peer is not None and ev.peer != f.owner:
        return _report(f"the hypervisor says it comes from {ev.peer}, the store says "
                       f"{f.owner} owns it", veto=True)
    return _apply(f"arriving from {f.owner}", _op(OpName.PREPARE, ev, src=f.owner))


def _resumed(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None:
        if a.dst != f.node:
            return _report(f"resumed on {f.node} while it migrates {a.src} -> {a.dst} "
                           f"(migration {a.id})")
        if a.phase == Phase.ABORT:
            return _report(f"resumed here while migration {a.id} is being aborted")
        if a.phase not in PRE_CUTOVER:
            return _ignore(f"migration {a.id} is past its resume ({a.phase})")
        return _apply(f"resumed here: cutover of migration {a.id}", _op(OpName.RESUMED, ev))
    if f.owner == f.node:
        return _ignore(f"{f.node} already owns it")
    if f.owner is None:
        return _apply("resumed here and nobody owned it: claim", _op(OpName.STARTED, ev))
    return _apply(f"resumed here without a prepared migration: hand over from {f.owner} "
                  "after the fact", _op(OpName.PREPARE, ev, src=f.owner),
                  _op(OpName.RESUMED, ev))


def _gone(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None:
        if a.src == f.node:
            return _apply(f"left for {a.dst}: close the source's part of migration {a.id}",
                          _op(OpName.FINALIZE, ev, how="gone"))
        if a.dst == f.node and a.phase in PRE_CUTOVER:
            # it cannot resume here any more: whatever came of it, not this migration
            return _apply(f"left {f.node} before resuming here: abort migration {a.id}",
                          _op(OpName.ABORT, ev, reason=_why(ev, "left the destination "
                                                            "before it resumed")))
        if a.dst == f.node:
            return _report(f"left {f.node} during the cutover of migration {a.id}")
        return _report(f"left {f.node} while the store has it migrating {a.src} -> {a.dst}")
    if _left_here(f):
        return _apply("left after its migration finished: close the source's part",
                      _op(OpName.FINALIZE, ev, how="gone"))
    if f.owner == f.node:
        return _report(f"left {f.node}, but the store has no migration of it (its "
                       "destination's report will hand it over)")
    return _report(f"left {f.node}, where the store never placed it")


def _failed(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None and a.dst == f.node:
        if a.phase == Phase.ABORT:
            return _ignore(f"migration {a.id} is already being aborted")
        if a.phase == Phase.FINALIZE:
            return _report(f"failed after migration {a.id} cut over: it ran here")
        return _apply(f"the migration here failed: abort migration {a.id}",
                      _op(OpName.ABORT, ev, reason=_why(ev, "the hypervisor reported failure")))
    latest = f.latest
    if a is None and latest is not None and latest.dst == f.node \
            and latest.phase == Phase.ABORTED:
        return _ignore(f"migration {latest.id} here is already aborted")
    if a is None and f.owner == f.node:
        return _report(f"a migration to {f.node} failed, but {f.node} owns it")
    return _ignore(f"no migration to {f.node} to abort")


def _started(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None:
        if a.dst == f.node:
            return _ignore(f"part of migration {a.id} arriving here")
        return _report(f"started on {f.node} while it migrates {a.src} -> {a.dst}")
    if f.owner == f.node:
        return _ignore(f"{f.node} already owns it")
    if f.owner is None:
        return _apply("booted here: claim", _op(OpName.STARTED, ev))
    return _report(f"started on {f.node} while {f.owner} owns it")


def _stopped(ev: GuestEvent, f: GuestFacts) -> Decision:
    a = f.active
    if a is not None:
        if a.src == f.node:
            # a hook cannot tell "migrated away" from "destroyed" (LIBVIRT-XEN §3); the
            # migration's outcome can: done, it moved; aborted, it stopped here
            return _apply(f"stopped during migration {a.id} away: its outcome decides",
                          _op(OpName.FINALIZE, ev, how="stopped"))
        if a.dst != f.node:
            return _ignore(f"migrates {a.src} -> {a.dst}: not {f.node}'s")
        if a.phase in PRE_CUTOVER:
            return _apply(f"stopped here before resuming: abort migration {a.id}",
                          _op(OpName.ABORT, ev, reason=_why(ev, "stopped on the destination "
                                                            "before it resumed")))
        if a.phase == Phase.ABORT:
            return _ignore(f"migration {a.id} is already being aborted")
        return _report(f"stopped here during the cutover of migration {a.id}")
    if _left_here(f) and f.owner != f.node:
        return _apply("stopped after its migration away finished: close the source's part",
                      _op(OpName.FINALIZE, ev, how="stopped"))
    if f.owner == f.node:
        return _apply("stopped here: release", _op(OpName.STOPPED, ev))
    return _ignore(f"{f.node} does not own it")


_BY_KIND: Mapping[EventKind, Callable[[GuestEvent, GuestFacts], Decision]] = {
    EventKind.INCOMING: _incoming,
    EventKind.RESUMED: _resumed,
    EventKind.GONE: _gone,
    EventKind.FAILED: _failed,
    EventKind.STARTED: _started,
    EventKind.STOPPED: _stopped,
}


def _left_here(f: GuestFacts) -> bool:
    return f.latest is not None and f.latest.src == f.node and f.latest.phase == Phase.DONE


def _op(name: OpName, ev: GuestEvent, **args: Any) -> Op:
    if name == OpName.PREPARE:
        args["id"] = event_migration_id(ev)
    return Op(name, {"guest": ev.guest, **args})


def _why(ev: GuestEvent, default: str) -> str:
    return f"{default} ({ev.origin}{': ' + ev.detail if ev.detail else ''})"


def _apply(reason: str, *ops: Op) -> Decision:
    return Decision(Outcome.APPLY, reason, ops)


def _ignore(reason: str) -> Decision:
    return Decision(Outcome.IGNORE, reason)


def _report(reason: str, veto: bool = False) -> Decision:
    return Decision(Outcome.REPORT, reason, veto=veto)
