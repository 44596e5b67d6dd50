"""The ownership store: records, rules and the backend interface (DESIGN §3).

Every backend (SQLite, etcd v3) keeps the same kinds of record and the same guarantees,
so agents and tests never care which one runs:

- a guest IP has at most one owner; every change of its record is a compare-and-swap on
  its epoch, and a successful change raises the epoch by exactly one (a fencing token);
- a node's public address has one holder at a time (its node, or a survivor that adopted
  it in a failover), changed by the same compare-and-swap on its own epoch, so a node that
  comes back after a partition is fenced until an operator fails it back;
- a node is alive while its lease is: granted with a TTL, renewed by heartbeats, expired
  when they stop (etcd: a real lease; SQLite: an expiry time read against the clock);
- a guest has at most one active migration, whose phase moves only along ``NEXT``;
- every change gets a revision; ``watch(after=R)`` yields the changes after R in order,
  and a watcher resumes by passing the last revision it saw (etcd's watch semantics:
  all changes of one write transaction share one revision).

Records are frozen dataclasses; ``to_dict``/``from_dict`` give the one JSON shape both
the change log and a key-value backend store.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import AddressValueError, IPv4Address
from types import TracebackType
from typing import Any, Literal, Self

from orchestrator.errors import StoreError

Address = IPv4Address | str
Kind = Literal["ownership", "node", "migration", "public"]


class Phase(StrEnum):
    PREPARE = "prepare"
    PRECOPY = "precopy"
    CUTOVER = "cutover"
    FINALIZE = "finalize"
    ABORT = "abort"
    DONE = "done"
    ABORTED = "aborted"


TERMINAL = frozenset({Phase.DONE, Phase.ABORTED})
# after finalize the guest runs on the destination: there is nothing left to abort
ABORTABLE = frozenset({Phase.PREPARE, Phase.PRECOPY, Phase.CUTOVER})
NEXT: Mapping[Phase, frozenset[Phase]] = {
    Phase.PREPARE: frozenset({Phase.PRECOPY, Phase.ABORT}),
    Phase.PRECOPY: frozenset({Phase.CUTOVER, Phase.ABORT}),
    Phase.CUTOVER: frozenset({Phase.FINALIZE, Phase.ABORT}),
    Phase.FINALIZE: frozenset({Phase.DONE}),
    Phase.ABORT: frozenset({Phase.ABORTED}),
    Phase.DONE: frozenset(),
    Phase.ABORTED: frozenset(),
}


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ownership:
    """Who owns a guest IP. ``node is None``: released (the epoch lives on, so a later
    claim still needs the current epoch and fencing tokens never go backwards)."""

    ip: IPv4Address
    node: str | None
    guest: str
    epoch: int
    since: float


@dataclass(frozen=True)
class NodeRecord:
    name: str
    tag: int
    mac_prefix: str
    pub_ip: IPv4Address
    heartbeat: float


@dataclass(frozen=True)
class MigrationRecord:
    """One migration of one guest. ``epoch_before`` holds each address's epoch when the
    migration was created: the expected epochs of the cutover claim."""

    id: str
    guest: str
    addresses: tuple[IPv4Address, ...]
    src: str
    dst: str
    phase: Phase
    started: float
    updated: float
    epoch_before: dict[IPv4Address, int] = field(default_factory=dict)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # phase -> milliseconds

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL


@dataclass(frozen=True)
class PublicAddress:
    """A node's public address and who answers for it. ``holder != node``: a survivor
    adopted it (failover); ``node`` must not take it back until a failback."""

    node: str
    ip: IPv4Address
    holder: str
    epoch: int
    since: float

    @property
    def adopted(self) -> bool:
        return self.holder != self.node


@dataclass(frozen=True)
class Liveness:
    """A node's liveness lease. ``ttl`` 0: never granted. ``remaining``: seconds before it
    expires without another heartbeat (0 once dead)."""

    node: str
    alive: bool
    ttl: float
    remaining: float


Record = Ownership | NodeRecord | MigrationRecord | PublicAddress


@dataclass(frozen=True)
class AuditAnchor:
    """The head of a node's audit chain as its agent last wrote it: kept outside the log,
    so a deleted tail or a rewritten chain shows against it (``audit verify``). Not a
    change: watchers never see it."""

    node: str
    path: str  # the chain's live file, absolute
    seq: int
    hash: str
    time: float


def anchor_advances(old: AuditAnchor | None, new: AuditAnchor) -> bool:
    """An anchor only moves forward along its chain: a restarted agent on a cut log must
    not hide the cut by anchoring the shorter head. Another file starts afresh."""
    return old is None or old.path != new.path or new.seq > old.seq


@dataclass(frozen=True)
class Change:
    """One changed record. ``record is None``: the key was deleted."""

    revision: int
    kind: Kind
    key: str
    record: Record | None


@dataclass(frozen=True)
class Snapshot:
    """A consistent view: list it, then ``watch(after=snapshot.revision)``."""

    revision: int
    ownership: tuple[Ownership, ...]
    nodes: tuple[NodeRecord, ...]
    migrations: tuple[MigrationRecord, ...]  # active ones
    public: tuple[PublicAddress, ...] = ()


# --- errors -------------------------------------------------------------------------


class EpochConflict(StoreError):
    """A compare-and-swap saw a different epoch: someone else changed the address."""

    def __init__(self, expected: Mapping[IPv4Address, int],
                 current: Mapping[IPv4Address, Ownership | None]) -> None:
        self.expected = dict(expected)
        self.current = dict(current)
        parts = [f"{ip} expected epoch {self.expected[ip]}, {describe(self.current.get(ip))}"
                 for ip in sorted(self.stale)]
        super().__init__("stale epoch: " + "; ".join(parts))

    @property
    def stale(self) -> list[IPv4Address]:
        return [ip for ip, e in self.expected.items() if epoch_of(self.current.get(ip)) != e]


class PublicConflict(StoreError):
    """A public-address swap saw another epoch: someone else adopted or gave it back."""


class PhaseConflict(StoreError):
    """A phase change expected another current phase."""


class Compacted(StoreError):
    """The changes after the requested revision are no longer kept: relist, then watch."""


def describe(own: Ownership | None) -> str:
    if own is None:
        return "it was never claimed (epoch 0)"
    if own.node is None:
        return f"it is released at epoch {own.epoch} (last guest {own.guest})"
    return f"it is owned by {own.node} (guest {own.guest}) at epoch {own.epoch}"


# --- rules shared by backends -------------------------------------------------------


def epoch_of(own: Ownership | None) -> int:
    return own.epoch if own else 0


def to_ip(value: Address) -> IPv4Address:
    try:
        return IPv4Address(value)
    except (AddressValueError, ValueError):
        raise StoreError(f"not an IPv4 address: {value!r}") from None


def expected_epochs(expected: Mapping[Address, int]) -> dict[IPv4Address, int]:
    out = {to_ip(a): e for a, e in expected.items()}
    if not out:
        raise StoreError("no addresses given")
    if len(out) != len(expected):
        raise StoreError(f"an address is listed twice: {sorted(map(str, expected))}")
    if any(e < 0 for e in out.values()):
        raise StoreError(f"epochs start at 0: {out}")
    return out


def check_epochs(expected: Mapping[IPv4Address, int],
                 current: Mapping[IPv4Address, Ownership | None]) -> None:
    """All or nothing: one stale address fails the whole claim."""
    if any(epoch_of(current.get(ip)) != epoch for ip, epoch in expected.items()):
        raise EpochConflict(expected, current)


def check_public(node: str, ip: IPv4Address, holder: str, expected: int,
                 current: PublicAddress | None, known: set[str]) -> None:
    """The rules of a public-address swap (all of them: there is no no-op swap)."""
    check_known_nodes(known, node, holder)
    if current is not None and current.ip != ip:
        raise StoreError(f"public address of {node} is {current.ip}, not {ip}")
    have = current.epoch if current else 0
    if have != expected:
        held = f"held by {current.holder} at epoch {have}" if current else "never claimed"
        raise PublicConflict(f"public address {ip} of {node}: expected epoch {expected}, "
                             f"it is {held}")


def to_phase(value: Phase | str) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise StoreError(f"unknown phase {value!r}; phases: {', '.join(Phase)}") from None


def check_advance(mig: MigrationRecord, expected: Phase, to: Phase) -> bool:
    """True if the phase must change; False if it already is ``to`` (idempotent)."""
    if mig.phase == to:
        return False
    if mig.phase != expected:
        raise PhaseConflict(f"migration {mig.id} of {mig.guest}: expected phase {expected}, "
                            f"it is in {mig.phase}")
    if to not in NEXT[mig.phase]:
        allowed = ", ".join(sorted(NEXT[mig.phase])) or "nothing (finished)"
        raise PhaseConflict(f"migration {mig.id} of {mig.guest}: cannot go from {mig.phase} "
                            f"to {to}; allowed: {allowed}")
    return True


def finish_target(mig: MigrationRecord) -> Phase:
    """finalize ends as done, abort as aborted; a finished migration stays as it is."""
    if mig.phase in TERMINAL:
        return mig.phase
    if mig.phase == Phase.FINALIZE:
        return Phase.DONE
    if mig.phase == Phase.ABORT:
        return Phase.ABORTED
    raise PhaseConflict(f"migration {mig.id} of {mig.guest} is in {mig.phase}: only finalize "
                        "or abort can finish")


def check_migration_start(guest: str, src: str, dst: str, active: Iterable[MigrationRecord],
                          known_nodes: set[str],
                          owners: Mapping[IPv4Address, Ownership | None]) -> None:
    if src == dst:
        raise StoreError(f"migration of {guest}: source and destination are both {src}")
    running = next(iter(active), None)
    if running is not None:
        raise StoreError(f"guest {guest} already has an active migration {running.id} "
                         f"({running.src} -> {running.dst}, phase {running.phase})")
    check_known_nodes(known_nodes, src, dst)
    for ip, own in owners.items():
        if own is not None and own.node is not None and (own.node, own.guest) != (src, guest):
            raise StoreError(f"migration of {guest} from {src}: {ip} {describe(own)}")


def guest_after(ip: IPv4Address, old: Ownership | None, guest: str | None) -> str:
    """A claim names the guest; a release keeps the last one on the record."""
    if guest is not None:
        return guest
    if old is None:
        raise StoreError(f"cannot release {ip}: it was never claimed")
    return old.guest


def same_migration(old: MigrationRecord, guest: str, ips: tuple[IPv4Address, ...],
                   src: str, dst: str) -> MigrationRecord:
    """Creating a migration again with its id: the same one, or a clear refusal."""
    if (old.guest, old.addresses, old.src, old.dst) != (guest, ips, src, dst):
        raise StoreError(f"migration id {old.id} is already used by {old.guest} "
                         f"({old.src} -> {old.dst})")
    return old


def check_known_nodes(known: set[str], *names: str) -> None:
    """Before any node registers, everything goes (tests, first boot); after, no typos."""
    unknown = [n for n in names if known and n not in known]
    if unknown:
        raise StoreError(f"unknown node {unknown[0]!r}; known: {', '.join(sorted(known))}")


# --- one JSON shape for every backend -----------------------------------------------


def to_dict(rec: Record) -> dict[str, Any]:
    if isinstance(rec, Ownership):
        return {"ip": str(rec.ip), "node": rec.node, "guest": rec.guest, "epoch": rec.epoch,
                "since": rec.since}
    if isinstance(rec, PublicAddress):
        return {"node": rec.node, "ip": str(rec.ip), "holder": rec.holder, "epoch": rec.epoch,
                "since": rec.since}
    if isinstance(rec, NodeRecord):
        return {"name": rec.name, "tag": rec.tag, "mac_prefix": rec.mac_prefix,
                "pub_ip": str(rec.pub_ip), "heartbeat": rec.heartbeat}
    return {"id": rec.id, "guest": rec.guest, "addresses": [str(a) for a in rec.addresses],
            "src": rec.src, "dst": rec.dst, "phase": rec.phase.value, "started": rec.started,
            "updated": rec.updated,
            "epoch_before": {str(k): v for k, v in rec.epoch_before.items()},
            "error": rec.error, "timings": dict(rec.timings)}


def from_dict(kind: Kind, d: Mapping[str, Any]) -> Record:
    if kind == "ownership":
        return Ownership(IPv4Address(d["ip"]), d["node"], d["guest"], d["epoch"], d["since"])
    if kind == "public":
        return PublicAddress(d["node"], IPv4Address(d["ip"]), d["holder"], d["epoch"],
                             d["since"])
    if kind == "node":
        return NodeRecord(d["name"], d["tag"], d["mac_prefix"], IPv4Address(d["pub_ip"]),
                          d["heartbeat"])
    return MigrationRecord(
        id=d["id"], guest=d["guest"], addresses=tuple(IPv4Address(a) for a in d["addresses"]),
        src=d["src"], dst=d["dst"], phase=Phase(d["phase"]), started=d["started"],
        updated=d["updated"],
        epoch_before={IPv4Address(k): v for k, v in d["epoch_before"].items()},
        error=d["error"], timings=dict(d["timings"]))


# --- the interface ------------------------------------------------------------------


class Store(abc.ABC):
    """Async: the agent is asyncio. Reads return None for a missing key; writes raise
    StoreError (or a subclass) with a message naming what is in the way."""

    # ownership
    @abc.abstractmethod
    async def get_ownership(self, ip: Address) -> Ownership | None: ...

    @abc.abstractmethod
    async def list_ownership(self, *, node: str | None = None, guest: str | None = None,
                             include_released: bool = False) -> list[Ownership]: ...

    @abc.abstractmethod
    async def claim_all(self, expected: Mapping[Address, int], node: str,
                        guest: str) -> list[Ownership]:
        """Give every address to ``node`` if each is still at its expected epoch (0 if
        never claimed); all or nothing. Returns the new records sorted by address."""

    @abc.abstractmethod
    async def release_all(self, expected: Mapping[Address, int]) -> list[Ownership]:
        """Leave the addresses unowned, under the same compare-and-swap as a claim."""

    async def release_each(self, groups: Sequence[Mapping[Address, int]]
                           ) -> list[list[Ownership] | StoreError]:
        """Many independent releases (a failover releasing a dead node's guests): each
        group all or nothing, as ``release_all``; one group's conflict never stops the
        others. Per group: its new records, or the error. Backends batch them."""
        out: list[list[Ownership] | StoreError] = []
        for group in groups:
            try:
                out.append(await self.release_all(group))
            except StoreError as exc:
                out.append(exc)
        return out

    async def claim(self, ip: Address, node: str, guest: str, expected_epoch: int) -> Ownership:
        return (await self.claim_all({ip: expected_epoch}, node, guest))[0]

    async def release(self, ip: Address, expected_epoch: int) -> Ownership:
        return (await self.release_all({ip: expected_epoch}))[0]

    # nodes
    @abc.abstractmethod
    async def upsert_node(self, name: str, tag: int, mac_prefix: str,
                          pub_ip: Address) -> NodeRecord:
        """Create or update; also a heartbeat. Tags are unique across nodes."""

    @abc.abstractmethod
    async def heartbeat(self, name: str) -> NodeRecord:
        """Liveness only: renews the node's lease if it has one (granting a new one with
        the last TTL if it expired); not a change, watchers see nothing."""

    @abc.abstractmethod
    async def get_node(self, name: str) -> NodeRecord | None: ...

    @abc.abstractmethod
    async def list_nodes(self) -> list[NodeRecord]: ...

    # liveness
    @abc.abstractmethod
    async def grant_lease(self, name: str, ttl: float) -> Liveness:
        """Make ``name`` alive for ``ttl`` seconds from now; heartbeats keep it so."""

    @abc.abstractmethod
    async def revoke_lease(self, name: str) -> None:
        """Dead at once (a clean stop); a no-op without a lease."""

    @abc.abstractmethod
    async def list_liveness(self) -> list[Liveness]:
        """Every registered node's lease (``ttl`` 0 for a node that never had one)."""

    async def liveness(self, name: str) -> Liveness:
        for live in await self.list_liveness():
            if live.node == name:
                return live
        return Liveness(name, False, 0.0, 0.0)

    # public addresses
    @abc.abstractmethod
    async def get_public(self, node: str) -> PublicAddress | None: ...

    @abc.abstractmethod
    async def list_public(self) -> list[PublicAddress]: ...

    @abc.abstractmethod
    async def claim_public(self, node: str, ip: Address, holder: str,
                           expected_epoch: int) -> PublicAddress:
        """Give ``node``'s public address to ``holder`` if it is still at
        ``expected_epoch`` (0: never claimed); the epoch goes up by one. Adoption by a
        survivor and failback are both this swap."""

    # migrations
    @abc.abstractmethod
    async def create_migration(self, guest: str, addresses: Iterable[Address], src: str,
                               dst: str, *, id: str | None = None) -> MigrationRecord:
        """Start in phase prepare, recording each address's current epoch. Refused when
        the guest already migrates, a node is unknown, or another node owns an address.
        Creating again with the same ``id`` and arguments returns the existing record."""

    @abc.abstractmethod
    async def get_migration(self, id: str) -> MigrationRecord | None: ...

    @abc.abstractmethod
    async def list_migrations(self, *, active: bool = True,
                              guest: str | None = None) -> list[MigrationRecord]: ...

    @abc.abstractmethod
    async def advance_phase(self, id: str, expected: Phase, to: Phase) -> MigrationRecord:
        """Compare-and-swap on the phase; already in ``to`` is a no-op success."""

    @abc.abstractmethod
    async def record_timing(self, id: str, phase: Phase, ms: float) -> MigrationRecord: ...

    @abc.abstractmethod
    async def abort_migration(self, id: str, error: str) -> MigrationRecord:
        """Move to abort from any abortable phase; no-op once abort or aborted."""

    @abc.abstractmethod
    async def finish_migration(self, id: str) -> MigrationRecord:
        """finalize -> done, abort -> aborted; no-op once finished."""

    # audit anchors
    @abc.abstractmethod
    async def anchor_audit(self, anchor: AuditAnchor) -> AuditAnchor:
        """Note ``anchor`` as its node's audit head if it advances (``anchor_advances``);
        returns the anchor held afterwards (a newer one than ours: the log lost lines)."""

    @abc.abstractmethod
    async def list_audit_anchors(self) -> list[AuditAnchor]: ...

    # changes
    @abc.abstractmethod
    async def revision(self) -> int: ...

    @abc.abstractmethod
    async def snapshot(self) -> Snapshot: ...

    @abc.abstractmethod
    def watch(self, after: int = 0) -> AsyncGenerator[Change, None]:
        """Changes with a revision above ``after``, in order, forever; close it with
        ``contextlib.aclosing``. Raises Compacted when they are no longer kept."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget the changes up to ``revision``; watches from before it raise Compacted."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
