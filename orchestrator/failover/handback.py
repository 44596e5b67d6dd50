"""``convergent failback``: the steps of ``orchestrator/failover/back.py``, on both nodes.

The home H runs them (``Failback.run``: its agent takes its address and its flows back);
the holder V answers over the peer channel (``Failback.serve``): it sends its entries,
releases the address, retires its copies. While V is releasing, the connection is the
lease of that state: if H goes away (or says nothing for ``HOLD_S``) before the
compare-and-swap, V follows the store again and the address comes back to V's uplink.
One audit record per step in H's log (``failback.begin/commit/release/adopt/retire/end``),
and one ``failover.back`` in V's once it has handed the address back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
import tenacity

from orchestrator.agent.peer_channel import PeerChannel, PeerError, open_channel, quiet
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError
from orchestrator.failover.adopt import Changes
from orchestrator.failover.back import (
    SKIPPABLE,
    FailbackPlan,
    FailbackRefused,
    guest_addresses,
    nothing_to_do,
    plan_failback,
    plan_handback,
    retired,
    select_handback,
)
from orchestrator.handover.applier import apply_plan
from orchestrator.model.conntrack import Entry
from orchestrator.netfilter.conntrack import Conntrack
from orchestrator.replicator.wire import Record
from orchestrator.store.base import PublicAddress, PublicConflict, Store

log = structlog.get_logger("convergent.failback")
HOLD_S = 10.0  # a releasing holder waits this long for the home's next word


class Adoption(Protocol):
    """What a failback needs of :class:`~orchestrator.failover.adopt.AdoptionOps`."""

    releasing: set[str]

    async def follow(self, records: Callable[[], Awaitable[list[PublicAddress]]]
                     ) -> Changes: ...  # fmt: skip


class Holder(Protocol):
    """The holder of our address, as the home sees it during a failback."""

    async def entries(self) -> list[Entry]: ...

    async def release(self) -> list[str]: ...  # addresses taken off its uplink

    async def retire(self) -> int: ...  # copies of our bindings it deleted

    async def close(self) -> None: ...


Connect = Callable[[str], Awaitable[Holder]]


class Failback:
    def __init__(self, topology: Topology, node: str, store: Store, table: Conntrack,
                 adoption: Adoption, audit: AuditLog, connect: Connect,
                 rules: Callable[[], Awaitable[Any]]) -> None:
        self.topology, self.node, self.store, self.table = topology, node, store, table
        self.adoption, self.audit, self.connect, self.rules = adoption, audit, connect, rules
        self._lock = asyncio.Lock()

    # the home's side -------------------------------------------------------------------
    async def run(self, dry_run: bool = False,
                  skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Take this node's address and flows back. ``skip``: ``entries`` leaves the
        handback out on purpose (a control run: the old failback, address only)."""
        unknown = skip - SKIPPABLE
        if unknown:
            raise ConvergentError(f"failback: cannot skip {sorted(unknown)}; only "
                                  f"{sorted(SKIPPABLE)}")
        async with self._lock:
            t0 = time.perf_counter()
            record = await self.store.get_public(self.node)
            live = {v.node: v for v in await self.store.list_liveness()}
            try:
                start = plan_failback(self.topology, record, live, self.node)
            except FailbackRefused as exc:
                await self.audit.arecord("failback.begin", to_node=self.node,
                                         outcome="refused", detail=str(exc))
                raise
            if start is None:
                return {"dry_run": dry_run, **nothing_to_do(self.node,
                                                            self.topology.node(self.node).pub_ip)}
            holder = await self.connect(start.holder)
            try:
                plan = await self._plan(start, holder)
                if dry_run:
                    return {"dry_run": True, **plan.summary()}
                return await self._steps(plan, holder, skip, t0)
            finally:
                await holder.close()

    async def _plan(self, start: Any, holder: Holder) -> FailbackPlan:
        offered = await holder.entries()
        handback = select_handback(offered, self.topology, self.node)
        addresses = guest_addresses(self.topology, handback)
        existing = await asyncio.to_thread(self.table.dump, addresses) if addresses else []
        return plan_handback(start, handback, self.topology, existing, len(offered))

    async def _steps(self, plan: FailbackPlan, holder: Holder, skip: frozenset[str],
                     t0: float) -> dict[str, Any]:
        s = plan.start
        steps = {"plan": _ms(t0)}
        common = {"from_node": s.holder, "to_node": self.node}
        await self.audit.arecord("failback.begin", **common, addresses=[str(s.pub_ip)],
                                 detail="; ".join(f"control run: without {p}"
                                                  for p in sorted(skip)) or None)
        t = time.perf_counter()
        await self.rules()  # back from the dead: whatever ruleset it had, the current one
        errors: list[str] = []
        written = 0
        if "entries" not in skip:
            for p in plan.plans:
                done = await apply_plan(self.table, p)
                written += done.written
                errors += [str(e) for e in done.errors]
        steps["commit"] = _ms(t)
        await self.audit.arecord("failback.commit", **common, entries=written,
                                 duration_ms=steps["commit"],
                                 outcome="degraded" if errors else "ok",
                                 detail=f"{len(errors)} failed, first: {errors[0]}"
                                 if errors else None)
        t = time.perf_counter()
        released = await holder.release()
        steps["release"] = _ms(t)
        await self.audit.arecord("failback.release", **common, addresses=released,
                                 duration_ms=steps["release"],
                                 detail=f"{s.holder} keeps answering what still reaches it")
        t = time.perf_counter()
        epoch = await self._claim(plan)
        changed = await self.adoption.follow(self.store.list_public)
        steps["adopt"] = _ms(t)
        await self.audit.arecord("failback.adopt", **common, addresses=changed.added,
                                 epoch=epoch, duration_ms=steps["adopt"])
        t = time.perf_counter()
        gone = await holder.retire()
        steps["retire"] = _ms(t)
        await self.audit.arecord("failback.retire", **common, entries=gone,
                                 duration_ms=steps["retire"])
        total = _ms(t0)
        await self.audit.arecord("failback.end", **common, duration_ms=total, entries=written)
        log.info("failback.done", holder=s.holder, ms=total, entries=written)
        return {**plan.summary(), "dry_run": False, "epoch": epoch,
                "committed": written - len(errors), "commit_errors": errors[:5],
                "released": released, "adopted": changed.added, "retired": gone,
                "steps_ms": steps, "total_ms": total, "skipped_parts": sorted(skip)}

    async def _claim(self, plan: FailbackPlan) -> int:
        s = plan.start
        try:
            rec = await self.store.claim_public(self.node, s.pub_ip, self.node, s.epoch)
        except PublicConflict as exc:
            raise FailbackRefused(f"{self.node}'s address changed hands meanwhile: {exc}") \
                from None
        return rec.epoch

    # the holder's side -----------------------------------------------------------------
    async def offer(self, home: str) -> list[Entry]:
        """What we hold tagged ``home``, if ``home`` may take its address back from us."""
        rec = await self.store.get_public(home)
        if rec is None or rec.holder != self.node or home == self.node:
            raise FailbackRefused(f"{home} asked for its address back, but {self.node} does "
                                  f"not hold it ({'no record' if rec is None else rec.holder})")
        if not (await self.store.liveness(home)).alive:
            raise FailbackRefused(f"{home} asked for its address back without a live lease")
        tag = self.topology.node(home).tag
        return await asyncio.to_thread(self.table.dump, (), tag, self.topology.cluster.tag_mask)

    async def release(self, home: str) -> list[str]:
        """Off our uplink; the maps and entries stay (``AdoptionOps.releasing``)."""
        self.adoption.releasing.add(home)
        changed = await self.adoption.follow(self.store.list_public)
        log.info("failback.released", home=home, removed=changed.removed)
        return changed.removed

    async def retire(self, home: str) -> int:
        h = self.topology.node(home)
        self.adoption.releasing.discard(home)
        await self.adoption.follow(self.store.list_public)
        mine = await asyncio.to_thread(self.table.dump, (), h.tag,
                                       self.topology.cluster.tag_mask)
        doomed = retired(mine, h)
        gone = await asyncio.to_thread(self.table.delete, doomed) if doomed else None
        n = gone.done if gone is not None else 0
        rec = await self.store.get_public(home)
        await self.audit.arecord("failover.back", from_node=self.node, to_node=home,
                                 addresses=[str(h.pub_ip)], entries=n,
                                 epoch=rec.epoch if rec else None,
                                 detail=f"handed back; {n} copies of its bindings deleted")
        return n

    async def abandon(self, home: str) -> None:
        """The home went away mid-failback: follow the store again (the address comes back
        here unless the home claimed it)."""
        if home in self.adoption.releasing:
            self.adoption.releasing.discard(home)
            log.warning("failback.abandoned", home=home)
            await self.adoption.follow(self.store.list_public)

    async def serve(self, home: str, ch: PeerChannel) -> None:
        """One failback over the peer channel: entries, then ``release`` and ``retire``."""
        try:
            entries = await self.offer(home)
            ch.queue_records([Record.upsert(e) for e in entries])
            ch.queue({"op": "dumped", "count": len(entries)})
            await ch.flush()
            while True:
                req = await asyncio.wait_for(ch.recv(), HOLD_S)
                op = req.get("op") if isinstance(req, dict) else None
                if op == "release":
                    await ch.send({"op": "released", "removed": await self.release(home)})
                elif op == "retire":
                    await ch.send({"op": "retired", "deleted": await self.retire(home)})
                    return
                else:
                    raise PeerError(f"peer {home}: unexpected {op!r} in a failback")
        except TimeoutError:
            log.warning("failback.timeout", home=home, after_s=HOLD_S)
        finally:
            await self.abandon(home)


class LocalHolder:
    """The holder's side called in this process (tests, the bench): the same calls the peer
    channel carries, without the channel."""

    def __init__(self, holder: Failback, home: str) -> None:
        self.holder, self.home = holder, home

    async def entries(self) -> list[Entry]:
        return await self.holder.offer(self.home)

    async def release(self) -> list[str]:
        return await self.holder.release(self.home)

    async def retire(self) -> int:
        return await self.holder.retire(self.home)

    async def close(self) -> None:
        await self.holder.abandon(self.home)


class PeerHolder:
    """The holder's agent over the peer channel (the home connects, as a migration's
    destination does)."""

    def __init__(self, me: str, key: bytes, host: str, port: int, retry_s: float) -> None:
        self.me, self.key, self.host, self.port, self.retry_s = me, key, host, port, retry_s
        self.ch: PeerChannel | None = None

    async def _connect(self) -> PeerChannel:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(OSError),
            stop=tenacity.stop_before_delay(self.retry_s),
            wait=tenacity.wait_exponential(multiplier=0.05, max=0.5), reraise=True)
        try:
            ch: PeerChannel = await retrying(self._connect_once)
        except OSError as exc:
            raise PeerError(f"holder agent {self.host}:{self.port} unreachable: {exc}") \
                from None
        return ch

    async def _connect_once(self) -> PeerChannel:
        return await open_channel(self.host, self.port, self.key, self.me)

    async def entries(self) -> list[Entry]:
        self.ch = await self._connect()
        await self.ch.send({"op": "handback"})
        out: list[Entry] = []
        while True:
            msg = await self.ch.recv()
            if isinstance(msg, list):
                out += [r.entry for r in msg if r.entry is not None]
                continue
            if msg.get("op") == "dumped":
                return out
            raise _refused(msg)

    async def _ask(self, op: str, answer: str) -> dict[str, Any]:
        assert self.ch is not None, "entries() first"
        await self.ch.send({"op": op})
        msg = await self.ch.recv()
        if isinstance(msg, dict) and msg.get("op") == answer:
            return msg
        raise _refused(msg)

    async def release(self) -> list[str]:
        return list((await self._ask("release", "released")).get("removed") or [])

    async def retire(self) -> int:
        return int((await self._ask("retire", "retired")).get("deleted") or 0)

    async def close(self) -> None:
        if self.ch is not None:
            with quiet():
                self.ch.close()
            self.ch = None


def _refused(msg: object) -> PeerError:
    if isinstance(msg, dict) and msg.get("op") == "error":
        return PeerError(f"the holder refused: {msg.get('error')}")
    return PeerError(f"the holder answered {msg!r}")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)
