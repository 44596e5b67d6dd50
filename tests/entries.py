"""Conntrack entries for tests, shaped as the handover pushes them (answered, assured,
confirmed; ESTABLISHED TCP with window scaling)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address

from orchestrator.model.conntrack import Entry, Proto, Status, TcpFlag, TcpInfo, TcpState, Tuple

PUSHED = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
WSCALE = TcpFlag.WINDOW_SCALE


def tcp(src: str, dst: str, sport: int, dport: int = 80, **kw: object) -> Entry:
    o = Tuple.of(src, dst, Proto.TCP, sport, dport)
    info = TcpInfo(TcpState.ESTABLISHED, 7, 6, WSCALE, WSCALE)
    return replace(Entry(o, o.reversed(), PUSHED, 0, 300, 0, info), **kw)  # type: ignore[arg-type]


def udp(src: str, dst: str, sport: int, dport: int = 53, **kw: object) -> Entry:
    o = Tuple.of(src, dst, Proto.UDP, sport, dport)
    return replace(Entry(o, o.reversed(), PUSHED, 0, 120, 0), **kw)  # type: ignore[arg-type]


def icmp(src: str, dst: str, ident: int, **kw: object) -> Entry:
    o = Tuple(ip_address(src), ip_address(dst), Proto.ICMP, ident, 0, 8, 0)
    return replace(Entry(o, o.reversed(), PUSHED, 0, 30, 0), **kw)  # type: ignore[arg-type]
