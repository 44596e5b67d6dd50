"""Which guests the agent knows: the cluster file's, and those the hypervisor describes.

A guest named in the cluster file is that entry (the default, and what services refer
to). Any other guest the hypervisor reports, with MACs and addresses from its own
metadata (the event's, or ``describe``), is resolved once into the same ``Guest`` the
planner and the coordinator use, after the checks the cluster file's guests get: its
addresses inside the guest subnet and not reserved or another guest's, its MACs outside
every node's prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address

import structlog
from pydantic import ValidationError

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConvergentError
from orchestrator.hypervisor import GuestEvent, GuestInfo, Hypervisor

log = structlog.get_logger("convergent.guests")


class UnknownGuest(ConvergentError):
    pass


def guest_from_info(name: str, macs: Iterable[str], addresses: Iterable[IPv4Address],
                    topology: Topology, taken: Iterable[Guest] = ()) -> Guest:
    """Pure: a hypervisor's description as a cluster guest, or one line saying why not."""
    macs, addresses = list(macs), list(addresses)
    where = f"guest {name!r} from the hypervisor"
    if not addresses:
        raise UnknownGuest(f"{where}: no addresses in its metadata, and the cluster file "
                           "does not list it")
    try:
        g = Guest.model_validate({"name": name, "macs": macs, "addresses": addresses})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UnknownGuest(f"{where}: {'.'.join(map(str, first['loc']))}: "
                           f"{first['msg']}") from None
    c = topology.cluster
    reserved = {c.gateway, c.guest_subnet.network_address, c.guest_subnet.broadcast_address,
                *(n.guest_ip for n in topology.nodes)}
    others = [o for o in (*topology.guests, *taken) if o.name != name]
    used = {a: o.name for o in others for a in o.addresses}
    for a in g.addresses:
        if a not in c.guest_subnet:
            raise UnknownGuest(f"{where}: {a} is outside guest_subnet {c.guest_subnet}")
        if a in reserved:
            raise UnknownGuest(f"{where}: {a} is reserved (gateway, a node, the network)")
        if a in used:
            raise UnknownGuest(f"{where}: {a} belongs to guest {used[a]}")
    for mac in g.macs:
        for n in topology.nodes:
            if n.owns_mac(mac):
                raise UnknownGuest(f"{where}: {mac} falls in node {n.name}'s MAC prefix")
    return g


class GuestBook:
    """The cluster file's guests, plus the hypervisor's, each resolved once."""

    def __init__(self, topology: Topology, hypervisor: Hypervisor) -> None:
        self.topology = topology
        self.hypervisor = hypervisor
        self.learned: dict[str, Guest] = {}

    def known(self, name: str) -> Guest | None:
        try:
            return self.topology.guest(name)
        except KeyError:
            return self.learned.get(name)

    async def resolve(self, name: str, event: GuestEvent | None = None) -> Guest:
        """The guest called ``name``; raises UnknownGuest with the reason."""
        found = self.known(name)
        if found is not None:
            return found
        if event is not None and event.addresses:
            info = GuestInfo(name, event.macs, event.addresses, event.node, event.uuid)
        else:
            try:
                info = await self.hypervisor.describe(name)
            except ConvergentError as exc:
                raise UnknownGuest(f"unknown guest {name!r}: not in the cluster file, and "
                                   f"the hypervisor: {exc}") from None
        g = guest_from_info(name, info.macs, info.addresses, self.topology,
                            self.learned.values())
        self.learned[name] = g
        log.info("guest.learned", guest=name, addresses=[str(a) for a in g.addresses])
        return g
