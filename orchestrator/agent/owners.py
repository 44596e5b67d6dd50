"""A guest booting or stopping here, not by migration: this node claims or releases its
addresses (a compare-and-swap on each epoch, like every ownership change)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container
from typing import Any

from orchestrator.agent.guests import GuestBook
from orchestrator.store.base import Address, Store


class Owners:
    def __init__(self, node: str, store: Store, guests: GuestBook,
                 record: Callable[..., Awaitable[None]], migrating: Container[str],
                 wake: Callable[[], None]) -> None:
        self.node, self.store, self.guests = node, store, guests
        self.record = record  # an audit record (a failed write never fails the change)
        self.migrating = migrating  # guests with a migration arriving here
        self.wake = wake  # a reconcile pass, now

    async def started(self, guest: str) -> dict[str, Any]:
        """Claim the guest's addresses nobody owns; report those another node owns."""
        g = await self.guests.resolve(guest)
        owners = {o.ip: o for o in await self.store.list_ownership(guest=guest,
                                                                   include_released=True)}
        await self.record("guest.start", guest=guest, addresses=_strs(g.addresses))
        free: dict[Address, int] = {a: owners[a].epoch if a in owners else 0
                                    for a in g.addresses
                                    if a not in owners or owners[a].node is None}
        taken = {str(a): owners[a].node for a in g.addresses
                 if a in owners and owners[a].node not in (None, self.node)}
        if free:
            claimed = await self.store.claim_all(free, self.node, guest)
            await self.record("ownership.claim", guest=guest, addresses=_strs(free),
                                     epoch=max(o.epoch for o in claimed))
        self.wake()
        return {"claimed": _strs(free), "owned_elsewhere": taken}

    async def stopped(self, guest: str) -> dict[str, Any]:
        """Release what this node owns of a guest that shut down here."""
        g = await self.guests.resolve(guest)
        await self.record("guest.stop", guest=guest, addresses=_strs(g.addresses))
        if guest in self.migrating:
            return {"released": [], "reason": "migrating"}
        owned = await self.store.list_ownership(guest=guest)
        mine: dict[Address, int] = {o.ip: o.epoch for o in owned if o.node == self.node}
        if mine:
            released = await self.store.release_all(mine)
            await self.record("ownership.release", guest=guest, addresses=_strs(mine),
                                     epoch=max(o.epoch for o in released))
        self.wake()
        return {"released": _strs(mine)}


def _strs(addrs: Any) -> list[str]:
    return [str(a) for a in addrs]
