"""libvirt's event loop on asyncio (libvirtaio), safe to drive from worker threads.

The adapter makes every blocking libvirt call in a worker thread, so the agent's loop never
waits on libvirtd. But libvirt calls the event implementation from whichever thread makes
an API call (its RPC client turns the socket watch off and on around each call, keepalive
adds timers), and asyncio is not thread-safe. So a call arriving off the loop thread does
its bookkeeping at once (libvirt needs the watch or timer id back) and leaves everything
that touches the loop to the loop itself, in order. Nothing here ever waits for the loop,
so a worker holding a libvirt lock can never deadlock against it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import libvirt
import libvirtaio


class ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()

    def _off_loop(self) -> bool:
        return threading.get_ident() != self._loop_thread

    def _later(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        if not self._off_loop():
            return int(super()._add_handle(fd, event, cb, opaque))
        callback = libvirtaio.FDCallback(self, cb, opaque, descriptor=self.descriptors[fd],
                                         event=event)
        self.callbacks[callback.iden] = callback
        self._later(self._attach_handle, fd, callback)
        return int(callback.iden)

    def _attach_handle(self, fd: int, callback: Any) -> None:
        if self.callbacks.get(callback.iden) is callback:  # not removed meanwhile
            self.descriptors[fd].add_handle(callback)
            self._pending_inc()

    def _update_handle(self, watch: int, event: int) -> None:
        if self._off_loop():
            self._later(self._update_if_present, watch, event)
        else:
            super()._update_handle(watch, event)

    def _update_if_present(self, watch: int, event: int) -> None:
        if watch in self.callbacks:
            super()._update_handle(watch, event)

    def _remove_handle(self, watch: int) -> int:
        if self._off_loop():
            self._later(super()._remove_handle, watch)
            return 0
        return int(super()._remove_handle(watch))

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        if not self._off_loop():
            return int(super()._add_timeout(timeout, cb, opaque))
        callback = libvirtaio.TimeoutCallback(self, cb, opaque)
        self.callbacks[callback.iden] = callback
        self._later(self._start_timeout, callback, timeout)
        return int(callback.iden)

    def _start_timeout(self, callback: Any, timeout: int) -> None:
        if self.callbacks.get(callback.iden) is callback:
            callback.update(timeout=timeout)
            self._pending_inc()

    def _update_timeout(self, timer: int, timeout: int) -> None:
        if self._off_loop():
            self._later(self._update_timeout_if_present, timer, timeout)
        else:
            super()._update_timeout(timer, timeout)

    def _update_timeout_if_present(self, timer: int, timeout: int) -> None:
        if timer in self.callbacks:
            super()._update_timeout(timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        if self._off_loop():
            self._later(super()._remove_timeout, timer)
            return 0
        return int(super()._remove_timeout(timer))


    def move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve libvirt from another loop (the previous one is gone): whatever libvirt
        still has registered (handles and timers of connections that outlived it) is
        watched from the new one."""
        self.loop, self._loop_thread = loop, threading.get_ident()
        self._finished = None
        for callback in list(self.callbacks.values()):
            if isinstance(callback, libvirtaio.FDCallback):
                callback.descriptor.update()
            elif isinstance(callback, libvirtaio.TimeoutCallback):
                callback._task = None  # it died with its loop
                callback.update(timeout=callback.timeout)


_impl: ThreadSafeAsyncIOImpl | None = None


def ensure_registered() -> ThreadSafeAsyncIOImpl:
    """The implementation, serving the running loop. libvirt takes one event loop
    implementation per process, for good: an agent runs one loop, but a process may run
    several one after the other (``asyncio.run`` per command or test)."""
    global _impl
    loop = asyncio.get_running_loop()
    if _impl is None:
        _impl = ThreadSafeAsyncIOImpl(loop).register()
        libvirtaio._current_impl = _impl  # what libvirtaio.getCurrentImpl() reports
    elif _impl.loop is not loop:
        _impl.move_to(loop)
    return _impl


def error_text(exc: libvirt.libvirtError) -> str:
    return " ".join((exc.get_error_message() or str(exc)).split())
