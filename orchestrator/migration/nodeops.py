"""What the migration coordinator does to one node's kernel, behind one small seam.

Every operation names the node's namespace (``None`` on a production host), so the lab
and production run the same code.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from orchestrator.errors import MigrationError
from orchestrator.netfilter import nft
from orchestrator.netfilter.render import IP_TABLE, SET_LOCAL_GUESTS, SET_RACE_GATE


@dataclass(frozen=True)
class NodeOps:
    node: str
    netns: str | None
    guest_bridge: str

    async def gate(self, addresses: Iterable[IPv4Address], closed: bool) -> None:
        """Close (or open) the race gate for an arriving guest's addresses."""
        await self._set(SET_RACE_GATE, addresses, add=closed)

    async def host(self, addresses: Iterable[IPv4Address], hosted: bool) -> None:
        await self._set(SET_LOCAL_GUESTS, addresses, add=hosted)

    async def _set(self, name: str, addresses: Iterable[IPv4Address], add: bool) -> None:
        elems = [str(a) for a in addresses]
        current = set(await asyncio.to_thread(nft.set_elements, "ip", IP_TABLE, name,
                                              self.netns))
        todo = [e for e in elems if (e in current) != add]
        if not todo:
            return  # idempotent: a replayed phase changes nothing
        await asyncio.to_thread(nft.update_set, "ip", IP_TABLE, name,
                                todo if add else (), () if add else todo, self.netns)

    async def announce_gateway(self, gateway: IPv4Address) -> asyncio.Task[int]:
        """Gratuitous ARP for the shared gateway from this node's guest bridge: a guest that
        kept its ARP cache across the move stops hair-pinning through the source.

        arping sends at once but lingers a second before exiting; the caller gets a task
        to await later instead of waiting on the cutover's critical path."""
        if shutil.which("arping") is None:
            raise MigrationError("arping is not installed (package iputils-arping)")
        argv = [*nft.netns_prefix(self.netns), "arping", "-q", "-U", "-c", "1", "-I",
                self.guest_bridge, "-s", str(gateway), str(gateway)]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        return asyncio.create_task(proc.wait())
