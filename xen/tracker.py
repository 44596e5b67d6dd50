"""What the xenstore names of this node's domains say happened (pure).

libxl runs no hotplug script when a migrated domain starts on its destination: it renames
``NAME--incoming`` to ``NAME`` and unpauses it (tools/xl/xl_migrate.c). So the adapter
watches names: a domain seen as ``--incoming`` that is now ``NAME`` and running has
RESUMED here (renamed but still paused, as with ``xl migrate -p``, it has not yet: it is
checked again until it runs or goes); one seen as ``--incoming`` that disappears without
having resumed FAILED here (the hook says the same, or STOPPED when it was renamed first:
replays are harmless). A domain first seen with a plain name by the watch says nothing
(booted ones announce themselves through their vif script); one first seen by a rescan
(after the agent started, or missed by the watch) is asked whether it runs, and reported
RESUMED if so: it may have arrived while nobody watched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.hypervisor import EventKind

from .names import Phase, split_name


@dataclass(frozen=True)
class Moment:
    kind: EventKind
    guest: str
    domid: int
    detail: str


@dataclass
class _Dom:
    name: str
    phase: Phase
    arriving: bool  # it was seen as --incoming and has not resumed yet


@dataclass
class Tracker:
    doms: dict[int, _Dom] = field(default_factory=dict)

    def observe(self, domid: int, name: str | None, running: bool | None = None) -> list[Moment]:
        """``name`` None: the domain is gone. ``running``: the hypervisor's word, when
        known (None: not asked yet)."""
        old = self.doms.get(domid)
        if name is None:
            self.doms.pop(domid, None)
            if old is not None and old.arriving:
                guest = split_name(old.name)[0]
                return [Moment(EventKind.FAILED, guest, domid,
                               f"domain {domid} ({old.name}) went away before it resumed")]
            return []
        guest, phase = split_name(name)
        arriving = phase is Phase.INCOMING or (old is not None and old.arriving)
        dom = _Dom(name, phase, arriving)
        self.doms[domid] = dom
        if dom.arriving and phase is Phase.NONE and running:
            dom.arriving = False
            return [Moment(EventKind.RESUMED, guest, domid,
                           f"domain {domid} renamed from {guest}--incoming and running")]
        return []

    def found(self, domid: int, name: str) -> None:
        """A domain first seen on a rescan (the agent just started, or the watch missed
        it) under its plain name: it may have resumed here while nobody watched, so its
        running state is asked like an arrival's (the table ignores a resume of a guest
        this node already owns)."""
        if domid not in self.doms and split_name(name)[1] is Phase.NONE:
            self.doms[domid] = _Dom(name, Phase.NONE, arriving=True)

    def waiting(self) -> list[int]:
        """Domains renamed after arriving whose running state must be asked."""
        return [d for d, dom in self.doms.items() if dom.arriving and dom.phase is Phase.NONE]

    def known(self) -> set[int]:
        return set(self.doms)
