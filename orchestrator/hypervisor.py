"""The one interface every hypervisor adapter implements (DESIGN §5).

Real hypervisors move the guest themselves; the orchestrator only learns each moment, on
whichever node it happens, from a hook call or an event. So the interface is
event-driven:

- ``parse_hook(call)`` (pure): what one hook invocation means, as a ``GuestEvent`` or
  ``None`` (a call convergent does not act on). Hooks forward their raw call (argv, env,
  stdin, plus whatever only exists at hook time, such as xenstore values) to the agent,
  which parses it here, so recorded calls drive unit tests;
- ``events()``: an async stream of ``GuestEvent`` that reconnects by itself;
- ``describe(guest)``, ``running()``: what the hypervisor knows of guests here;
- ``migrate(guest, dst, progress)``: the operator's command.

The core never imports ``kvm/`` or ``xen/``: adapters are found through the
``convergent.hypervisors`` entry point group (os-vif style), built from their own settings
section (``[hypervisor]`` in the cluster file) and the node name.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib.metadata import entry_points
from ipaddress import IPv4Address
from typing import Any, ClassVar

from orchestrator.errors import ConvergentError


class EventKind(StrEnum):
    """The moments of a guest's life the agent acts on, as seen from the reporting node."""

    INCOMING = "incoming"  # a migration of the guest to this node begins
    RESUMED = "resumed"  # the guest now runs here, after a migration to this node
    GONE = "gone"  # the guest left this node by a migration that completed
    FAILED = "failed"  # a migration to this node failed; its copy here is gone
    STARTED = "started"  # the guest booted here (not a migration)
    STOPPED = "stopped"  # the guest stopped here (not known to be a migration)


@dataclass(frozen=True)
class HookCall:
    """One raw hook invocation, exactly as the hook saw it (JSON-safe)."""

    hook: str  # which hook: "libvirt-qemu", "xen-vif", "lab"
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)  # e.g. xenstore reads
    at: float = 0.0  # wall clock when the hook ran
    id: str = ""  # unique per call: spool file name, audit correlation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HookCall:
        """Raises ``ValueError`` on anything that is not a well-formed call."""
        try:
            argv = tuple(str(a) for a in d["argv"])
            env = {str(k): str(v) for k, v in dict(d.get("env") or {}).items()}
            extra = {str(k): str(v) for k, v in dict(d.get("extra") or {}).items()}
            return cls(str(d["hook"]), argv, env, str(d.get("stdin") or ""), extra,
                       float(d.get("at") or 0.0), str(d.get("id") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed hook call: {exc}") from None


@dataclass(frozen=True)
class GuestEvent:
    """One moment of a guest, reported by the node it happened on."""

    kind: EventKind
    guest: str  # the domain name, without libxl's --incoming/--migratedaway suffix
    node: str  # the reporting node
    origin: str  # "hook:libvirt-qemu", "event:libvirt", "hook:xen-vif", "lab", ...
    at: float  # wall clock of the moment (hook run or event receipt)
    peer: str | None = None  # the other end of a migration, when the hypervisor says
    macs: tuple[str, ...] = ()
    addresses: tuple[IPv4Address, ...] = ()  # from the guest's own metadata, if any
    uuid: str | None = None
    wants_verdict: bool = False  # the hypervisor waits: a "deny" vetoes (migrate begin)
    id: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        d["macs"] = list(self.macs)
        d["addresses"] = [str(a) for a in self.addresses]
        return d


@dataclass(frozen=True)
class GuestInfo:
    """What the hypervisor knows of a guest."""

    name: str
    macs: tuple[str, ...]
    addresses: tuple[IPv4Address, ...]  # empty: take them from the cluster file
    node: str | None  # where it runs now, if the adapter can tell
    uuid: str | None = None
    running: bool = True


@dataclass(frozen=True)
class Progress:
    """One step of ``migrate``, for the operator's progress line."""

    phase: str  # "starting", "memory", "paused", "resumed", "done", "aborted"
    detail: str = ""
    fraction: float | None = None  # 0..1 of the memory copy, when known


ProgressFn = Callable[[Progress], None]


class Hypervisor(abc.ABC):
    """One adapter per node. Adapters raise ``HypervisorError`` with one readable line."""

    kind: ClassVar[str] = "abstract"

    def __init__(self, settings: Mapping[str, Any], node: str) -> None:
        self.settings = dict(settings)
        self.node = node

    @abc.abstractmethod
    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        """Pure: what this hook call means on this node (None: nothing to act on).
        Raises ``ValueError`` for a call this adapter cannot read."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[GuestEvent]:
        """Lifecycle events on this node, for as long as the agent runs; reconnects by
        itself and, after a reconnect, reports what it may have missed."""

    @abc.abstractmethod
    async def describe(self, guest: str) -> GuestInfo:
        """Name, MACs, addresses and current node of a guest; raises if unknown here.
        A guest arriving here and not yet resumed: ``node`` is this node, ``running``
        False (a restarted agent keeps waiting for it rather than aborting)."""

    @abc.abstractmethod
    async def running(self) -> list[GuestInfo]:
        """The guests running on this node now (the truth a reconcile starts from)."""

    @abc.abstractmethod
    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        """Move a guest running here to ``dst``; raise ``HypervisorError`` on failure.
        The agents learn the moments from hooks and events, as for any migration.
        Cancelling the task (``convergent migrate --abort``) must cancel the hypervisor's
        job too, so the guest stays here."""

    async def close(self) -> None:
        return None


class HypervisorError(ConvergentError):
    pass


class NoopHypervisor(Hypervisor):
    """For nodes where convergent only NATs: no hooks, no events, no guests."""

    kind = "noop"

    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        return None

    async def events(self) -> AsyncIterator[GuestEvent]:
        return
        yield  # an async generator that never yields

    async def describe(self, guest: str) -> GuestInfo:
        raise HypervisorError(f"node {self.node} runs no hypervisor (kind noop): "
                              f"cannot describe {guest}")

    async def running(self) -> list[GuestInfo]:
        return []

    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        raise HypervisorError(f"node {self.node} runs no hypervisor (kind noop): "
                              f"cannot migrate {guest}")


def open_hypervisor(kind: str, settings: Mapping[str, Any], node: str) -> Hypervisor:
    """The adapter of ``kind`` for ``node``; its construction errors become one line."""
    cls = load_hypervisor(kind)
    try:
        return cls(settings, node)
    except ConvergentError:
        raise
    except Exception as exc:  # the facade wraps an adapter's surprise once, here
        raise HypervisorError(f"hypervisor {kind!r} on {node}: {type(exc).__name__}: "
                              f"{exc}") from exc


def load_hypervisor(kind: str) -> type[Hypervisor]:
    if kind == NoopHypervisor.kind:
        return NoopHypervisor
    found = entry_points(group="convergent.hypervisors")
    for ep in found:
        if ep.name == kind:
            cls: type[Hypervisor] = ep.load()
            return cls
    known = ", ".join(sorted({"noop", *(ep.name for ep in found)}))
    raise ConvergentError(f"unknown hypervisor {kind!r} (installed: {known})")
