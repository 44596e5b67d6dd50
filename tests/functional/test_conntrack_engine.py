"""The conntrack engine against the real kernel, in throwaway namespaces. Everything the
engine claims is checked with a second tool: ``conntrack -L -o xml`` (conntrack-tools), or
pyroute2 for TCP flags, which conntrack does not print. What the core relies on, read
through the engine itself, is the contract suite (``test_conntrack_contract.py``)."""

from __future__ import annotations

import errno
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import replace
from ipaddress import ip_address

import pytest

from orchestrator.errors import NetlinkError
from orchestrator.model.conntrack import (
    Entry,
    Proto,
    Status,
    TcpFlag,
    Tuple,
)
from orchestrator.netfilter.conntrack import OVERRUN, ConntrackTable, Overrun
from tests.entries import PUSHED, WSCALE, icmp, tcp, udp

pytestmark = pytest.mark.root


def sh(ns: str, *cmd: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True
    ).stdout


def conntrack_xml(ns: str, *args: str) -> dict[tuple[str, str, int, int, int], dict[str, str]]:
    """``conntrack -L -o xml``, keyed by (orig src, orig dst, proto, sport, dport); its XML
    has no ICMP id, so ICMP flows key with zeros."""
    flows = {}
    for flow in ET.fromstring(sh(ns, "conntrack", "-L", "-o", "xml", *args)).iter("flow"):
        meta = {m.get("direction"): m for m in flow.iter("meta")}
        orig, reply, ind = meta["original"], meta["reply"], meta["independent"]
        l4 = orig.find("layer4")
        assert l4 is not None
        key = (orig.findtext("layer3/src"), orig.findtext("layer3/dst"),
               int(l4.get("protonum", "0")), int(l4.findtext("sport") or 0),
               int(l4.findtext("dport") or 0))  # fmt: skip
        info = {child.tag: child.text or "" for child in ind}
        info["reply_src"] = reply.findtext("layer3/src") or ""
        info["reply_dst"] = reply.findtext("layer3/dst") or ""
        flows[key] = info  # type: ignore[index]
    return flows  # type: ignore[return-value]


def key_of(e: Entry) -> tuple[str, str, int, int, int]:
    o = e.tuple_orig
    ports = (0, 0) if o.proto == Proto.ICMP else (o.sport, o.dport)
    return (str(o.src), str(o.dst), o.proto, *ports)


def keys(entries: Iterable[Entry]) -> set[tuple[Tuple, int]]:
    return {e.key for e in entries}


@pytest.fixture
def table(netns: Callable[[str], str]) -> ConntrackTable:
    return ConntrackTable(netns("ct"))


# --- push ------------------------------------------------------------------------------------


def test_push_tcp_udp_icmp_seen_by_conntrack(table: ConntrackTable) -> None:
    pushed = [
        tcp("10.5.5.2", "198.51.100.7", 40000, mark=7, timeout=250),
        udp("10.5.5.2", "198.51.100.8", 5353, timeout=60),
        icmp("10.5.5.2", "198.51.100.9", 77, zone=5),
    ]
    result = table.push(pushed)
    assert (result.created, result.errors) == (3, [])
    assert table.netns is not None
    seen = conntrack_xml(table.netns)
    t, u, i = (seen[key_of(e)] for e in pushed)
    assert (t["state"], t["mark"], "assured" in t) == ("ESTABLISHED", "7", True)
    assert 245 <= int(t["timeout"]) <= 250
    assert 55 <= int(u["timeout"]) <= 60 and u["mark"] == "0" and "assured" in u
    assert i["zone"] == "5" and "unreplied" not in i
    # and our own dump reads back what was pushed (timeouts have ticked)
    back = {e.key: e for e in table.dump()}
    for e in pushed:
        got = back[e.key]
        assert replace(got, timeout=e.timeout) == e
    assert table.count() == 3


def test_push_ipv6(table: ConntrackTable) -> None:
    e = tcp("2001:db8::2", "2001:db8:1::7", 40001, mark=3)
    assert table.push([e]).created == 1
    assert table.netns is not None
    assert "src=2001:db8::2" in sh(table.netns, "conntrack", "-L", "-f", "ipv6")
    [got] = table.dump()
    assert replace(got, timeout=e.timeout) == e


def test_existing_entry_update_and_fail_policies(table: ConntrackTable) -> None:
    first = tcp("10.5.5.2", "198.51.100.7", 40000, mark=1, timeout=100)
    again = replace(first, mark=2, timeout=900)
    assert table.push([first]).created == 1
    failed = table.push([again], policy="fail")
    assert [(err.entry, err.errno) for err in failed.errors] == [(again, errno.EEXIST)]
    result = table.push([again], policy="update")
    assert (result.created, result.updated, result.errors) == (0, 1, [])
    assert table.netns is not None
    flow = conntrack_xml(table.netns)[key_of(first)]
    assert flow["mark"] == "2" and int(flow["timeout"]) > 800


def test_replace_turns_an_entry_pointing_the_other_way(table: ConntrackTable) -> None:
    ours = tcp("10.5.5.2", "198.51.100.7", 40000, mark=5)
    # D saw the flow from the other side first: its entry's orig is our reply tuple
    theirs = Entry(ours.tuple_reply, ours.tuple_orig, PUSHED, 0, 300, 0, ours.tcp)
    same_way = tcp("10.5.5.2", "198.51.100.7", 40001)
    assert table.push([theirs, same_way]).created == 2
    result = table.push([ours, replace(same_way, mark=9)], policy="replace")
    assert (result.created, result.replaced, result.updated, result.errors) == (0, 1, 1, [])
    assert table.netns is not None
    seen = conntrack_xml(table.netns)
    assert seen[key_of(ours)]["mark"] == "5"  # now keyed the right way round
    assert key_of(theirs) not in seen
    assert seen[key_of(same_way)]["mark"] == "9"


def test_update_keeps_an_entry_pointing_the_other_way(table: ConntrackTable) -> None:
    """The contrast to ``replace``: ``set`` edits the entry it finds, direction and all."""
    ours = tcp("10.5.5.2", "198.51.100.7", 40000, mark=5)
    theirs = Entry(ours.tuple_reply, ours.tuple_orig, PUSHED, 0, 300, 0, ours.tcp)
    table.push([theirs])
    assert table.push([ours], policy="update").updated == 1
    assert table.netns is not None
    seen = conntrack_xml(table.netns)
    assert key_of(ours) not in seen and seen[key_of(theirs)]["mark"] == "5"


def test_one_bad_entry_in_a_batch_of_1000_is_reported_alone(table: ConntrackTable) -> None:
    batch = [tcp("10.6.0.1", f"10.7.{i // 250}.{i % 250}", 20000 + i) for i in range(1000)]
    bad = replace(batch[500], status=Status.SEEN_REPLY | Status.ASSURED)  # no CONFIRMED
    batch[500] = bad
    result = table.push(batch)
    assert result.created == 999
    assert [err.entry for err in result.errors] == [bad]
    assert result.errors[0].errno in (errno.EBUSY, errno.EINVAL)
    assert table.netns is not None
    assert int(sh(table.netns, "conntrack", "-C")) == 999


# --- dumps -----------------------------------------------------------------------------------


@pytest.fixture
def live(netns: Callable[[str], str]) -> tuple[str, list[Entry]]:
    """Namespace A with real flows to B over a veth (ICMP, UDP, UDP SNATed to .5) plus
    synthetic entries across addresses, marks and zones."""
    a, b = netns("ca"), netns("cb")
    subprocess.run(["ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "vb",
                    "netns", b], check=True)  # fmt: skip
    for ns, dev, addr in ((a, "va", "10.77.0.1/24"), (b, "vb", "10.77.0.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    nat = (
        "add table ip nat\n"
        "add chain ip nat post { type nat hook postrouting priority 100; }\n"
        "add rule ip nat post udp dport 9999 snat to 10.77.0.5\n"
    )
    subprocess.run(["ip", "netns", "exec", a, "nft", "-f", "-"], input=nat, text=True, check=True)
    sh(a, "ping", "-c", "1", "-W", "2", "10.77.0.2")
    send = "import socket; s=socket.socket(2,2); [s.sendto(b'x', ('10.77.0.2', p)) for p in (9998, 9999)]"
    sh(a, "python3", "-c", send)
    synthetic = [
        tcp(f"10.60.0.{i % 4}", f"10.61.0.{i % 5}", 30000 + i, mark=i % 3, zone=(i % 2) * 5)
        for i in range(120)
    ] + [udp("10.60.0.9", "10.77.0.1", 4000 + i) for i in range(5)]
    table = ConntrackTable(a)
    assert table.push(synthetic).created == len(synthetic)
    return a, synthetic


@pytest.mark.parametrize("address_path", ["kernel", "userspace"])
def test_filtered_dumps_return_exactly_the_matching_entries(
    live: tuple[str, list[Entry]], address_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Address dumps either way (kernel-filtered walks, or a full dump checked here; the
    engine picks by table size) and kernel mark/status/zone filters."""
    import orchestrator.netfilter.conntrack.dump as engine

    monkeypatch.setattr(engine, "filtered_is_cheaper", lambda k, n: address_path == "kernel")
    ns, _synthetic = live
    table = ConntrackTable(ns)
    everything = table.dump()
    real = [e for e in everything if e.tuple_orig.src == ip_address("10.77.0.1")]
    assert {e.tuple_orig.proto for e in real} == {Proto.ICMP, Proto.UDP} and len(real) == 3

    def expect(pred: Callable[[Entry], bool]) -> set[tuple[Tuple, int]]:
        return keys(e for e in everything if pred(e))

    a1, a5, s3 = ip_address("10.77.0.1"), ip_address("10.77.0.5"), ip_address("10.60.0.3")
    got_a1 = table.dump(addresses=["10.77.0.1"])
    assert keys(got_a1) == expect(lambda e: a1 in e.addresses())
    assert len(got_a1) == 3 + 5  # real flows, and synthetic UDP towards .1
    [snat] = table.dump(addresses=["10.77.0.5"])  # only in the reply tuple
    assert snat.is_src_nat and snat.tuple_reply.dst == a5
    assert keys(table.dump(addresses=["10.60.0.3", "10.77.0.5"])) == expect(
        lambda e: bool({s3, a5} & e.addresses())
    )
    many = ["10.60.0.0", "10.60.0.1", "10.60.0.2", "10.77.0.5", "10.99.9.9"]  # > 3: full dump
    want = {ip_address(a) for a in many}
    assert keys(table.dump(addresses=many)) == expect(lambda e: bool(want & e.addresses()))
    assert keys(table.dump(mark=2)) == expect(lambda e: e.mark == 2)
    assert keys(table.dump(mark=0, mark_mask=1)) == expect(lambda e: e.mark & 1 == 0)
    assert keys(table.dump(zone=5)) == expect(lambda e: e.zone == 5)
    assert keys(table.dump(zone=0)) == expect(lambda e: e.zone == 0)
    assert keys(table.dump(status=Status.SRC_NAT)) == {snat.key}
    assert keys(table.dump(addresses=["10.60.0.3"], mark=1)) == expect(
        lambda e: s3 in e.addresses() and e.mark == 1
    )
    # the second tool agrees on the subsets conntrack can select
    assert len(conntrack_xml(ns, "-m", "2")) == len(table.dump(mark=2))
    assert len(conntrack_xml(ns, "-s", "10.77.0.1")) == 3
    assert len(table.dump(addresses=["10.99.9.9"])) == 0


# --- changes ---------------------------------------------------------------------------------


def test_set_mark_liberal_and_delete(table: ConntrackTable) -> None:
    from pyroute2 import NFCTSocket

    flows = [tcp("10.5.5.2", "198.51.100.7", 41000 + i) for i in range(10)]
    flows += [udp("10.5.5.2", "198.51.100.8", 5000 + i) for i in range(2)]
    table.push(flows)
    assert table.netns is not None
    assert table.set_mark(flows[:5], 0x42).done == 5
    marks = {k: f["mark"] for k, f in conntrack_xml(table.netns).items()}
    assert [marks[key_of(e)] for e in flows] == ["66"] * 5 + ["0"] * 7

    assert table.set_liberal(flows).done == 10  # the UDP entries are skipped
    with NFCTSocket(netns=table.netns) as pr2:
        for msg in pr2.dump():
            info = msg.get_attr("CTA_PROTOINFO")
            if info is None:
                continue
            tcp_info = info.get_attr("CTA_PROTOINFO_TCP")
            for attr in ("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", "CTA_PROTOINFO_TCP_FLAGS_REPLY"):
                flags, _mask = tcp_info.get_attr(attr)
                assert flags == TcpFlag.BE_LIBERAL | WSCALE  # added; WINDOW_SCALE kept

    assert table.delete(flows[:2]).done == 2
    assert key_of(flows[0]) not in conntrack_xml(table.netns)
    again = table.delete(flows[:2], missing_ok=False)
    assert {err.errno for err in again.errors} == {errno.ENOENT} and len(again.errors) == 2
    assert table.delete(flows[:2]).ok  # idempotent by default
    assert table.get(flows[2]) is not None and table.get(flows[0]) is None


def test_flush_by_mark(table: ConntrackTable) -> None:
    table.push([tcp("10.5.5.2", "198.51.100.7", 42000 + i, mark=i % 2) for i in range(10)])
    table.flush(mark=1)
    assert table.netns is not None
    assert {f["mark"] for f in conntrack_xml(table.netns).values()} == {"0"}
    assert table.count() == 5


def test_missing_namespace_is_a_readable_error() -> None:
    with pytest.raises(NetlinkError, match="does not exist"):
        ConntrackTable("cvt-no-such-namespace").dump()


# --- events ----------------------------------------------------------------------------------


def test_overrun_is_detected_and_a_dump_resyncs(table: ConntrackTable) -> None:
    burst = [tcp("10.8.0.1", f"10.9.{i // 250}.{i % 250}", 44000 + i) for i in range(3000)]
    stream, before = table.subscribe_and_dump()
    with stream:
        stream_small = table.events(rcvbuf=8192)  # far too small for 3000 events
        with stream_small:
            assert table.push(burst).created == 3000
            small: list[object] = []
            while chunk := stream_small.read(timeout=0.2):
                small += chunk
            big: list[object] = []
            while chunk := stream.read(timeout=0.2):
                big += chunk
    assert before == []
    assert any(isinstance(ev, Overrun) for ev in small) and stream_small.overruns >= 1
    assert len([ev for ev in small if ev is not OVERRUN]) < 3000
    # the default buffer held the whole burst, and after an overrun a dump recovers the set
    assert OVERRUN not in big and len(big) == 3000
    assert keys(table.dump()) == keys(burst)


def test_helper_and_thread_dumps_agree(
    table: ConntrackTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.netfilter.conntrack.dump as engine

    pushed = [
        tcp(f"10.4.{i // 250}.{i % 250}", "198.51.100.7", 46000 + i % 1000) for i in range(3000)
    ]
    table.push(pushed)
    monkeypatch.setattr(engine, "HELPER_MIN_ENTRIES", 1)  # unfiltered: the helper process
    via_helper = table.dump()
    monkeypatch.setattr(engine, "HELPER_MIN_ENTRIES", 10**9)  # the receiver thread
    via_thread = table.dump()
    assert keys(via_helper) == keys(via_thread) == keys(pushed)
    assert len(via_helper) == len(via_thread) == 3000
    assert table.count() == 3000  # the socket is still usable after the helper's dump
