"""The one interface every hypervisor adapter implements (DESIGN §5).

The core never imports ``kvm/`` or ``xen/``: adapters are found through the
``convergent.hypervisors`` entry point group (os-vif style). Migration is split into the
moments the coordinator must act on (Ganeti style): the adapter moves the guest and calls
back when it is paused (memory moving) and when it resumes on the destination.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from ipaddress import IPv4Address

from orchestrator.errors import ConvergentError

Callback = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class GuestInfo:
    name: str
    macs: tuple[str, ...]
    addresses: tuple[IPv4Address, ...]
    node: str | None  # where it runs now, if the adapter can tell


class Hypervisor(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def describe(self, guest: str) -> GuestInfo:
        """Name, MACs, addresses and current node of a guest."""

    @abc.abstractmethod
    async def migrate(self, guest: str, src: str, dst: str, *, on_paused: Callback,
                      on_resumed: Callback) -> None:
        """Move ``guest`` from ``src`` to ``dst``; await ``on_paused`` once the guest stops
        running on ``src`` and ``on_resumed`` once it runs on ``dst``. Raise to abort."""


def load_hypervisor(name: str) -> type[Hypervisor]:
    for ep in entry_points(group="convergent.hypervisors"):
        if ep.name == name:
            cls: type[Hypervisor] = ep.load()
            return cls
    known = ", ".join(sorted(ep.name for ep in entry_points(group="convergent.hypervisors")))
    raise ConvergentError(f"unknown hypervisor {name!r} (installed: {known or 'none'})")
