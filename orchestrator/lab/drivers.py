"""How a lab's guests are booted, found and moved when its nodes run a real hypervisor's
calling convention (``convergent lab up --hypervisor KIND``): a small registry.

The built-in lab (``--hypervisor lab``) moves a veth between namespaces itself. Any other
kind is an entry point of group ``convergent.lab_hypervisors`` naming a class built from
the lab's directory, the node -> namespace map and the guests' namespace pattern; it
provides the ``[hypervisor]`` section the lab's cluster file gets, prepares the nodes,
boots guests, says where each runs, gives each node's agent its environment, and moves a
guest the way an operator would (so the agents learn of it only through their hooks and
events). The core never imports an adapter: entry points only.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import LabError
from orchestrator.hypervisor import ProgressFn

GROUP = "convergent.lab_hypervisors"
BUILTIN = "lab"


class LabDriver(Protocol):
    def __init__(self, lab_dir: Path, netns_of: Mapping[str, str],
                 guest_netns: str) -> None: ...

    def hypervisor_toml(self) -> str: ...

    def build(self, t: Topology) -> None: ...

    def create(self, guest: Guest, node: str) -> None: ...

    def guest_node(self, t: Topology, guest: str) -> str | None: ...

    def agent_env(self, node: str) -> dict[str, str]: ...

    async def migrate(self, guest: str, src: str, dst: str, progress: ProgressFn,
                      env: Mapping[str, str] | None = None) -> None: ...

    # optional, read with getattr: ``guests_in_namespaces = False`` (the guests are real VMs:
    # the lab makes no guest namespace, guest responder or veth), and
    # ``flow_side(lab, topology, guest)``: where the flows' guest end runs
    # (``orchestrator.lab.flows.GuestSide``; default: the guest's namespace); with VM
    # guests, ``ssh(topology, guest, command) -> stdout``: a shell command in the guest, and
    # ``answers_probes(proto, port) -> bool``: whether the guest's responder serves that port
    # (a VM's real sshd and the demo's servers don't answer `lab check`'s probe)


def kinds() -> list[str]:
    return sorted({BUILTIN, *(ep.name for ep in entry_points(group=GROUP))})


def driver_class(kind: str) -> type[LabDriver] | None:
    """None for the built-in lab."""
    if kind in (BUILTIN, "noop"):
        return None
    for ep in entry_points(group=GROUP):
        if ep.name == kind:
            cls: type[LabDriver] = ep.load()
            return cls
    raise LabError(f"--hypervisor {kind!r}: no such lab hypervisor (known: "
                   f"{', '.join(kinds())})")
