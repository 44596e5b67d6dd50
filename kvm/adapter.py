"""The libvirt adapter (entry point ``libvirt``): one per node, on libvirt-python.

- ``parse_hook``: the qemu hook's calls (pure, :mod:`.events`);
- ``events()``: domain lifecycle events through libvirt's asyncio integration
  (:mod:`.eventloop`); when libvirtd goes away (restart, crash) it reconnects with
  backoff. On every connection (the agent's first too: it may have been down) it reports,
  for every guest running here, that it runs here: a resume may have happened while
  nobody listened, and the agent's table makes the report harmless when nothing was;
- ``describe``/``running``: from the domains libvirt lists and their XML;
- ``migrate``: libvirt's migrate API (peer-to-peer by default), progress from the job's
  statistics, cancellation aborting libvirt's job.

Settings (``[hypervisor]`` with ``kind = "libvirt"``; ``{node}`` in ``uri`` is replaced):
``uri`` (``qemu:///system``), ``addresses`` (node -> the address libvirt and the
migration stream reach it at; default: the node's name), ``peer_uri``
(``qemu+tcp://{address}/system``), ``migration_uri`` (``tcp://{address}``), ``p2p``
(true), ``bandwidth_mib`` (none), ``reconnect_max_s`` (5), ``keepalive_s`` (5).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from orchestrator.hypervisor import (
    EventKind,
    GuestEvent,
    GuestInfo,
    HookCall,
    Hypervisor,
    HypervisorError,
    Progress,
    ProgressFn,
)

from .domxml import Domain, DomainXMLError, parse_domain
from .eventloop import ensure_registered, error_text
from .events import EVENT_ORIGIN, from_lifecycle, lifecycle_kind, parse_hook

log = structlog.get_logger("convergent.kvm")
T = TypeVar("T")
POLL_S = 0.1
COMPLETED_WAIT_S = 3.0  # the source's job-completed event after the API call returned
WANTS_XML = frozenset({EventKind.INCOMING, EventKind.RESUMED, EventKind.STARTED})
STATE_RUNNING = 1  # virDomainState
STATE_PAUSED = 3


@dataclass(frozen=True)
class Settings:
    uri: str = "qemu:///system"
    addresses: Mapping[str, str] = field(default_factory=dict)
    peer_uri: str = "qemu+tcp://{address}/system"
    migration_uri: str = "tcp://{address}"
    p2p: bool = True
    bandwidth_mib: int | None = None
    reconnect_max_s: float = 5.0
    keepalive_s: int = 5

    @classmethod
    def of(cls, raw: Mapping[str, Any], node: str) -> Settings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise HypervisorError(f"[hypervisor] libvirt: unknown key {unknown[0]!r} "
                                  f"(known: {', '.join(sorted(known))})")
        values = dict(raw)
        addresses = values.get("addresses", {})
        if not isinstance(addresses, Mapping) or not all(
                isinstance(v, str) for v in addresses.values()):
            raise HypervisorError("[hypervisor] libvirt: addresses must map node names to "
                                  "addresses")
        for key in ("uri", "peer_uri", "migration_uri"):
            if key in values and not isinstance(values[key], str):
                raise HypervisorError(f"[hypervisor] libvirt: {key} must be a string")
        values["uri"] = str(values.get("uri", cls.uri)).replace("{node}", node)
        return cls(**values)

    def address(self, node: str) -> str:
        return self.addresses.get(node, node)


class LibvirtHypervisor(Hypervisor):
    kind = "libvirt"

    def __init__(self, settings: Mapping[str, Any], node: str) -> None:
        super().__init__(settings, node)
        self.config = Settings.of(settings, node)
        # libvirt prints every error to stderr by default; ours arrive as exceptions
        libvirt.registerErrorHandler(_quiet, None)
        self._conn: libvirt.virConnect | None = None
        self._closed: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        # times the event stream subscribed to libvirt's lifecycle events (what happened
        # before that is only seen as "it runs here"): a caller's moment to act
        self.subscriptions = 0

    # hooks ---------------------------------------------------------------------------
    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        return parse_hook(call, self.node)

    # the connection ------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking libvirt call, in a worker thread; its errors as one line."""
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt on {self.node}: {error_text(exc)}") from None

    async def connection(self) -> libvirt.virConnect:
        """The live connection to this node's libvirtd, opened on first use and after
        libvirtd closed the last one."""
        async with self._guard():
            if self._conn is not None and self._closed is not None \
                    and not self._closed.is_set():
                return self._conn
            if self._conn is not None:  # libvirtd closed it: let its resources go
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(self._conn.close)
                self._conn = None
            ensure_registered()
            conn = await self._call(libvirt.open, self.config.uri)
            closed = asyncio.Event()
            loop = asyncio.get_running_loop()

            def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
                loop.call_soon_threadsafe(closed.set)

            conn.registerCloseCallback(on_close, None)
            with contextlib.suppress(libvirt.libvirtError):
                await self._call(conn.setKeepAlive, self.config.keepalive_s, 3)
            self._conn, self._closed = conn, closed
            return conn

    async def close(self) -> None:
        """Close the connection: after the event stream let go of its callbacks (libvirt
        deadlocks deregistering a callback whose connection another thread closes)."""
        async with self._guard():
            conn, self._conn = self._conn, None
            if self._closed is not None:
                self._closed.set()  # a stream still running skips its deregistration
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(conn.unregisterCloseCallback)
                with contextlib.suppress(libvirt.libvirtError):
                    await asyncio.to_thread(conn.close)

    def _guard(self) -> asyncio.Lock:
        """Serialises opening, closing and (de)registering callbacks on the connection."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # what runs here ------------------------------------------------------------------
    async def describe(self, guest: str) -> GuestInfo:
        conn = await self.connection()
        try:
            dom = await asyncio.to_thread(conn.lookupByName, guest)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"guest {guest} is not known to libvirt on "
                                      f"{self.node}") from None
            raise HypervisorError(f"libvirt on {self.node}: {error_text(exc)}") from None
        info = await self._info(dom)
        if info is None:
            raise HypervisorError(f"guest {guest} vanished from {self.node}")
        return info

    async def running(self) -> list[GuestInfo]:
        conn = await self.connection()
        doms = await self._call(conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        infos = [await self._info(d) for d in doms]
        return [i for i in infos if i is not None]

    async def _info(self, dom: libvirt.virDomain) -> GuestInfo | None:
        """None: the domain went away while we looked (a migration finishing)."""
        try:
            xml, (state, _reason) = await asyncio.to_thread(
                lambda: (dom.XMLDesc(0), dom.state()))
        except libvirt.libvirtError:
            return None
        d = parse_domain(xml)
        active = state in (STATE_RUNNING, STATE_PAUSED)
        # an arriving guest is paused here until its resume: here, not yet running
        return GuestInfo(d.name, d.macs, d.addresses, self.node if active else None, d.uuid,
                         running=state == STATE_RUNNING)

    # events --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[GuestEvent]:
        first = True  # for the log only: every connection reports what runs here
        while True:
            conn = await self._connect_with_backoff()
            queue: asyncio.Queue[tuple[str, int, int, float]] = asyncio.Queue()
            cb = await self._call(conn.domainEventRegisterAny, None,
                                  libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                  _lifecycle_to(queue, asyncio.get_running_loop()), None)
            self.subscriptions += 1
            log.info("libvirt.events", node=self.node, uri=self.config.uri,
                     reconnected=not first)
            try:
                first = False
                for ev in await self._missed():
                    yield ev
                async for ev in self._drain(conn, queue):
                    yield ev
            finally:
                await self._deregister(conn, cb)
            log.warning("libvirt.disconnected", node=self.node)

    async def _deregister(self, conn: libvirt.virConnect, cb: int) -> None:
        """Only on a live connection: a closed one took its callbacks along."""
        closed = self._closed
        with contextlib.suppress(libvirt.libvirtError, RuntimeError):
            async with self._guard():
                live = self._conn
                if live is not None and live is conn and closed is not None \
                        and not closed.is_set():
                    await asyncio.to_thread(live.domainEventDeregisterAny, cb)

    async def _connect_with_backoff(self) -> libvirt.virConnect:
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.1, max=self.config.reconnect_max_s),
            retry=retry_if_exception_type(HypervisorError), reraise=True)
        async for attempt in retrying:
            with attempt:
                n = attempt.retry_state.attempt_number
                if n > 1 and n % 10 == 0:
                    log.warning("libvirt.reconnecting", node=self.node, attempts=n)
                return await self.connection()
        raise AssertionError("unreachable")

    async def _drain(self, conn: libvirt.virConnect,
                     queue: asyncio.Queue[tuple[str, int, int, float]]
                     ) -> AsyncIterator[GuestEvent]:
        closed = self._closed
        assert closed is not None
        while not closed.is_set():
            getter = asyncio.ensure_future(queue.get())
            waiter = asyncio.ensure_future(closed.wait())
            try:
                done, _ = await asyncio.wait({getter, waiter},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done:
                name, event, detail, at = getter.result()
                ev = await self._event(conn, name, event, detail, at)
                if ev is not None:
                    yield ev

    async def _event(self, conn: libvirt.virConnect, name: str, event: int, detail: int,
                     at: float) -> GuestEvent | None:
        kind = lifecycle_kind(event, detail)
        if kind is None:
            return None
        domain = await self._domain_xml(conn, name) if kind in WANTS_XML else None
        return from_lifecycle(self.node, name, event, detail, at, domain, uuid.uuid4().hex)

    async def _domain_xml(self, conn: libvirt.virConnect, name: str) -> Domain | None:
        try:
            xml = await asyncio.to_thread(lambda: conn.lookupByName(name).XMLDesc(0))
            return parse_domain(xml)
        except (libvirt.libvirtError, DomainXMLError):
            return None  # gone already; the agent resolves it from the cluster file

    async def _missed(self) -> list[GuestEvent]:
        """Every guest running here, as "it runs here" (its resume may have happened while
        nobody listened)."""
        try:
            here = await self.running()
        except HypervisorError:
            return []
        now = time.time()
        return [GuestEvent(EventKind.RESUMED, i.name, self.node, EVENT_ORIGIN, now,
                           macs=i.macs, addresses=i.addresses, uuid=i.uuid,
                           id=uuid.uuid4().hex, detail="running here (connected)")
                for i in here if i.running]

    # migrate -------------------------------------------------------------------------
    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        """Live-migrate ``guest`` to ``dst`` with libvirt's API; the agents learn its
        moments from hooks and events like for any migration. Cancelled: libvirt's job
        is aborted and the guest stays here."""
        conn = await self.connection()
        dom = await self._call(conn.lookupByName, guest)
        address = self.config.address(dst)
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: self.config.migration_uri.format(address=address)}
        if self.config.bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(self.config.bandwidth_mib)
        flags = libvirt.VIR_MIGRATE_LIVE
        if await self._call(dom.isPersistent):
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        peer = self.config.peer_uri.format(address=address)
        progress(Progress("starting", f"{guest}: {self.node} -> {dst} ({peer})"))
        completed = await self._job_completed(conn, guest)
        job = asyncio.ensure_future(self._call(self._blocking_migrate, guest, peer, params,
                                               flags))
        try:
            copied = await self._follow(dom, job, progress)
            await job
            stats = await self._completed_stats(conn, completed)
            fraction = job_fraction(stats)
            if not copied and fraction is not None:  # over before a poll saw the copy
                progress(Progress("memory", job_detail(stats), fraction))
            progress(Progress("resumed", f"{guest} runs on {dst}; libvirt's downtime "
                                         f"{stats.get('downtime', '?')} ms"))
        except asyncio.CancelledError:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.abortJob)
            with contextlib.suppress(HypervisorError):
                await job
            await self._deregister(conn, completed[0])
            progress(Progress("aborted", f"{guest} stays on {self.node}"))
            raise
        except HypervisorError as exc:
            await self._deregister(conn, completed[0])
            progress(Progress("aborted", str(exc)))
            raise HypervisorError(f"migrating {guest} to {dst}: {exc}") from None
        progress(Progress("done", f"{guest} runs on {dst}", 1.0))

    async def _job_completed(self, conn: libvirt.virConnect, guest: str
                             ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """The statistics of the source's job-completed event for ``guest`` (downtime
        included: libvirt's own figure), once it comes."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()

        def settle(params: dict[str, Any]) -> None:
            if not done.done():
                done.set_result(params)

        def on_completed(_c: Any, dom: Any, params: dict[str, Any], _o: Any) -> None:
            if dom.name() == guest:
                loop.call_soon_threadsafe(settle, dict(params))

        cb = await self._call(conn.domainEventRegisterAny, None,
                              libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, on_completed, None)
        return cb, done

    async def _completed_stats(self, conn: libvirt.virConnect,
                               completed: tuple[int, asyncio.Future[dict[str, Any]]]
                               ) -> dict[str, Any]:
        cb, done = completed
        try:
            return await asyncio.wait_for(asyncio.shield(done), COMPLETED_WAIT_S)
        except TimeoutError:
            return {}
        finally:
            await self._deregister(conn, cb)

    def _blocking_migrate(self, guest: str, peer: str, params: dict[str, Any],
                          flags: int) -> None:
        """In a worker thread, on a connection of its own (the job blocks its caller)."""
        conn = libvirt.open(self.config.uri)
        try:
            dom = conn.lookupByName(guest)
            if self.config.p2p:
                dom.migrateToURI3(peer, params, flags | libvirt.VIR_MIGRATE_PEER2PEER)
            else:
                dconn = libvirt.open(peer)
                try:
                    dom.migrate3(dconn, params, flags)
                finally:
                    dconn.close()
        finally:
            conn.close()

    async def _follow(self, dom: libvirt.virDomain, job: asyncio.Future[None],
                      progress: ProgressFn) -> bool:
        """Report the job's steps until it ends; whether the memory copy was seen."""
        paused = copied = False
        while not job.done():
            await asyncio.wait({job}, timeout=POLL_S)
            try:
                stats, (state, _r) = await asyncio.to_thread(
                    lambda: (dom.jobStats(), dom.state()))
            except libvirt.libvirtError:
                continue  # the domain left: the job is ending
            fraction = job_fraction(stats)
            if fraction is not None and not paused:  # what was copied, also up to the pause
                copied = True
                progress(Progress("memory", job_detail(stats), fraction))
            if state == STATE_PAUSED and not paused:
                paused = True
                progress(Progress("paused", "switching over"))
        return copied


def _quiet(_ctx: Any, _err: Any) -> None:
    return None


def _lifecycle_to(queue: asyncio.Queue[tuple[str, int, int, float]],
                  loop: asyncio.AbstractEventLoop) -> Callable[..., None]:
    """libvirt's lifecycle callback, handing each event to the loop (libvirt may call it
    from another thread)."""
    def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (dom.name(), event, detail, time.time()))
    return on_lifecycle


def job_fraction(stats: Mapping[str, Any]) -> float | None:
    total = stats.get("data_total") or stats.get("memory_total")
    done = stats.get("data_processed") or stats.get("memory_processed")
    if not total or done is None:
        return None
    remaining = stats.get("data_remaining", stats.get("memory_remaining", 0)) or 0
    return max(0.0, min(1.0, 1 - remaining / total)) if remaining else min(1.0, done / total)


def job_detail(stats: Mapping[str, Any]) -> str:
    mib = (stats.get("data_processed") or 0) / 2**20
    rate = (stats.get("memory_bps") or 0) / 2**20
    it = stats.get("memory_iteration")
    return f"{mib:.0f} MiB sent, {rate:.0f} MiB/s" + (f", pass {it}" if it else "")
