"""Sockets opened inside a namespace from the test process: a socket stays in the namespace
it was created in (``in_netns`` creates it from a short-lived thread that entered it)."""

from __future__ import annotations

import socket

from orchestrator.netns import in_netns


def socket_in(netns: str, family: int = socket.AF_INET,
              kind: int = socket.SOCK_STREAM) -> socket.socket:
    return in_netns(netns, socket.socket, family, kind)
