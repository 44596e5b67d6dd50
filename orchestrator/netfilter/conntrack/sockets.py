"""ctnetlink sockets, opened inside a namespace by :func:`orchestrator.netns.in_netns`."""

from __future__ import annotations

import socket
from typing import Final

from orchestrator.netfilter import ctnetlink as nl
from orchestrator.netns import in_netns

_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33

CMD_RCVBUF: Final = 16 << 20  # holds every error report of one chunk, and dump skbs
CMD_SNDBUF: Final = 4 << 20  # one send may not exceed the send buffer
EVENTS_RCVBUF: Final = 64 << 20  # ~100k queued events before an overrun
RECV_BYTES: Final = 64 << 10  # the kernel fills dump skbs of at most 32 KiB


def _force_buf(sock: socket.socket, force_opt: int, plain_opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, plain_opt, size)


def _new_socket(groups: int, rcvbuf: int, sndbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
    try:
        _force_buf(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        _force_buf(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        # errors echo only the failing header, not the whole message
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def open_socket(
    netns: str | None, groups: int = 0, rcvbuf: int = CMD_RCVBUF, sndbuf: int = CMD_SNDBUF
) -> socket.socket:
    """A ctnetlink socket living in ``netns`` (the caller's thread does not move)."""
    return in_netns(netns, _new_socket, groups, rcvbuf, sndbuf)
