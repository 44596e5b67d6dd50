"""Where a live migration's dark time goes (bench.vm's per-move timeline).

I/O: one ``tcpdump -i any`` and one ``ping`` in every node's namespace for the whole tour
(:class:`Tracer`). Pure: the capture's lines parsed (:func:`parse_line`) and one move's
timeline put together from QEMU's own events, libvirt's lifecycle events, the packets,
the pings and the flows' arrivals (:func:`timeline`), every time in ms relative to the
guest's resume on the destination (QEMU's ``RESUME`` there), so a negative figure happened
while the guest was still paused.

What the capture shows (linux cooked capture on ``any``: the interface, the direction and
the *source* MAC of every frame): the RARP QEMU sends for the guest on the destination and
where it reaches each node (its pipe, or its tap), the guest's first frames after the
resume on the destination's tap (kernel: ICMP, TCP; userspace: the Python UDP server's
reply), the gratuitous ARP for the gateway (convergent's), and which node's uplink carries
each UDP flow's replies out (the guest's gateway: hair-pinning through the source or not).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PING_INTERVAL_S = 0.025
# guest-sourced frames, the UDP flows at every hop (before DNAT and after the spoof rule),
# every ARP/RARP and ICMP: enough to place each step, light enough for a loaded machine
CAPTURE_FILTER = "src host {guest} or udp port {udp} or arp or rarp or icmp"


@dataclass(frozen=True)
class Packet:
    at: float
    node: str
    ifname: str
    outbound: bool  # "Out" on that interface (else In / broadcast / multicast / other host)
    src_mac: str
    what: str  # "rarp", "arp", "ip"
    src: str = ""  # IP (with .port for TCP/UDP, as tcpdump prints it)
    dst: str = ""
    proto: str = ""  # "udp", "tcp", "icmp-request", "icmp-reply", "arp-request", ...
    arp_sender: str = ""  # the IP an ARP frame speaks for


_LINE = re.compile(r"^(?P<at>\d+\.\d+) (?P<ifname>\S+)\s+(?P<dir>In|Out|B|M|P)\s+"
                   r"(?:ifindex \d+ )?(?P<mac>[0-9a-f:]{17}) ethertype (?P<etype>.+?) "
                   r"\(0x(?P<hex>[0-9a-f]{4})\), length \d+: (?P<rest>.*)$")
_IP = re.compile(r"^(?P<src>[\d.]+) > (?P<dst>[\d.]+): (?P<info>.*)$")
_ARP_REQ = re.compile(r"Request who-has \S+ tell (?P<ip>[\d.]+)")
_ARP_REP = re.compile(r"Reply (?P<ip>[\d.]+) is-at")


def parse_line(node: str, line: str) -> Packet | None:
    """One line of ``tcpdump -i any -nn -e -tt`` (4.99); None for anything else."""
    m = _LINE.match(line.strip())
    if m is None:
        return None
    base = {"at": float(m["at"]), "node": node, "ifname": m["ifname"],
            "outbound": m["dir"] == "Out", "src_mac": m["mac"]}
    rest, etype = m["rest"], m["hex"]
    if etype == "8035":
        return Packet(**base, what="rarp")  # type: ignore[arg-type]
    if etype == "0806":
        req, rep = _ARP_REQ.search(rest), _ARP_REP.search(rest)
        sender = req["ip"] if req else rep["ip"] if rep else ""
        return Packet(**base, what="arp",  # type: ignore[arg-type]
                      proto="arp-request" if req else "arp-reply", arp_sender=sender)
    if etype != "0800":
        return None
    rest = rest.removeprefix("IP ")
    ip = _IP.match(rest)
    if ip is None:
        return None
    info = ip["info"]
    proto = ("udp" if info.startswith("UDP") else
             "icmp-reply" if "ICMP echo reply" in info else
             "icmp-request" if "ICMP echo request" in info else
             "tcp" if info.startswith("Flags") else "other")
    return Packet(**base, what="ip", src=ip["src"], dst=ip["dst"],  # type: ignore[arg-type]
                  proto=proto)


def parse_capture(node: str, text: str) -> list[Packet]:
    return [p for p in (parse_line(node, ln) for ln in text.splitlines()) if p is not None]


_DROPPED = re.compile(r"^(\d+) packets dropped by kernel", re.M)


def parse_dropped(text: str) -> int:
    """What tcpdump's exit summary says the kernel dropped (0 when it says nothing)."""
    return sum(int(m) for m in _DROPPED.findall(text))


_PING = re.compile(r"^\[(?P<at>\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=\d+")


def parse_pings(text: str) -> list[float]:
    """The reply times of ``ping -D``."""
    return [float(m["at"]) for m in map(_PING.match, text.splitlines()) if m]


# the timeline ------------------------------------------------------------------------
@dataclass(frozen=True)
class MoveFacts:
    """What one move's timeline is computed from."""

    src: str
    dst: str
    window: tuple[float, float]  # wall clock: the move's start, its end + settle
    qemu: Sequence[tuple[float, str, str, Mapping[str, Any]]]  # (QEMU ts, node, event, data)
    lifecycle: Sequence[tuple[float, str, int, int]]  # (arrival, node, event, detail)
    downtime_ms: float | None  # libvirt's
    packets: Sequence[Packet]
    pings: Mapping[str, Sequence[float]]  # node -> reply times
    arrivals: Mapping[str, Sequence[float]]  # flow name -> arrival times at the client
    guest_mac: str
    guest_ip: str
    gateway: str
    pipes: frozenset[str]  # the cluster pipes' interface names
    uplinks: frozenset[str]  # the uplink bridge and its port
    node_pub: Mapping[str, str]  # node -> public address
    udp_port: int
    cutover_at: float | None = None  # convergent's cutover commit (audit log)


def _ms(at: float | None, zero: float) -> float | None:
    return None if at is None else round((at - zero) * 1000, 1)


def _first(xs: Iterable[float]) -> float | None:
    return min(xs, default=None)


def _qemu(f: MoveFacts, node: str, event: str, status: str | None = None) -> float | None:
    lo, hi = f.window
    return _first(at for at, n, e, data in f.qemu if n == node and e == event
                  and lo <= at <= hi and (status is None or data.get("status") == status))


def _life(f: MoveFacts, node: str, event: int) -> float | None:
    lo, hi = f.window
    return _first(at for at, n, e, _d in f.lifecycle if n == node and e == event
                  and lo <= at <= hi)


def is_tap(ifname: str) -> bool:
    """libvirt names the tap of a bridge interface vnetN; a tap gone by the time the
    capture is read prints as "?" (nothing else in a node's namespace goes away)."""
    return ifname.startswith("vnet") or ifname == "?"


def timeline(f: MoveFacts) -> dict[str, Any]:
    """One move, located: QEMU's and libvirt's steps, the L2 announce, the guest's first
    frames, and each UDP flow's dark window at its client, in ms from the resume."""
    stop = _qemu(f, f.src, "STOP")
    resume = _qemu(f, f.dst, "RESUME")
    ev_suspended, ev_resumed = _life(f, f.src, 3), _life(f, f.dst, 4)
    zero = resume or ev_resumed
    if zero is None:
        return {"error": "no resume seen on the destination"}
    lo, hi = f.window
    after_stop = stop or lo
    pk = [p for p in f.packets if lo <= p.at <= hi]
    out: dict[str, Any] = {
        "qemu_pause_ms": round((zero - stop) * 1000, 1) if stop is not None else None,
        "events_pause_ms": (round((ev_resumed - ev_suspended) * 1000, 1)
                            if ev_resumed and ev_suspended else None),
        "libvirt_downtime_ms": f.downtime_ms,
        "steps_ms": {
            "src_stop": _ms(stop, zero),
            "src_suspended_event": _ms(ev_suspended, zero),
            "src_stream_done": _ms(_qemu(f, f.src, "MIGRATION", "completed"), zero),
            "dst_loaded": _ms(_qemu(f, f.dst, "MIGRATION", "completed"), zero),
            "dst_resume": 0.0 if resume else None,
            "dst_resumed_event": _ms(ev_resumed, zero),
            "cutover_committed": _ms(f.cutover_at, zero),
        },
    }
    rarp = {p.node: p.at for p in sorted(pk, key=lambda p: p.at, reverse=True)
            if p.what == "rarp" and p.src_mac == f.guest_mac and p.at >= after_stop
            and ((p.node == f.dst and is_tap(p.ifname)) or p.ifname in f.pipes)}
    out["rarp_reached_ms"] = {n: _ms(at, zero) for n, at in sorted(rarp.items())}
    from_guest = [p for p in pk if p.node == f.dst and is_tap(p.ifname) and not p.outbound
                  and p.at >= zero and p.what != "rarp"]
    firsts: dict[str, float] = {}
    for p in sorted(from_guest, key=lambda p: p.at):
        kind = p.proto if p.what == "ip" else p.what
        firsts.setdefault("any", p.at)
        firsts.setdefault(kind, p.at)
    out["guest_first_ms"] = {k: _ms(v, zero) for k, v in firsts.items()}
    garp = _first(p.at for p in pk if p.node == f.dst and is_tap(p.ifname) and p.outbound
                  and p.what == "arp" and p.arp_sender == f.gateway and p.at >= after_stop)
    out["gateway_garp_ms"] = _ms(garp, zero)
    out["ping_first_reply_ms"] = {n: _ms(_first(t for t in ts if t >= zero), zero)
                                  for n, ts in sorted(f.pings.items())}
    out["udp"] = {name: _udp_flow(f, pk, name, arr, zero)
                  for name, arr in sorted(f.arrivals.items()) if name.startswith("udp@")}
    return out


def _udp_flow(f: MoveFacts, pk: Sequence[Packet], name: str, arrivals: Sequence[float],
              zero: float) -> dict[str, Any]:
    """A UDP flow's dark window at its client, the guest's first reply to it on the
    destination's tap, and which node's uplink carried that reply out."""
    entry = name.partition("@")[2]
    pub = f.node_pub.get(entry, "")
    before = max((a for a in arrivals if a < zero), default=None)
    after = _first(a for a in arrivals if a >= zero)
    ports = {p.src.rpartition(".")[2] for p in pk if p.node == entry
             and p.ifname in f.uplinks and not p.outbound and p.proto == "udp"
             and p.dst == f"{pub}.{f.udp_port}"}
    reply = _first(p.at for p in pk if p.node == f.dst and is_tap(p.ifname)
                   and not p.outbound and p.proto == "udp" and p.at >= zero
                   and p.src == f"{f.guest_ip}.{f.udp_port}"
                   and p.dst.rpartition(".")[2] in ports)
    out_via = sorted({p.node for p in pk if p.ifname in f.uplinks and p.outbound
                      and p.proto == "udp" and p.at >= zero and p.at <= (after or zero)
                      + 0.001 and p.src == f"{pub}.{f.udp_port}"
                      and p.dst.rpartition(".")[2] in ports})
    lo = _qemu(f, f.src, "STOP") or f.window[0]
    request = _first(p.at for p in pk if p.node == f.dst and is_tap(p.ifname)
                     and p.outbound and p.proto == "udp" and p.at >= lo
                     and p.dst == f"{f.guest_ip}.{f.udp_port}"
                     and p.src.rpartition(".")[2] in ports)
    return {"last_before_ms": _ms(before, zero), "first_after_ms": _ms(after, zero),
            "request_on_dst_tap_ms": _ms(request, zero),
            "dark_ms": (round((after - before) * 1000, 1)
                        if after is not None and before is not None else None),
            "guest_reply_on_dst_tap_ms": _ms(reply, zero), "replied_out_via": out_via}


# the capture (I/O) --------------------------------------------------------------------
@dataclass
class Tracer:
    """tcpdump + ping in every node's namespace, for one tour; stopped by pid."""

    dir: Path
    netns: Mapping[str, str]  # node -> its namespace
    guest_ip: str
    udp_port: int
    pids: list[int] | None = None
    dropped: dict[str, int] | None = None  # node -> packets tcpdump says the kernel dropped

    def start(self) -> None:
        from orchestrator.lab import netns as ns

        self.dir.mkdir(parents=True, exist_ok=True)
        flt = CAPTURE_FILTER.format(guest=self.guest_ip, udp=self.udp_port)
        self.pids = []
        for node, netns in self.netns.items():
            # binary to a file, a large buffer: printing text live dropped packets at load 6
            self.pids.append(ns.spawn(netns, [
                "tcpdump", "-i", "any", "-nn", "-U", "-B", "8192", "-w",
                str(self.dir / f"capture-{node}.pcap"), flt], self.dir / f"capture-{node}.log"))
            self.pids.append(ns.spawn(netns, [
                "ping", "-D", "-n", "-i", str(PING_INTERVAL_S), "-W", "1", self.guest_ip],
                self.dir / f"ping-{node}.txt"))
        for node in self.netns:  # tcpdump says so once its socket is open
            ns.wait_for_line(self.dir / f"capture-{node}.log", "listening on", 10)

    def stop(self) -> tuple[list[Packet], dict[str, list[float]]]:
        """Stop, then read the captures as text inside each node's namespace (interface
        names resolve there; a tap gone since then reads as "?")."""
        from orchestrator.lab import netns as ns

        for pid in self.pids or ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(_alive(p) for p in self.pids or ()) and time.monotonic() < deadline:
            time.sleep(0.05)  # their summaries written
        self.pids = []
        self.dropped = {node: parse_dropped((self.dir / f"capture-{node}.log").read_text(
            errors="replace")) for node in self.netns}
        packets = []
        for node, netns in self.netns.items():
            text = subprocess.run(ns.exec_argv(netns, [
                "tcpdump", "-r", str(self.dir / f"capture-{node}.pcap"), "-nn", "-e", "-tt"]),
                capture_output=True, text=True, timeout=120).stdout
            (self.dir / f"capture-{node}.txt").write_text(text)
            packets += parse_capture(node, text)
        pings = {node: parse_pings((self.dir / f"ping-{node}.txt").read_text(errors="replace"))
                 for node in self.netns}
        return sorted(packets, key=lambda p: p.at), pings


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# who had the CPU right after the resume ------------------------------------------------
def proc_cpu_s(pid: int | None, children: bool = False) -> float | None:
    """A process's CPU so far (all its threads; ``children``: what its reaped children
    used, e.g. libvirtd's hooks), in seconds; None when it is not there."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = int(fields[13]) + int(fields[14]) if children else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU time the whole machine spent busy so far (all cores, /proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_between(samples: Sequence[tuple[float, float | None]], t0: float,
                t1: float) -> float | None:
    """CPU used between ``t0`` and ``t1`` from (time, cumulative CPU) samples, linearly
    interpolated; None when the samples do not cover the interval."""
    pts = [(at, v) for at, v in samples if v is not None]

    def at(t: float) -> float | None:
        for (a, va), (b, vb) in itertools.pairwise(pts):
            if a <= t <= b:
                return va + (vb - va) * ((t - a) / (b - a) if b > a else 0.0)
        return None

    lo, hi = at(t0), at(t1)
    return None if lo is None or hi is None else max(0.0, hi - lo)


class CpuWatch:
    """Samples the CPU of the given processes (label -> a function giving the cumulative
    seconds) and of the machine every ``every`` s in a thread, while a move runs."""

    def __init__(self, probes: Mapping[str, Any], every: float = 0.05) -> None:
        import threading

        self.probes = dict(probes)
        self.every = every
        self.samples: dict[str, list[tuple[float, float | None]]] = {k: [] for k in probes}
        self.samples["machine"] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            now = time.time()
            for label, probe in self.probes.items():
                self.samples[label].append((now, probe()))
            self.samples["machine"].append((now, machine_busy_s()))
            self.done.wait(self.every)

    def stop(self) -> dict[str, list[tuple[float, float | None]]]:
        self.done.set()
        self.thread.join(timeout=5)
        return self.samples


def cpu_after(samples: Mapping[str, Sequence[tuple[float, float | None]]], t0: float,
              window_s: float) -> dict[str, float | None]:
    """ms of CPU each probe used in ``window_s`` from ``t0``."""
    out: dict[str, float | None] = {}
    for label, xs in samples.items():
        used = cpu_between(xs, t0, t0 + window_s)
        out[label] = None if used is None else round(used * 1000)
    return out
