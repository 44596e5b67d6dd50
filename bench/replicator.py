"""Replicator figures, side by side in one run: ``python -m bench.replicator --json``.

Two namespaces A and B joined by a veth (``sync0`` in both). Each side runs a replicator in
its own process: convergent's ``SyncService`` (multicast, HMAC-SHA256 on every datagram;
a child ``python -m bench.replicator --child``) or conntrackd (FTFW over UDP, generated
config, its own socket and lock files in a temp dir). Both start idle with empty tables;
then N synthetic ESTABLISHED TCP entries are pushed into A's kernel (the same engine push
for both) and the clock runs until B's external cache holds all N (``conntrackd -s`` /
the child's status, polled every 20 ms).

Per replicator: converged_s (push start to full cache), per_s = N / converged_s, push_s
(the push alone) and lag_s = converged_s - push_s, CPU seconds of both daemons (utime +
stime from /proc), peak RSS (VmHWM) of each. Both replicators follow kernel events, so
neither can converge before the push ends: per_s is bounded by the kernel's event rate and
lag_s is what tells them apart. ``kernel`` measures that bound: the same push with no
listener, then with the leanest listener possible (a socket drained and discarded); its
``ceiling_per_s`` is the most any event-following replicator can reach here, and
``of_ceiling`` says how close each came. convergent also runs with random loss on both
sync links (an nft ``numgen`` drop at each ingress: this kernel has no netem), 5 % and
20 %, and so does conntrackd (``loss_conntrackd``; FTFW may never converge: then it
says how many entries B still missed ``held_after_s`` seconds after the push began).

``join``: A already holds N entries and B starts empty (a node joins or restarts): the
time until B's cache holds all N. conntrackd: ``conntrackd -n`` on B after flushing its
external cache. convergent: from B's start, A answering B's HELLO with a full resync paced
at the configured ``sync.resync_rate`` (``convergent``), and unpaced
(``convergent_unpaced``), which is the replicator's own bulk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import BenchNamespaces, load_average, ratio, run_in, wait_until
from bench.conntrack import CONNTRACKD_PORT, Conntrackd, synthetic
from orchestrator.config.schema import Topology
from orchestrator.netfilter.conntrack import ConntrackTable

PORT = 7405
MARK_BIT = 0x80000000
POLL = 0.02
UNPACED = 10_000_000  # a resync_rate no sender reaches: the join at full speed
ROOT = Path(__file__).resolve().parent.parent
LOSSY_DEADLINE = 20.0  # conntrackd under loss: what it holds by then (it may never converge)
NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
CONNTRACK_GROUPS = 0b111  # NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY (groups 1..3)


def topology(resync_rate: int | None = None) -> Topology:
    nodes = [{"name": n, "tag": i, "mac_prefix": f"0a:00:0{i}", "pub_ip": f"192.168.122.1{i}",
              "guest_ip": f"10.5.5.25{i}", "pipes": ["pipe0"], "sync_ip": f"10.251.0.{i}"}
             for i, n in ((1, "a"), (2, "b"))]  # fmt: skip
    sync: dict[str, Any] = {"interface": "sync0", "port": PORT, "mark_bit": MARK_BIT}
    if resync_rate is not None:
        sync["resync_rate"] = resync_rate
    return Topology.model_validate({
        "cluster": {"guest_subnet": "10.5.5.0/24", "gateway": "10.5.5.254"},
        "nodes": nodes, "sync": sync,
    })  # fmt: skip


def entries(n: int) -> list[Any]:
    from dataclasses import replace

    return [replace(e, mark=MARK_BIT | 1) for e in synthetic(n)]


def pair(lab: BenchNamespaces) -> tuple[str, str]:
    a, b = lab.netns("ra"), lab.netns("rb")
    subprocess.run(["ip", "-n", a, "link", "add", "sync0", "type", "veth", "peer", "name",
                    "sync0b", "netns", b], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", b, "link", "set", "sync0b", "name", "sync0"], check=True)
    for ns, addr in ((a, "10.251.0.1/24"), (b, "10.251.0.2/24")):
        subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", "sync0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "sync0", "up"], check=True)
    return a, b


def lose(ns: str, loss: float, dev: str = "sync0", port: int = PORT) -> None:
    """Random loss of sync datagrams arriving on ``dev`` (both directions: apply to both)."""
    script = (
        "table netdev cvbloss {\n chain rx {\n"
        f'  type filter hook ingress device "{dev}" priority 0; policy accept;\n'
        f"  udp dport {port} numgen random mod 10000 < {int(loss * 10000)} drop\n }}\n}}\n"
    )
    out = run_in(ns, "nft", "-f", "-", input=script)
    if out.returncode != 0:
        raise RuntimeError(f"nft loss rule: {out.stderr}")


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, hwm


class NotConverged(RuntimeError):
    def __init__(self, deadline: float, held: int, wanted: int) -> None:
        super().__init__(f"not converged after {deadline} s: {held} of {wanted}")
        self.deadline, self.held, self.wanted = deadline, held, wanted


def push_and_wait(table: ConntrackTable, items: list[Any], count: Callable[[], int],
                  deadline: float) -> tuple[float, float]:  # fmt: skip
    """Push in a thread, poll ``count`` until it reaches len(items): (push_s, converged_s)."""
    n, done = len(items), []
    t0 = time.perf_counter()

    def push() -> None:
        result = table.push(items)
        done.append((time.perf_counter() - t0, result))

    t = threading.Thread(target=push)
    t.start()
    while count() < n:
        if time.perf_counter() - t0 > deadline:
            t.join()
            raise NotConverged(deadline, count(), n)
        time.sleep(POLL)
    converged = time.perf_counter() - t0
    t.join()
    push_s, result = done[0]
    if not result.ok:
        raise RuntimeError(f"push: {len(result.errors)} errors, first {result.errors[0]}")
    return push_s, converged


# --- convergent ------------------------------------------------------------------------------


class Node:
    """A SyncService in a child process inside ``ns``; ``status()`` over its stdin/stdout."""

    def __init__(self, lab: BenchNamespaces, ns: str, name: str, workdir: Path,
                 resync_rate: int | None = None) -> None:  # fmt: skip
        cmd = [sys.executable, "-m", "bench.replicator", "--child", name,
               "--key-file", str(workdir / "key")]  # fmt: skip
        if resync_rate is not None:
            cmd += ["--resync-rate", str(resync_rate)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=str(ROOT), text=True, start_new_session=True,
        )  # fmt: skip
        lab.procs.append(self.proc)
        if self._line() != "ready":
            raise RuntimeError(f"sync child {name} did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def status(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("status\n")
        self.proc.stdin.flush()
        st: dict[str, Any] = json.loads(self._line())
        return st

    def cached(self, peer: str) -> int:
        return int(next(p["entries"] for p in self.status()["peers"] if p["node"] == peer))


def convergent_run(items: list[Any], loss: float, deadline: float) -> dict[str, Any]:
    with BenchNamespaces() as lab, tempfile.TemporaryDirectory(prefix="cvb-rep-") as tmp:
        a, b = pair(lab)
        if loss:
            lose(a, loss)
            lose(b, loss)
        (Path(tmp) / "key").write_bytes(os.urandom(32))
        na, nb = Node(lab, a, "a", Path(tmp)), Node(lab, b, "b", Path(tmp))
        before = {k: proc_usage(n.proc.pid)[0] for k, n in (("a", na), ("b", nb))}
        push_s, converged = push_and_wait(ConntrackTable(a), items, lambda: nb.cached("a"),
                                          deadline)  # fmt: skip
        usage = {k: proc_usage(n.proc.pid) for k, n in (("a", na), ("b", nb))}
        sa, sb = na.status(), nb.status()
    peer = next(p for p in sb["peers"] if p["node"] == "a")
    return {
        "converged_s": round(converged, 3), "per_s": round(len(items) / converged),
        "push_s": round(push_s, 3), "lag_s": round(converged - push_s, 3),
        "cpu_s": {k: round(usage[k][0] - before[k], 2) for k in usage},
        "rss_mib": {k: round(usage[k][1] / 2**20, 1) for k in usage},
        "datagrams": sa["sender"].get("data_sent", 0), "resent": sa["sender"].get("resent", 0),
        "nacks": peer["nacks"], "resyncs": sa["sender"].get("resync_done", 0),
        "event_overruns": sa["feed"].get("overruns", 0), "drops": peer["drops"],
    }  # fmt: skip


def convergent_join(items: list[Any], resync_rate: int | None, deadline: float) -> dict[str, Any]:
    """A holds N entries; B starts empty (a node joins or restarts): from B's ready to B's
    cache holding all N. A answers B's HELLO with a full resync paced at ``resync_rate``."""
    n = len(items)
    with BenchNamespaces() as lab, tempfile.TemporaryDirectory(prefix="cvb-rep-") as tmp:
        a, b = pair(lab)
        (Path(tmp) / "key").write_bytes(os.urandom(32))
        na = Node(lab, a, "a", Path(tmp), resync_rate)
        ConntrackTable(a).push(items)
        wait_until(lambda: na.status()["entries"] >= n, deadline, "A's table")
        nb = Node(lab, b, "b", Path(tmp), resync_rate)
        converged = wait_until(lambda: nb.cached("a") >= n, deadline, "B's cache")
        resyncs = na.status()["sender"].get("resync_done", 0)
    return {"converged_s": round(converged, 3), "per_s": round(n / converged),
            "resync_rate": resync_rate or topology().sync.resync_rate,
            "resyncs": resyncs}  # fmt: skip


def conntrackd_join(items: list[Any], deadline: float) -> dict[str, Any]:
    """The same for conntrackd: B's external cache flushed, then ``conntrackd -n`` (B asks
    A for a resync), until B's external cache holds all N."""
    with BenchNamespaces() as lab, tempfile.TemporaryDirectory(prefix="cvb-rep-ctd-") as tmp:
        ctd = Conntrackd(lab, Path(tmp), items)
        ctd.start()
        ctd.ctl("b", "-f", "external")
        t0 = time.perf_counter()
        ctd.ctl("b", "-n")
        wait_until(lambda: ctd.cache_size("b", "external") >= len(items), deadline, "B's cache")
        converged = time.perf_counter() - t0
        lab.close()
    return {"converged_s": round(converged, 3), "per_s": round(len(items) / converged)}


def child(name: str, key_file: str, resync_rate: int | None = None) -> None:
    """The child side: run a SyncService here (already inside the namespace), answer
    ``status`` lines with one JSON line each."""
    import asyncio

    from orchestrator.replicator.service import SyncService

    async def main() -> None:
        svc = SyncService(topology(resync_rate), name, Path(key_file).read_bytes(), None,
                          state_path=False)
        await svc.start()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        while line := await reader.readline():
            if line.strip() == b"status":
                print(json.dumps(svc.status()), flush=True)
        await svc.stop()

    asyncio.run(main())


# --- conntrackd ------------------------------------------------------------------------------


def conntrackd_run(items: list[Any], deadline: float, loss: float = 0.0) -> dict[str, Any]:
    with BenchNamespaces() as lab, tempfile.TemporaryDirectory(prefix="cvb-rep-ctd-") as tmp:
        ctd = Conntrackd(lab, Path(tmp), [])  # A starts empty, like convergent's
        ctd.start()
        if loss:
            for ns, dev in ((ctd.a, ctd.dev_a), (ctd.b, ctd.dev_b)):
                lose(ns, loss, dev, CONNTRACKD_PORT)
        pids = {k: p.pid for k, p in zip(("a", "b"), lab.procs, strict=True)}
        before = {k: proc_usage(pid)[0] for k, pid in pids.items()}
        cached = lambda: ctd.cache_size("b", "external")  # noqa: E731
        try:
            push_s, converged = push_and_wait(ConntrackTable(ctd.a), items, cached, deadline)
        except NotConverged as exc:
            if not loss:
                raise
            lab.close()  # FTFW did not recover them by the deadline
            return {"converged_s": None, "per_s": None, "held_after_s": exc.deadline,
                    "held": exc.held, "missing": exc.wanted - exc.held}  # fmt: skip
        usage = {k: proc_usage(pid) for k, pid in pids.items()}
        lab.close()  # the daemons stop before their temp dir goes
    return {
        "converged_s": round(converged, 3), "per_s": round(len(items) / converged),
        "push_s": round(push_s, 3), "lag_s": round(converged - push_s, 3),
        "cpu_s": {k: round(usage[k][0] - before[k], 2) for k in usage},
        "rss_mib": {k: round(usage[k][1] / 2**20, 1) for k in usage},
    }  # fmt: skip


# --- the kernel's own ceiling -----------------------------------------------------------------


def kernel_ceiling(items: list[Any], deadline: float) -> dict[str, Any]:
    """The push alone, then with the leanest event listener there is (a socket subscribed
    to the conntrack groups, drained and discarded): no replicator that follows kernel
    events can converge faster than the second push, whatever it does with them."""
    with BenchNamespaces() as lab:
        ns = lab.netns("rk")
        table = ConntrackTable(ns)
        bare = push_timed(table, items)
        table.flush()
        drain = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.replicator", "--drain"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(ROOT), text=True,
            start_new_session=True,
        )  # fmt: skip
        lab.procs.append(drain)
        assert drain.stdout is not None and drain.stdin is not None
        if drain.stdout.readline().strip() != "ready":
            raise RuntimeError("event drain did not start")
        listened = push_timed(table, items)
        drain.stdin.close()  # it reports what it read, then exits
        heard = int(drain.stdout.readline() or 0)
        drain.wait(deadline)
    return {"push_s": round(bare, 3), "push_with_listener_s": round(listened, 3),
            "ceiling_per_s": round(len(items) / listened), "events_heard": heard}  # fmt: skip


def push_timed(table: ConntrackTable, items: list[Any]) -> float:
    t0 = time.perf_counter()
    result = table.push(items)
    seconds = time.perf_counter() - t0
    if not result.ok:
        raise RuntimeError(f"push: {len(result.errors)} errors, first {result.errors[0]}")
    return seconds


def drain_events() -> None:
    """The ``--drain`` child: subscribe to conntrack NEW/UPDATE/DESTROY, read and discard,
    until stdin closes; then print how many messages came."""
    import errno
    import select
    import socket

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    sock.bind((0, CONNTRACK_GROUPS))
    sock.setblocking(False)
    print("ready", flush=True)
    buf, heard = bytearray(1 << 16), 0
    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [])
        if sock in ready:
            try:
                while sock.recv_into(buf):
                    heard += 1
            except BlockingIOError:
                pass
            except OSError as exc:  # ENOBUFS: the kernel dropped events; keep draining
                if exc.errno != errno.ENOBUFS:
                    raise
        if sys.stdin in ready and not sys.stdin.readline():
            break
    print(heard, flush=True)


# --- the run ---------------------------------------------------------------------------------


def run(n: int, losses: list[float], deadline: float = 60.0,
        lossy_deadline: float = LOSSY_DEADLINE) -> dict[str, Any]:  # fmt: skip
    env: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                           "load_before": load_average()}  # fmt: skip
    items = entries(n)
    have_ctd = subprocess.run(["which", "conntrackd"], capture_output=True).returncode == 0
    missing: dict[str, Any] = {"per_s": None, "error": "conntrackd is not installed"}
    kernel = kernel_ceiling(items, deadline)
    mine = convergent_run(items, 0.0, deadline)
    theirs = conntrackd_run(items, deadline) if have_ctd else missing
    loss = {str(p): convergent_run(items, p, deadline) for p in losses}
    loss_ctd = {str(p): conntrackd_run(items, lossy_deadline, p) if have_ctd else missing
                for p in losses}  # fmt: skip
    join = {
        "convergent": convergent_join(items, None, deadline),
        "convergent_unpaced": convergent_join(items, UNPACED, deadline),
        "conntrackd": conntrackd_join(items, deadline) if have_ctd else missing,
    }
    env["load_after"] = load_average()
    return {
        "entries": n, "convergent_per_s": mine["per_s"], "conntrackd_per_s": theirs["per_s"],
        "ratio": ratio(mine["per_s"], theirs["per_s"]), "hmac": "HMAC-SHA256-128",
        "kernel": kernel, "of_ceiling": {
            "convergent": ratio(mine["per_s"], kernel["ceiling_per_s"]),
            "conntrackd": ratio(theirs["per_s"], kernel["ceiling_per_s"])},
        "convergent": mine, "conntrackd": theirs, "loss": loss, "loss_conntrackd": loss_ctd,
        "join": join, "env": env,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicator", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--entries", type=int, default=100_000, help="entries (100000)")
    parser.add_argument("--loss", type=float, action="append", default=None,
                        help="loss rates for convergent (default 0.05 and 0.2)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--resync-rate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drain:
        drain_events()
        return
    if args.child:
        child(args.child, args.key_file, args.resync_rate)
        return
    if os.geteuid() != 0:
        sys.exit("bench.replicator needs root (network namespaces)")
    figures = run(args.entries, args.loss if args.loss is not None else [0.05, 0.2])
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
