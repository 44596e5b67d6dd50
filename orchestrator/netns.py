"""Run code inside a network namespace without moving anyone else's thread.

A socket keeps the namespace it was created in, so every kernel seam (ctnetlink, the
replicator's UDP sockets, the gratuitous ARP's packet socket) opens its sockets through
:func:`in_netns`: a short-lived thread enters the namespace, runs the call and ends. The
caller's thread, and the threads of ``asyncio.to_thread``'s pool, never move.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from orchestrator.errors import NetlinkError

_T = TypeVar("_T")
_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(netns: str) -> None:
    """Move the calling thread (only) into ``netns``; sockets it opens stay there."""
    try:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetlinkError(f"network namespace {netns!r} does not exist") from None
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetlinkError(f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a fresh thread that entered ``netns`` (directly when None); its
    result, or its exception raised here."""
    if netns is None:
        return fn(*args)
    box: list[Any] = []

    def run() -> None:
        try:
            enter_netns(netns)
            box.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    t = threading.Thread(target=run, name=f"setns-{netns}", daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    result: _T = value
    return result
