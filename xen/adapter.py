"""The xl adapter (``[hypervisor] kind = "xl"``): Xen guests through libxl's own tools.

- hooks: convergent's vif script (hooks/xen-vif) forwards libxl's calls; ``parse_hook``
  reads them (``vifcall.py``): INCOMING, STARTED, GONE, FAILED, STOPPED;
- events: the one moment no script marks, a migrated domain starting here (renamed from
  ``NAME--incoming`` and unpaused), and an arriving domain that vanished, from a
  ``xenstore-watch`` on /local/domain and ``xl list`` (``tracker.py``); a full rescan every
  ``resync_s`` and after a reconnect;
- ``describe``/``running``: ``xl list -l``;
- ``migrate``: ``xl migrate`` over ssh, each phase from xl's own handshake lines.

Settings (the ``[hypervisor]`` section): ``xl`` (command, default "xl"), ``ssh`` (xl's
``-s``), ``hosts`` (node -> the host name ``xl migrate`` is given; default the node name),
``config``/``pause``/``debug``/``extra`` (passed to ``xl migrate`` as ``-C``, ``-p``,
``--debug`` and as is), ``env`` (added to the environment of xl and the xenstore
tools), ``poll_s`` (how often a renamed, still paused arrival is asked
about, default 0.05), ``resync_s`` (default 5), ``timeout_s`` (per tool call, default 30).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog

from orchestrator.hypervisor import (
    GuestEvent,
    GuestInfo,
    HookCall,
    Hypervisor,
    HypervisorError,
    Progress,
    ProgressFn,
)

from .migrate import MigrateOptions, ProgressTracker, migrate_argv
from .names import Phase
from .tools import Tools
from .tracker import Moment, Tracker
from .vifcall import parse_vif_call
from .xllist import XlDomain

log = structlog.get_logger("convergent.xen")
_SETTINGS = {"xl", "ssh", "hosts", "config", "pause", "debug", "extra", "poll_s", "resync_s",
             "timeout_s", "env"}


class XenHypervisor(Hypervisor):
    kind = "xl"

    def __init__(self, settings: Mapping[str, Any], node: str) -> None:
        super().__init__(settings, node)
        unknown = set(self.settings) - _SETTINGS
        if unknown:
            raise HypervisorError(f"[hypervisor] kind xl: unknown settings "
                                  f"{', '.join(sorted(unknown))} (known: "
                                  f"{', '.join(sorted(_SETTINGS))})")
        xl = self.settings.get("xl", "xl")
        self.tools = Tools(tuple(xl.split()) if isinstance(xl, str) else tuple(xl),
                           float(self.settings.get("timeout_s", 30.0)),
                           {str(k): str(v) for k, v in (self.settings.get("env") or {}).items()})
        self.hosts: dict[str, str] = dict(self.settings.get("hosts") or {})
        self.options = MigrateOptions(
            config=self.settings.get("config"), pause=bool(self.settings.get("pause", False)),
            debug=bool(self.settings.get("debug", False)), ssh=self.settings.get("ssh"),
            extra=tuple(self.settings.get("extra") or ()))
        self.poll_s = float(self.settings.get("poll_s", 0.05))
        self.resync_s = float(self.settings.get("resync_s", 5.0))
        self.tracker = Tracker()
        self.watching = asyncio.Event()  # set once a watch is registered (tests, the lab)

    # hooks ----------------------------------------------------------------
    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        return parse_vif_call(call, self.node)

    # events ---------------------------------------------------------------
    async def events(self) -> AsyncIterator[GuestEvent]:
        while True:
            try:
                async for moment in self._watch():
                    yield self._event(moment)
            except HypervisorError as exc:
                log.warning("xen.watch.lost", node=self.node, error=str(exc))
            await asyncio.sleep(1.0)  # then reconnect, and rescan

    async def _watch(self) -> AsyncIterator[Moment]:
        changes: asyncio.Queue[int | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(self._pump(changes))
        try:
            for m in await self._rescan():
                yield m
            next_resync = time.monotonic() + self.resync_s
            while True:
                wait = self.poll_s if self.tracker.waiting() else self.resync_s
                try:
                    item = await asyncio.wait_for(changes.get(), wait)
                except TimeoutError:
                    item = -1  # nothing changed: ask about the waiting ones
                if isinstance(item, BaseException):
                    raise HypervisorError(f"xenstore-watch ended: {item}")
                if item is None:
                    self.watching.set()
                if item is None or time.monotonic() >= next_resync:
                    moments = await self._rescan()
                    next_resync = time.monotonic() + self.resync_s
                elif item >= 0:
                    moments = self.tracker.observe(
                        item, await self.tools.xs_read(f"/local/domain/{item}/name"))
                else:
                    moments = []
                moments += await self._ask_waiting()
                for m in moments:
                    yield m
        finally:
            self.watching.clear()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _pump(self, changes: asyncio.Queue[int | BaseException | None]) -> None:
        try:
            async for domid in self.tools.watch_domains():
                changes.put_nowait(domid)
            changes.put_nowait(EOFError("the watch process exited"))
        except (OSError, HypervisorError) as exc:
            changes.put_nowait(exc)

    async def _rescan(self) -> list[Moment]:
        names = await self.tools.domain_names()
        moments = []
        for domid in self.tracker.known() - names.keys():
            moments += self.tracker.observe(domid, None)
        for domid, name in sorted(names.items()):
            self.tracker.found(domid, name)
            moments += self.tracker.observe(domid, name)
        return moments

    async def _ask_waiting(self) -> list[Moment]:
        moments = []
        for domid in self.tracker.waiting():
            state = await self.tools.state(domid)
            if state is None:
                moments += self.tracker.observe(domid, None)
            else:
                moments += self.tracker.observe(domid, state.name, running=state.running)
        return moments

    def _event(self, m: Moment) -> GuestEvent:
        return GuestEvent(kind=m.kind, guest=m.guest, node=self.node, origin="event:xenstore",
                          at=time.time(), id=f"xs-{uuid.uuid4().hex}", detail=m.detail)

    # guests ---------------------------------------------------------------
    async def describe(self, guest: str) -> GuestInfo:
        doms = [d for d in await self.tools.list_long() if d.guest == guest]
        if not doms:
            raise HypervisorError(f"guest {guest} has no domain on {self.node} (xl list -l)")
        # a plain name runs here; a copy still arriving (or already handed over) does not
        dom = next((d for d in doms if d.phase is Phase.NONE), doms[0])
        return self._info(dom)

    async def running(self) -> list[GuestInfo]:
        return [self._info(d) for d in await self.tools.list_long() if d.phase is Phase.NONE]

    def _info(self, dom: XlDomain) -> GuestInfo:
        return GuestInfo(dom.guest, dom.macs, dom.addresses, self.node, dom.uuid,
                         running=dom.phase is Phase.NONE)

    # migrate --------------------------------------------------------------
    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        await self.migrate_with(guest, dst, progress, self.options)

    async def migrate_with(self, guest: str, dst: str, progress: ProgressFn,
                           options: MigrateOptions) -> None:
        if dst == self.node:
            raise HypervisorError(f"{guest} already runs on {dst}")
        argv = migrate_argv(self.tools.xl, guest, self.hosts.get(dst, dst), options)
        log.info("xen.migrate", guest=guest, dst=dst, argv=argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                env=self.tools.environ())
        except OSError as exc:
            raise HypervisorError(f"{argv[0]}: {exc.strerror or exc}") from None
        tracker = ProgressTracker()
        try:
            await self._follow(proc, tracker, progress)
        except asyncio.CancelledError:
            await self._cancel(proc, tracker, guest, dst)
            raise
        if proc.returncode != 0 or tracker.aborted:
            progress(Progress("aborted", tracker.aborted or "xl migrate failed"))
            raise HypervisorError(f"xl migrate {guest} to {dst} failed (exit "
                                  f"{proc.returncode}): {' / '.join(tracker.tail[-3:])}")

    async def _follow(self, proc: asyncio.subprocess.Process, tracker: ProgressTracker,
                      progress: ProgressFn) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            p = tracker.feed(line.decode(errors="replace"))
            if p is not None:
                progress(p)
        await proc.wait()

    async def _cancel(self, proc: asyncio.subprocess.Process, tracker: ProgressTracker,
                      guest: str, dst: str) -> None:
        """Before GO, ending the transport makes xl fail the stream and resume the guest
        here ("Migration failed, resuming at sender."); killing xl itself could leave the
        guest suspended. After GO the destination may start it: nothing can be undone."""
        if tracker.go_given:
            await asyncio.shield(proc.wait())
            raise HypervisorError(f"too late to cancel: {dst} had permission to start "
                                  f"{guest}") from None
        for child in _children(proc.pid):  # xl's transport: sh -c "exec ssh HOST xl ..."
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(p) for p in f.read().split()]
    return kids

