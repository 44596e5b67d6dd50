"""bench.vmtrace's pure half: tcpdump's lines (recorded from a bench.vm run) parsed, and one
move's timeline placed from QEMU's events, libvirt's, the packets and the flows' arrivals."""

from __future__ import annotations

from typing import Any

import pytest

from bench.vm import parse_tb_count
from bench.vmtrace import (
    MoveFacts,
    Packet,
    parse_capture,
    parse_dropped,
    parse_line,
    parse_pings,
    timeline,
)

GUEST_MAC = "52:54:00:00:02:01"
# real lines of `tcpdump -r capture.pcap -nn -e -tt` (-i any), n2 of a bench.vm run
RARP_ON_GONE_TAP = ("1796609099.984439 ?     B   ifindex 8 52:54:00:00:02:01 ethertype Reverse "
                    "ARP (0x8035), length 66: Reverse Request who-is 52:54:00:00:02:01 tell "
                    "52:54:00:00:02:01, length 46")
RARP_ON_PIPE = ("1796609099.984461 pipe0 Out ifindex 5 52:54:00:00:02:01 ethertype Reverse ARP "
                "(0x8035), length 66: Reverse Request who-is 52:54:00:00:02:01 tell "
                "52:54:00:00:02:01, length 46")
UDP_REPLY = ("1796609100.350826 ?     P   ifindex 8 52:54:00:00:02:01 ethertype IPv4 (0x0800), "
             "length 52: 10.5.5.201.9123 > 192.168.122.1.50498: UDP, length 4")
UDP_REQUEST_UPLINK = ("1796609090.656969 eth0  In  ifindex 3 8a:4f:ec:b9:ca:54 ethertype IPv4 "
                      "(0x0800), length 52: 192.168.122.1.50498 > 192.168.122.12.9123: UDP, "
                      "length 4")
ICMP_REPLY = ("1796609090.624239 pipe0 P   ifindex 5 52:54:00:00:02:01 ethertype IPv4 (0x0800), "
              "length 104: 10.5.5.201 > 10.5.5.252: ICMP echo reply, id 4247, seq 1, length 64")
TCP_ACK = ("1796609100.150263 ?     P   ifindex 8 52:54:00:00:02:01 ethertype IPv4 (0x0800), "
           "length 84: 10.5.5.201.8765 > 192.168.122.1.41678: Flags [.], ack 2233129958, "
           "win 4006, options [nop,nop,TS val 3234609422 ecr 4189619705,nop,nop,sack 1 "
           "{46:55}], length 0")
GW_GARP = ("1796609100.044473 ?     Out ifindex 8 0a:00:02:00:00:02 ethertype ARP (0x0806), "
           "length 48: Request who-has 10.5.5.254 tell 10.5.5.254, length 28")
ARP_REQUEST = ("1796609096.136794 pipe0 P   ifindex 5 52:54:00:00:02:01 ethertype ARP (0x0806), "
               "length 48: Request who-has 10.5.5.252 tell 10.5.5.201, length 28")


def test_parse_rarp_arp_udp_icmp_tcp() -> None:
    rarp = parse_line("n2", RARP_ON_GONE_TAP)
    assert rarp == Packet(1796609099.984439, "n2", "?", False, GUEST_MAC, "rarp")
    pipe = parse_line("n2", RARP_ON_PIPE)
    assert pipe is not None and pipe.ifname == "pipe0" and pipe.outbound
    udp = parse_line("n2", UDP_REPLY)
    assert udp is not None and (udp.proto, udp.src, udp.dst) == (
        "udp", "10.5.5.201.9123", "192.168.122.1.50498")
    req = parse_line("n2", UDP_REQUEST_UPLINK)
    assert req is not None and req.ifname == "eth0" and not req.outbound
    assert req.dst == "192.168.122.12.9123"
    icmp = parse_line("n2", ICMP_REPLY)
    assert icmp is not None and icmp.proto == "icmp-reply"
    tcp = parse_line("n2", TCP_ACK)
    assert tcp is not None and tcp.proto == "tcp"
    garp = parse_line("n2", GW_GARP)
    assert garp is not None and (garp.what, garp.proto, garp.arp_sender, garp.outbound) == (
        "arp", "arp-request", "10.5.5.254", True)
    arp = parse_line("n2", ARP_REQUEST)
    assert arp is not None and arp.arp_sender == "10.5.5.201"


@pytest.mark.parametrize("line", [
    "", "tcpdump: listening on any", "reading from file x.pcap, link-type LINUX_SLL2",
    # IPv6 and garbage are skipped, never misread
    "1796608372.729453 eth0  Out ifindex 4 8a:c7:13:39:a4:26 ethertype IPv6 (0x86dd), "
    "length 96: :: > ff02::16: HBH ICMP6, multicast listener report v2",
    "1796609100.350826 ?     P   ifindex 8 52:54:00:00:02:01 ethertype IPv4 (0x0800), "
    "length 52: truncated-ip",
])
def test_parse_skips_what_it_does_not_know(line: str) -> None:
    assert parse_line("n1", line) is None


def test_parse_capture_pings_and_summaries() -> None:
    assert len(parse_capture("n2", "\n".join([RARP_ON_PIPE, "junk", UDP_REPLY]))) == 2
    assert parse_pings("PING 10.5.5.201 (10.5.5.201) 56(84) bytes of data.\n"
                       "[1796609090.642454] 64 bytes from 10.5.5.201: icmp_seq=1 ttl=64 "
                       "time=24.3 ms\nno answer yet for icmp_seq=2\n") == [1796609090.642454]
    assert parse_dropped("15667 packets captured\n15855 packets received by filter\n"
                         "12 packets dropped by kernel\n") == 12
    assert parse_dropped("tcpdump: listening on any\n") == 0
    assert parse_tb_count("Translation buffer state:\ngen code size       12 kB\n"
                          "TB count            27876\nTB avg target size  14 max=1\n") == 27876
    assert parse_tb_count("error: no such command") is None


def pkt(at: float, node: str, ifname: str, outbound: bool, line_kind: str, **kw: Any) -> Packet:
    return Packet(at, node, ifname, outbound, kw.pop("mac", GUEST_MAC), line_kind, **kw)


def facts(**over: Any) -> MoveFacts:
    """n1 -> n2: QEMU stops the guest on n1 at 100.0 and resumes it on n2 at 100.3."""
    base: dict[str, Any] = dict(
        src="n1", dst="n2", window=(99.0, 105.0),
        qemu=[(100.0, "n1", "STOP", {}), (100.28, "n1", "MIGRATION", {"status": "completed"}),
              (100.27, "n2", "MIGRATION", {"status": "completed"}), (100.3, "n2", "RESUME", {}),
              (50.0, "n2", "RESUME", {})],  # an older move: outside the window
        lifecycle=[(100.01, "n1", 3, 1), (100.305, "n2", 4, 1)],
        downtime_ms=310.0,
        packets=[
            pkt(100.301, "n2", "vnet1", False, "rarp"),  # QEMU's announce on D's tap
            pkt(100.3015, "n3", "pipe0", False, "rarp"),
            pkt(100.302, "n1", "pipe0", False, "rarp"),
            pkt(99.8, "n3", "pipe0", False, "rarp"),  # before the stop: not this move's
            # the UDP flow through n1: its port seen on n1's uplink, then on D's tap
            pkt(99.5, "n1", "eth0", False, "ip", mac="8a:00:00:00:00:01", proto="udp",
                src="192.168.122.1.5000", dst="192.168.122.11.9123"),
            pkt(100.33, "n2", "vnet1", True, "ip", mac="0a:00:02:00:00:02", proto="udp",
                src="192.168.122.1.5000", dst="10.5.5.201.9123"),
            pkt(100.35, "n2", "vnet1", True, "arp", mac="0a:00:02:00:00:02",
                proto="arp-request", arp_sender="10.5.5.254"),
            pkt(100.36, "n2", "vnet1", False, "ip", proto="icmp-reply", src="10.5.5.201",
                dst="10.5.5.252"),
            pkt(100.8, "n2", "vnet1", False, "ip", proto="udp", src="10.5.5.201.9123",
                dst="192.168.122.1.5000"),
            pkt(100.8005, "n2", "eth0", True, "ip", mac="0a:00:02:00:00:02", proto="udp",
                src="192.168.122.11.9123", dst="192.168.122.1.5000"),
        ],
        pings={"n2": [99.9, 100.36, 100.38], "n1": [100.0]},
        arrivals={"udp@n1": [99.9, 99.95, 100.801, 100.85], "ssh@n1": [99.9, 101.0]},
        guest_mac=GUEST_MAC, guest_ip="10.5.5.201", gateway="10.5.5.254",
        pipes=frozenset({"pipe0"}), uplinks=frozenset({"eth0", "xenbr0"}),
        node_pub={"n1": "192.168.122.11", "n2": "192.168.122.12"}, udp_port=9123,
        cutover_at=100.36)
    return MoveFacts(**{**base, **over})


def test_timeline_places_each_step_from_the_resume() -> None:
    tl = timeline(facts())
    assert tl["qemu_pause_ms"] == 300.0
    assert tl["events_pause_ms"] == 295.0
    assert tl["libvirt_downtime_ms"] == 310.0
    assert tl["steps_ms"] == {"src_stop": -300.0, "src_suspended_event": -290.0,
                              "src_stream_done": -20.0, "dst_loaded": -30.0,
                              "dst_resume": 0.0, "dst_resumed_event": 5.0,
                              "cutover_committed": 60.0}
    # the RARP: on D's tap, and at the others' pipes (the one before the stop is not it)
    assert tl["rarp_reached_ms"] == {"n1": 2.0, "n2": 1.0, "n3": 1.5}
    assert tl["guest_first_ms"] == {"any": 60.0, "icmp-reply": 60.0, "udp": 500.0}
    assert tl["gateway_garp_ms"] == 50.0
    assert tl["ping_first_reply_ms"] == {"n1": None, "n2": 60.0}
    assert tl["udp"] == {"udp@n1": {
        "last_before_ms": -350.0, "first_after_ms": 501.0, "request_on_dst_tap_ms": 30.0,
        "dark_ms": 851.0, "guest_reply_on_dst_tap_ms": 500.0, "replied_out_via": ["n2"]}}


def test_timeline_without_a_resume_says_so() -> None:
    assert timeline(facts(qemu=[], lifecycle=[])) == {
        "error": "no resume seen on the destination"}


def test_timeline_falls_back_to_libvirt_events() -> None:
    tl = timeline(facts(qemu=[]))  # no QEMU events: libvirt's resume event is the zero
    assert tl["qemu_pause_ms"] is None
    assert tl["steps_ms"]["dst_resumed_event"] == 0.0
    assert tl["guest_first_ms"]["udp"] == 495.0


def test_gap_bound_names_what_the_target_runs_into() -> None:
    from bench.vm import gap_bound

    m = {"downtime_ms": 300.0, "flows": {"udp@n1": 700.0, "ssh@n1": 900.0, "udp@n2": 650.0},
         "timeline": {"qemu_pause_ms": 290.0, "guest_first_ms": {"udp": 380.0},
                      "udp": {"udp@n1": {"dark_ms": 700.0}, "udp@n2": {"dark_ms": 650.0},
                              "udp@n3": {"dark_ms": None}}}}
    assert gap_bound(m, 60.0) == {
        "target_ms": 550.0, "udp_dark_ms": 700.0, "qemu_pause_ms": 290.0,
        "guest_first_udp_reply_ms": 380.0, "warm_guest_first_udp_reply_ms": 60.0,
        "tcp_over_udp_dark_ms": 200.0}
    empty = gap_bound({"downtime_ms": None, "flows": {}, "timeline": {"error": "x"}}, None)
    assert empty["target_ms"] is None and empty["udp_dark_ms"] is None


def test_cpu_between_interpolates_and_refuses_what_it_did_not_see() -> None:
    from bench.vmtrace import cpu_after, cpu_between

    xs = [(10.0, 1.0), (10.1, None), (10.2, 1.2), (10.4, 1.3)]
    assert cpu_between(xs, 10.1, 10.3) == pytest.approx(0.15)
    assert cpu_between(xs, 9.9, 10.3) is None  # before the first sample
    assert cpu_between(xs, 10.3, 10.5) is None  # after the last
    assert cpu_between([(1.0, 5.0), (2.0, 4.0)], 1.0, 2.0) == 0.0  # a new pid: never < 0
    assert cpu_after({"qemu@n2": xs, "gone": []}, 10.0, 0.4) == {"qemu@n2": 300, "gone": None}
