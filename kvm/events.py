"""What libvirt tells a node, as the seam's ``GuestEvent`` (pure; LIBVIRT-XEN.md §2-3).

Two sources, both needed:

- the qemu hook (``NAME OP SUB -``, domain XML on stdin), synchronous: the only moment a
  destination can veto (``migrate begin``); but no hook fires on the destination when the
  migration completes, and the source's ``stopped end`` looks the same after a migration
  and after a destroy;
- domain lifecycle events: ``RESUMED/MIGRATED`` (or ``RESUMED/POSTCOPY``: post-copy runs
  the guest on the destination from its start, so that is the cutover) and
  ``STOPPED/MIGRATED`` on the source are the only signals of a migration's end.

Both map to the same few kinds; the agent's event table makes repeats harmless (the hook's
``started begin`` and the event ``STARTED/BOOTED`` both say "started").
"""

from __future__ import annotations

from enum import IntEnum

from orchestrator.hypervisor import EventKind, GuestEvent, HookCall

from .domxml import Domain, DomainXMLError, parse_domain

HOOK = "libvirt-qemu"
HOOK_ORIGIN = f"hook:{HOOK}"
EVENT_ORIGIN = "event:libvirt"


class Lifecycle(IntEnum):
    """virDomainEventType (libvirt's values; a contract test holds them to libvirt-python)."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


class Started(IntEnum):
    BOOTED = 0
    MIGRATED = 1
    RESTORED = 2
    FROM_SNAPSHOT = 3
    WAKEUP = 4


class Resumed(IntEnum):
    UNPAUSED = 0
    MIGRATED = 1
    FROM_SNAPSHOT = 2
    POSTCOPY = 3
    POSTCOPY_FAILED = 4


class Stopped(IntEnum):
    SHUTDOWN = 0
    DESTROYED = 1
    CRASHED = 2
    MIGRATED = 3
    SAVED = 4
    FAILED = 5
    FROM_SNAPSHOT = 6


# (event, detail) -> kind; every other pair means nothing to convergent
_LIFECYCLE: dict[tuple[int, int], EventKind] = {
    (Lifecycle.STARTED, Started.BOOTED): EventKind.STARTED,
    (Lifecycle.STARTED, Started.RESTORED): EventKind.STARTED,
    (Lifecycle.STARTED, Started.FROM_SNAPSHOT): EventKind.STARTED,
    # the destination's qemu is up and waits for memory (after migrate begin on D)
    (Lifecycle.STARTED, Started.MIGRATED): EventKind.INCOMING,
    (Lifecycle.RESUMED, Resumed.MIGRATED): EventKind.RESUMED,
    (Lifecycle.RESUMED, Resumed.POSTCOPY): EventKind.RESUMED,
    (Lifecycle.STOPPED, Stopped.MIGRATED): EventKind.GONE,
    (Lifecycle.STOPPED, Stopped.FAILED): EventKind.FAILED,
    (Lifecycle.STOPPED, Stopped.SHUTDOWN): EventKind.STOPPED,
    (Lifecycle.STOPPED, Stopped.DESTROYED): EventKind.STOPPED,
    (Lifecycle.STOPPED, Stopped.CRASHED): EventKind.STOPPED,
    (Lifecycle.STOPPED, Stopped.SAVED): EventKind.STOPPED,
    (Lifecycle.STOPPED, Stopped.FROM_SNAPSHOT): EventKind.STOPPED,
}

# (op, sub) of the qemu hook -> kind; the rest (prepare, start, release, reconnect,
# restore, attach) adds nothing the kinds do not say
_HOOK: dict[tuple[str, str], EventKind] = {
    ("migrate", "begin"): EventKind.INCOMING,
    ("started", "begin"): EventKind.STARTED,
    ("stopped", "end"): EventKind.STOPPED,
}
QEMU_OPS = frozenset({"start", "stopped", "prepare", "release", "migrate", "started",
                      "reconnect", "attach", "restore"})
QEMU_SUBOPS = frozenset({"begin", "end", "-"})


def lifecycle_name(event: int, detail: int) -> str:
    kinds = {Lifecycle.STARTED: Started, Lifecycle.RESUMED: Resumed,
             Lifecycle.STOPPED: Stopped}
    try:
        head = Lifecycle(event).name
    except ValueError:
        return f"{event}/{detail}"
    sub = kinds.get(Lifecycle(event))
    try:
        return f"{head}/{sub(detail).name}" if sub else f"{head}/{detail}"
    except ValueError:
        return f"{head}/{detail}"


def lifecycle_kind(event: int, detail: int) -> EventKind | None:
    return _LIFECYCLE.get((event, detail))


def from_lifecycle(node: str, guest: str, event: int, detail: int, at: float,
                   domain: Domain | None = None, id: str = "") -> GuestEvent | None:
    """A lifecycle event on ``node`` as a ``GuestEvent`` (None: nothing to act on).
    ``domain``: the guest's XML as the adapter read it, for its MACs and addresses."""
    kind = lifecycle_kind(event, detail)
    if kind is None:
        return None
    return GuestEvent(kind, guest, node, EVENT_ORIGIN, at,
                      macs=domain.macs if domain else (),
                      addresses=domain.addresses if domain else (),
                      uuid=domain.uuid if domain else None, id=id,
                      detail=lifecycle_name(event, detail))


def parse_hook(call: HookCall, node: str) -> GuestEvent | None:
    """One qemu hook call (``argv``: the hook's own path, then libvirt's four arguments)
    as a ``GuestEvent`` on ``node``. ``migrate begin`` wants a verdict: libvirt waits, and
    the hook vetoes the migration when the agent says deny. Raises ``ValueError`` naming
    what is wrong with a call that is not libvirt's."""
    args = list(call.argv[1:])
    if len(args) != 4:
        raise ValueError(f"{HOOK}: expected NAME OP SUBOP EXTRA after the hook's path, "
                         f"got {args}")
    name, op, sub, _extra = args
    if op not in QEMU_OPS or sub not in QEMU_SUBOPS:
        raise ValueError(f"{HOOK}: unknown operation {op!r} {sub!r} for {name!r}")
    kind = _HOOK.get((op, sub))
    if kind is None:
        return None
    domain = _domain(call, name)
    return GuestEvent(kind, name, node, HOOK_ORIGIN, call.at, macs=domain.macs,
                      addresses=domain.addresses, uuid=domain.uuid,
                      wants_verdict=kind is EventKind.INCOMING, id=call.id,
                      detail=f"{op} {sub}")


def _domain(call: HookCall, name: str) -> Domain:
    try:
        domain = parse_domain(call.stdin)
    except DomainXMLError as exc:
        raise ValueError(f"{HOOK}: {name}: {exc}") from None
    if domain.name != name:
        raise ValueError(f"{HOOK}: argv names {name!r} but the domain XML {domain.name!r}")
    return domain
