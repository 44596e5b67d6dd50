"""Sockets opened inside a namespace from the test process: a socket stays in the namespace
it was created in, so a short-lived thread enters the namespace, creates it, and returns."""

from __future__ import annotations

import socket
import threading

from orchestrator.netfilter.conntrack import enter_netns


def socket_in(netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    box: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            enter_netns(netns)  # this thread only
            box.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller
            box.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
