"""The conntrack table seam: plain ``Entry`` dataclasses in and out.

- ``base``: the :class:`Conntrack` protocol the core programs against, and its values
  (results, errors, ``OVERRUN``, ``AddressMatch``);
- ``table``: :class:`ConntrackTable`, the kernel's table of one namespace, built from
  ``sockets`` (opened inside the namespace), ``batch`` (the pipelined batch of messages),
  ``dump`` (receiving beside decoding) and ``events`` (the live stream);
- ``fake``: :class:`FakeConntrack`, in memory, held to the kernel's behaviour by one
  contract suite (``tests/functional/test_conntrack_contract.py``).
"""

from __future__ import annotations

from .base import (
    OVERRUN,
    AddressMatch,
    BatchResult,
    Conntrack,
    EntryError,
    Events,
    Overrun,
    Policy,
    PushResult,
    netlink_error,
)
from .events import EventStream
from .sockets import open_socket
from .table import ConntrackTable

__all__ = [
    "OVERRUN",
    "AddressMatch",
    "BatchResult",
    "Conntrack",
    "ConntrackTable",
    "EntryError",
    "EventStream",
    "Events",
    "Overrun",
    "Policy",
    "PushResult",
    "netlink_error",
    "open_socket",
]
