"""Conntrack engine figures, side by side in one run: ``python -m bench.conntrack --json``.

push    N (and 10k) synthetic ESTABLISHED TCP entries into an empty table:
        the engine (``ConntrackTable.push``) vs ``conntrack -R`` (its restore format, a line
        per entry, marks included) vs conntrackd (FTFW between two namespaces over a veth:
        A holds the entries, B receives them into its external cache, then ``conntrackd -c``
        on B is timed until it returns with B's table full) vs pyroute2
        ``NFCTSocket.entry('add')`` one by one (10k only: ~1k/s).
dump    N entries: ``ConntrackTable.dump()`` vs ``conntrack -L`` to /dev/null; ``by_address``:
        one guest address, kernel-filtered dumps vs a full dump checked in userspace.
events  a burst of N entries created by the engine in a child process while this process
        listens (``ConntrackTable.events()``, default buffer): per_s over the burst, entries
        lost, and whether an overrun happened and a dump recovered the full set
        (``events_small_buffer``: the same with a deliberately small buffer).

Figures are medians of ``--repeat`` runs, alternating methods, because the machine may be
shared; ``env.load`` shows the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bench._common import (
    BenchNamespaces,
    load_average,
    median,
    rate,
    ratio,
    read_root_sysctl,
    run_in,
    timed,
    wait_until,
)
from orchestrator.model.conntrack import (
    Entry,
    Event,
    EventType,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    Tuple,
)
from orchestrator.netfilter.conntrack import OVERRUN, AddressMatch, ConntrackTable

MARK = 0x5
TIMEOUT = 3600
STATUS = Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED
TCP_INFO = TcpInfo(
    TcpState.ESTABLISHED, 7, 7, TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM,
    TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM,
)  # fmt: skip


def synthetic(count: int, base: int = 0) -> list[Entry]:
    """Distinct ESTABLISHED TCP entries: 10.200.x.y:port -> 10.201.0.z:443."""
    out = []
    for i in range(base, base + count):
        o = Tuple(
            IPv4Address(0x0AC80000 + i // 50000), IPv4Address(0x0AC90000 + i % 251), 6,
            1024 + i % 50000, 443,
        )  # fmt: skip
        out.append(Entry(o, o.reversed(), STATUS, MARK, TIMEOUT, 0, TCP_INFO))
    return out


def restore_file(entries: list[Entry], path: Path) -> None:
    """conntrack's restore format (``-o save`` lines; the mark added, which ``-o save`` drops)."""
    with path.open("w") as f:
        for e in entries:
            o, r = e.tuple_orig, e.tuple_reply
            f.write(
                f"-A -t {e.timeout} -u SEEN_REPLY,ASSURED -m {e.mark} -s {o.src} -d {o.dst} "
                f"-r {r.src} -q {r.dst} -p tcp --sport {o.sport} --dport {o.dport} "
                f"--reply-port-src {r.sport} --reply-port-dst {r.dport} --state ESTABLISHED\n"
            )


def _expect_count(table: ConntrackTable, n: int, what: str) -> None:
    got = table.count()
    if got != n:
        raise RuntimeError(f"{what}: expected {n} entries in {table.netns}, found {got}")


# --- push ------------------------------------------------------------------------------------


def push_engine(table: ConntrackTable, entries: list[Entry]) -> float:
    table.flush()
    seconds = timed(lambda: _check_push(table, entries))
    _expect_count(table, len(entries), "engine push")
    return seconds


def _check_push(table: ConntrackTable, entries: list[Entry]) -> None:
    result = table.push(entries)
    if not result.ok:
        raise RuntimeError(f"engine push: {len(result.errors)} errors, first {result.errors[0]}")


def push_restore(table: ConntrackTable, path: Path, n: int) -> float:
    assert table.netns is not None
    ns = table.netns
    table.flush()
    t0 = time.perf_counter()
    out = run_in(ns, "conntrack", "-R", str(path))
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"conntrack -R failed ({out.returncode}): {out.stderr[-300:]}")
    _expect_count(table, n, "conntrack -R")
    return seconds


def push_pyroute2(table: ConntrackTable, entries: list[Entry]) -> float:
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    def tup(t: Tuple) -> NFCTAttrTuple:
        return NFCTAttrTuple(saddr=str(t.src), daddr=str(t.dst), proto=t.proto,
                             sport=t.sport, dport=t.dport)  # fmt: skip

    table.flush()
    protoinfo = {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [
        ("CTA_PROTOINFO_TCP_STATE", int(TCP_INFO.state)),
        ("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL", TCP_INFO.wscale_orig),
        ("CTA_PROTOINFO_TCP_WSCALE_REPLY", TCP_INFO.wscale_reply),
    ]})]}  # fmt: skip
    with NFCTSocket(netns=table.netns) as sock:
        t0 = time.perf_counter()
        for e in entries:
            sock.entry(
                "add", tuple_orig=tup(e.tuple_orig), tuple_reply=tup(e.tuple_reply),
                timeout=e.timeout, status=int(e.status), mark=e.mark, protoinfo=protoinfo,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
    _expect_count(table, len(entries), "pyroute2")
    return seconds


# --- conntrackd ------------------------------------------------------------------------------

CONNTRACKD_PORT = 3780
CONNTRACKD_CONF = """\
Sync {{
    Mode FTFW {{
        DisableExternalCache Off
    }}
    UDP {{
        IPv4_address {me}
        IPv4_Destination_Address {peer}
        Port {port}
        Interface {dev}
        SndSocketBuffer 24985600
        RcvSocketBuffer 24985600
        Checksum on
    }}
}}
General {{
    HashSize 65536
    HashLimit 1048576
    LogFile {dir}/{side}.log
    Syslog off
    LockFile {dir}/{side}.lock
    UNIX {{
        Path {dir}/{side}.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 134217728
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
            ICMP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address {me}
            IPv4_address {peer}
        }}
    }}
}}
"""


class Conntrackd:
    """conntrackd in two namespaces, A -> B; B's external cache committed on demand."""

    def __init__(self, lab: BenchNamespaces, workdir: Path, entries: list[Entry]) -> None:
        self.lab, self.dir, self.n = lab, workdir, len(entries)
        self.a, self.b = lab.netns("ctda"), lab.netns("ctdb")
        self.dev_a, self.dev_b = dev_a, dev_b = lab.veth(self.a, self.b, "10.250.0.1/24",
                                                         "10.250.0.2/24")
        self.conf = {
            side: self._write_conf(side, me, peer, dev)
            for side, me, peer, dev in (
                ("a", "10.250.0.1", "10.250.0.2", dev_a),
                ("b", "10.250.0.2", "10.250.0.1", dev_b),
            )
        }
        self.table_b = ConntrackTable(self.b)
        _check_push(ConntrackTable(self.a), entries)

    def _write_conf(self, side: str, me: str, peer: str, dev: str) -> Path:
        path = self.dir / f"{side}.conf"
        path.write_text(CONNTRACKD_CONF.format(me=me, peer=peer, dev=dev, dir=self.dir, side=side,
                                              port=CONNTRACKD_PORT))
        return path

    def ctl(self, side: str, *args: str, timeout: float = 120) -> str:
        ns = self.a if side == "a" else self.b
        out = run_in(ns, "conntrackd", "-C", str(self.conf[side]), *args, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"conntrackd {' '.join(args)}: {out.stdout}{out.stderr}".strip())
        return out.stdout

    def start(self, deadline: float = 60) -> None:
        """A loads its kernel table at start-up; B asks A for a resync into its cache."""
        for side, ns in (("a", self.a), ("b", self.b)):
            with (self.dir / f"{side}.out").open("w") as log:  # the daemon keeps its own fd
                self.lab.spawn(ns, ["conntrackd", "-C", str(self.conf[side])], log)
            wait_until((self.dir / f"{side}.ctl").exists, 10,
                       f"conntrackd {side}'s control socket", 0.05)  # fmt: skip
        wait_until(lambda: self.cache_size("a", "internal") >= self.n, deadline,
                   "conntrackd A's cache", 0.05)  # fmt: skip
        self.ctl("b", "-n")
        wait_until(lambda: self.cache_size("b", "external") >= self.n, deadline,
                   "conntrackd B's cache", 0.05)  # fmt: skip

    def cache_size(self, side: str, which: str) -> int:
        lines = self.ctl(side, "-s").splitlines()
        for i, line in enumerate(lines):
            if line.startswith(f"cache {which}"):
                return int(lines[i + 1].split()[-1])
        return 0

    def commit(self) -> float:
        """B's kernel table emptied, then ``conntrackd -c`` (it returns once committed)."""
        self.table_b.flush()
        seconds = timed(lambda: self.ctl("b", "-c"))
        _expect_count(self.table_b, self.n, "conntrackd commit")
        return seconds


def conntrackd_commits(lab: BenchNamespaces, entries: list[Entry], repeat: int) -> dict[str, Any]:
    if subprocess.run(["which", "conntrackd"], capture_output=True).returncode != 0:
        return {"per_s": None, "error": "conntrackd is not installed"}
    with tempfile.TemporaryDirectory(prefix="cvb-ctd-") as tmp:
        try:
            ctd = Conntrackd(lab, Path(tmp), entries)
            ctd.start()
            times = [ctd.commit() for _ in range(repeat)]
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return {"per_s": None, "error": str(exc)}
        finally:
            lab.close()  # stops the daemons before their temp dir goes
    return {"per_s": rate(len(entries), median(times)), "seconds": [round(t, 3) for t in times]}


# --- dump ------------------------------------------------------------------------------------


def dumps(table: ConntrackTable, n: int, repeat: int) -> dict[str, Any]:
    assert table.netns is not None
    ns = table.netns
    table.flush()
    _check_push(table, synthetic(n))
    engine, cli = [], []
    for _ in range(repeat):  # alternate: a shared machine's load hits both alike
        t0 = time.perf_counter()
        got = len(table.dump())
        engine.append(time.perf_counter() - t0)
        if got != n:
            raise RuntimeError(f"engine dump returned {got} of {n}")
        cli.append(timed(lambda: run_in(ns, "sh", "-c", "conntrack -L >/dev/null 2>&1")))
    mine, theirs = rate(n, median(engine)), rate(n, median(cli))
    return {"entries": n, "convergent_per_s": mine, "conntrack_list_per_s": theirs,
            "ratio": ratio(mine, theirs), "by_address": by_address(table, repeat)}  # fmt: skip


def by_address(table: ConntrackTable, repeat: int) -> dict[str, Any]:
    """One guest address: four kernel-filtered dumps vs one full dump checked here."""
    guest = "10.201.0.7"  # orig dst of 1/251 of the synthetic entries
    match = AddressMatch([guest])
    filtered, full = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = table.dump(addresses=[guest])
        filtered.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checked = [e for e in table.dump() if match(e)]
        full.append(time.perf_counter() - t0)
        if len(got) != len(checked):
            raise RuntimeError(f"address dump: {len(got)} entries, full dump says {len(checked)}")
    return {"addresses": 1, "matching": len(got),
            "filtered_ms": round(median(filtered) * 1000, 1),
            "full_dump_and_check_ms": round(median(full) * 1000, 1)}  # fmt: skip


# --- events ----------------------------------------------------------------------------------

_PUSHER = """\
import json, sys, time
from bench.conntrack import synthetic
from orchestrator.netfilter.conntrack import ConntrackTable
ns, n = sys.argv[1], int(sys.argv[2])
entries = synthetic(n, base=1_000_000)
table = ConntrackTable(ns)
start = time.time()
result = table.push(entries)
print(json.dumps({"start": start, "end": time.time(), "created": result.created}))
"""


async def _listen(table: ConntrackTable, n: int, rcvbuf: int | None) -> dict[str, Any]:
    """Subscribe, start the pusher, count NEW events until all arrived or it went quiet."""
    stream = table.events() if rcvbuf is None else table.events(rcvbuf=rcvbuf)
    with stream:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PUSHER, str(table.netns), str(n),
            stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent),
        )  # fmt: skip
        seen, overruns, last = 0, 0, time.time()
        batches = stream.batches()
        while seen < n:
            try:
                batch = await asyncio.wait_for(anext(batches), timeout=3.0)
            except TimeoutError:
                break  # quiet for 3 s: the rest is lost
            last = time.time()
            overruns += batch.count(OVERRUN)
            seen += sum(1 for ev in batch if isinstance(ev, Event) and ev.type == EventType.NEW)
        out, _ = await proc.communicate()
    pushed = json.loads(out)
    return {"seen": seen, "overruns": overruns, "last": last, **pushed}


def events(table: ConntrackTable, n: int, rcvbuf: int | None = None) -> dict[str, Any]:
    table.flush()
    got = asyncio.run(_listen(table, n, rcvbuf))
    if got["created"] != n:
        raise RuntimeError(f"event burst: pusher created {got['created']} of {n}")
    resynced = False
    if got["overruns"]:
        resynced = len(table.dump()) == n  # the caller's recovery: a dump of the full set
    return {
        "entries": n,
        "per_s": rate(got["seen"], got["last"] - got["start"]),
        "push_per_s": rate(n, got["end"] - got["start"]),
        "lost": n - got["seen"],
        "overruns": got["overruns"],
        "resynced": resynced,
        **({"rcvbuf": rcvbuf} if rcvbuf else {}),
    }


# --- the run ---------------------------------------------------------------------------------


def push_figures(lab: BenchNamespaces, table: ConntrackTable, n: int, repeat: int,
                 pyroute2_n: int) -> dict[str, Any]:  # fmt: skip
    entries = synthetic(n)
    with tempfile.TemporaryDirectory(prefix="cvb-ct-") as tmp:
        path = Path(tmp) / "restore.txt"
        restore_file(entries, path)
        engine, restore = [], []
        for _ in range(repeat):
            engine.append(push_engine(table, entries))
            restore.append(push_restore(table, path, n))
    mine, theirs = rate(n, median(engine)), rate(n, median(restore))
    with BenchNamespaces() as ctd_lab:
        ctd = conntrackd_commits(ctd_lab, entries, repeat)
    figures: dict[str, Any] = {
        "entries": n, "convergent_per_s": mine, "conntrack_restore_per_s": theirs,
        "conntrackd_commit_per_s": ctd["per_s"],
        "ratio_vs_restore": ratio(mine, theirs), "ratio_vs_conntrackd": ratio(mine, ctd["per_s"]),
    }  # fmt: skip
    if "error" in ctd:
        figures["conntrackd_error"] = ctd["error"]
    if pyroute2_n:
        sample = entries[:pyroute2_n]
        figures["pyroute2_per_s"] = rate(len(sample), push_pyroute2(table, sample))
        figures["pyroute2_entries"] = len(sample)
    return figures


def run(n: int, repeat: int, pyroute2_n: int) -> dict[str, Any]:
    ct_max = read_root_sysctl("net.netfilter.nf_conntrack_max")
    env: dict[str, Any] = {
        "kernel": os.uname().release, "cpus": os.cpu_count(), "load_before": load_average(),
        "nf_conntrack_max": ct_max, "repeat": repeat,
    }  # fmt: skip
    if ct_max is not None and ct_max < n + 10_000:
        env["capped_from"] = n
        n = max(1000, ct_max - 10_000)
    small = min(10_000, n)
    with BenchNamespaces() as lab:
        table = ConntrackTable(lab.netns("ct"))
        push_small = push_figures(lab, table, small, repeat, pyroute2_n)
        push = push_figures(lab, table, n, repeat, 0) if n != small else dict(push_small)
        push["pyroute2_per_s"] = push_small.get("pyroute2_per_s")
        push["pyroute2_entries"] = push_small.get("pyroute2_entries")
        push[f"at_{small}"] = push_small
        dump = dumps(table, n, repeat)
        ev = events(table, n)
        ev_small = events(table, n, rcvbuf=256 << 10)
        table.flush()
        table.close()
    env["load_after"] = load_average()
    return {"push": push, "dump": dump, "events": ev, "events_small_buffer": ev_small, "env": env}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.conntrack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entries", type=int, default=100_000, help="table size (100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--pyroute2-entries", type=int, default=10_000,
                        help="entries for the one-by-one pyroute2 baseline (0: skip)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.conntrack needs root (network namespaces)")
    figures = run(args.entries, args.repeat, args.pyroute2_entries)
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
