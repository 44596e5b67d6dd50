"""systemd's service notification protocol (``sd_notify(3)``): one datagram of
``KEY=VALUE`` lines to the Unix socket named in ``$NOTIFY_SOCKET``. systemd documents the
protocol as stable and meant to be spoken without libsystemd; a few lines of stdlib do it.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        raw = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: its name starts with a NUL byte
        self.address = "\0" + raw[1:] if raw.startswith("@") else raw
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """``send(READY=1, STATUS="...")``; False when there is no one to tell."""
        if not self.address:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(self.address)
            s.sendall(message)
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        # MONOTONIC_USEC: what Type=notify-reload (systemd >= 253) wants with RELOADING=1
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)
