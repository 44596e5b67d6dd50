"""Recordings under ``tests/data``: what real kernels, daemons and hypervisors sent."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def recvs(name: str, kind: str = "ctnetlink") -> list[bytes]:
    """The ``recv`` buffers of a ``.hex`` recording, in order: one hex line each, ``#``
    lines say what happened before the next one."""
    text = (DATA / kind / name).read_text()
    return [bytes.fromhex(line) for line in text.splitlines()
            if line.strip() and not line.startswith("#")]
