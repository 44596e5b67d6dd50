"""ctnetlink codec: conntrack ``Entry`` <-> netlink message bytes. Pure: no sockets, no root.

``attrs`` holds the numbers and headers, ``encode`` and ``decode`` the two directions; the
package is their one namespace (``from orchestrator.netfilter import ctnetlink as nl``).

A message is an ``nlmsghdr`` (host order), an ``nfgenmsg``, then attributes whose payloads are
in network order (``include/uapi/linux/netfilter/nfnetlink_conntrack.h``).

Speed matters here (a migration moves whole tables), so both directions avoid per-attribute
Python work on the common shapes:
- encoding: IPv4 TCP/UDP entries are one ``struct.pack`` with the constant headers passed as
  byte strings; everything else goes through the readable ``nla``/``nest`` builders, which
  also serve as the reference the fast path is tested against;
- decoding: the kernel sends every entry of one shape with the same attribute layout, so the
  first message of a shape is walked once to learn where each field sits (``learn_layout``)
  and a decoder is generated for it (as ``dataclasses`` generates ``__init__``): it checks
  the header words of each following message with one unpack, reads the fields with another
  and decodes whole runs of same-shaped messages in one call. ``decode_entry_ref`` is the
  plain walk-and-construct reference it is tested against.

Sequence numbers travel in network byte order (``wire_seq``): the kernel only echoes them, and
a fixed byte order lets the whole message be one big-endian ``struct``.
"""

from __future__ import annotations

from .attrs import *  # noqa: F403 (the package is the codec's one namespace: ``nl.X``)
from .decode import *  # noqa: F403
from .encode import *  # noqa: F403
