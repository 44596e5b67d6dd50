"""ctnetlink's numbers and headers (``include/uapi/linux/netfilter/nfnetlink_conntrack.h``),
shared by the encoder and the decoder."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Final

from orchestrator.model.conntrack import (
    Tuple,
)

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_CTNETLINK: Final = 1
MSG_NEW: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 0  # IPCTNL_MSG_CT_NEW
MSG_GET: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 1
MSG_DELETE: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 2
MSG_GET_STATS: Final = (NFNL_SUBSYS_CTNETLINK << 8) | 5

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_DUMP: Final = 0x300
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400

NFNLGRP_CONNTRACK_NEW: Final = 1
NFNLGRP_CONNTRACK_UPDATE: Final = 2
NFNLGRP_CONNTRACK_DESTROY: Final = 3
ALL_CT_GROUPS: Final = 0b111  # bind() takes a bitmask of groups 1..3

NLA_F_NESTED: Final = 0x8000
NLA_TYPE_MASK: Final = 0x3FFF

# enum ctattr_type
CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_ID: Final = 12
CTA_NAT_SRC: Final = 6
CTA_ZONE: Final = 18
CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2
CTA_MARK_MASK: Final = 21
CTA_FILTER: Final = 25
CTA_STATUS_MASK: Final = 26
# enum ctattr_tuple, ctattr_ip, ctattr_l4proto
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_SRC: Final = 3
CTA_IP_V6_DST: Final = 4
CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTO_ICMP_ID: Final = 4
CTA_PROTO_ICMP_TYPE: Final = 5
CTA_PROTO_ICMP_CODE: Final = 6
CTA_PROTO_ICMPV6_ID: Final = 7
CTA_PROTO_ICMPV6_TYPE: Final = 8
CTA_PROTO_ICMPV6_CODE: Final = 9
# enum ctattr_protoinfo, ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: Final = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY: Final = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: Final = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY: Final = 5
# enum ctattr_filter; CTA_FILTER_F_* live in net/netfilter/nf_internals.h
CTA_FILTER_ORIG_FLAGS: Final = 1
CTA_FILTER_REPLY_FLAGS: Final = 2
CTA_FILTER_F_IP_SRC: Final = 1 << 0
CTA_FILTER_F_IP_DST: Final = 1 << 1
# enum ctattr_stats_global
CTA_STATS_GLOBAL_ENTRIES: Final = 1

HDR_LEN: Final = 20  # nlmsghdr + nfgenmsg
NLMSG_HDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq (wire order), portid
LEN_TYPE_FLAGS: Final = struct.Struct("=IHH")
NLA_HDR: Final = struct.Struct("=HH")
U8: Final = struct.Struct(">B")
BE16: Final = struct.Struct(">H")
BE32: Final = struct.Struct(">I")
ERRNO: Final = struct.Struct("=i")

PORT_PROTOS: Final = frozenset({6, 17, 33, 132, 136})  # TCP UDP DCCP SCTP UDPLITE
_AF: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


def wire_seq(seq: int) -> int:
    """The host-order value of a sequence number written in network order (an involution:
    it also maps a received ``nlmsg_seq`` back to ours)."""
    return int.from_bytes(seq.to_bytes(4, "big"), sys.byteorder)


def family_of(t: Tuple) -> int:
    """``AF_INET``/``AF_INET6`` for the tuple's addresses."""
    return _AF[t.src.version]


