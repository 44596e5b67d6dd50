"""Live migration of a real VM: ``python -m bench.vm --json``.

A libvirt lab (``cvg-bv-<run>-*``, always torn down): a TCG guest on n1 with 16 live flows
(OpenSSH, websocket both ways, HTTP keep-alive and UDP through every node's public
address, and a guest-initiated stream), moved n1 -> n2 -> n3 -> n1 by ``virsh migrate
--live``, twice in the same run:

handover  hooks installed, agents running: the agents learn every moment from libvirt;
control   hooks removed, agents down; after each move the guest's neighbour entries are
          flushed (its entry for the gateway expiring, compressed, as in the tests' control
          run), so it asks for the gateway again where only the destination answers.

Per migration: libvirt's own downtime (``downtime`` of the source's job-completed event)
beside each flow's largest app-visible gap between the start of the move and ``--settle``
seconds after it, the flows that died in it (resets, closes, silence), and, with the
handover, the time from libvirt's resume event on the destination to the cutover's
commit in the audit log. The nodes track strictly (``nf_conntrack_tcp_loose=0`` unless
``--tcp-loose 1``): a node can then not pick a flow up in the middle, so only the handover
carries it. Also the qemu hook's own cost, run as libvirt runs it: answered by a live agent
and spooled with the agent away.

Where the dark time goes (``timeline`` per move, :mod:`bench.vmtrace`): QEMU's own STOP on
the source and RESUME on the destination (QMP timestamps, through libvirt) beside libvirt's
``downtime`` (libvirt 9.0's: from the source's libvirtd seeing QEMU's STOP to the
destination's returning from ``cont`` in the Finish phase), the RARP QEMU sends and when
it reached each node, the guest's first frames on the destination's tap, each UDP flow's
dark window and its first reply, a ping from every node; TCG's translated blocks on the
destination as they pile up after the resume (HMP ``info jit``); and, after the handover
tour, the same pause in place (``virsh suspend``/``resume`` on one node: same pause and
queued traffic, TCG's translations kept) as the warm reference. ``bound`` names what the
target runs into: the UDP flows' dark time (no retransmission in it, so every flow's
floor) = QEMU's pause + the guest's first answer after the resume, and what TCP added.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

TOUR = ("n2", "n3", "n1")
GUEST = "guest1"
HOOK_RUNS = 20
STALL_MS = 2000.0
CPU_WINDOW_S = 0.5  # who had the CPU right after the resume
JIT_EVERY_S = 0.1  # info jit on the destination while a move runs
JIT_WATCH_S = 1.0  # and this long after virsh returns
QEMU_EVENTS = ("STOP", "RESUME", "MIGRATION")
TARGET_OVER_DOWNTIME_MS = 250.0  # the issue's: largest gap <= downtime + one RTO


class Events:
    """libvirt's events on every node, timestamped on arrival (libvirt's default event
    loop, in a thread of its own), and QEMU's own monitor events (STOP, RESUME, MIGRATION)
    with QEMU's timestamps, through libvirt."""

    def __init__(self, uris: dict[str, str]) -> None:
        import libvirt
        import libvirt_qemu

        self.lock = threading.Lock()
        self.jobs: list[tuple[float, str, dict[str, Any]]] = []  # (at, node, stats)
        self.lifecycle: list[tuple[float, str, int, int]] = []  # (at, node, event, detail)
        self.qemu: list[tuple[float, str, str, dict[str, Any]]] = []  # (ts, node, event, data)
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        libvirt.virEventRegisterDefaultImpl()
        self.conns = []
        self.by_node: dict[str, Any] = {}
        for node, uri in uris.items():
            c = libvirt.open(uri)
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                     self._lifecycle, node)
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                     self._job, node)
            libvirt_qemu.qemuMonitorEventRegister(c, None, None, self._qemu, node, 0)
            self.conns.append(c)
            self.by_node[node] = c
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import libvirt

        while True:
            libvirt.virEventRunDefaultImpl()

    def _lifecycle(self, _c: Any, _dom: Any, event: int, detail: int, node: str) -> None:
        with self.lock:
            self.lifecycle.append((time.time(), node, event, detail))

    def _qemu(self, _c: Any, _dom: Any, event: str, seconds: int, micros: int,
              details: str | None, node: str) -> None:
        if event not in QEMU_EVENTS:
            return
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        with self.lock:
            self.qemu.append((seconds + micros / 1e6, node, event,
                              data if isinstance(data, dict) else {}))

    def _job(self, _c: Any, _dom: Any, stats: dict[str, Any], node: str) -> None:
        with self.lock:
            self.jobs.append((time.time(), node, dict(stats)))

    def job_after(self, node: str, since: float) -> dict[str, Any] | None:
        with self.lock:
            return next((s for at, n, s in self.jobs if n == node and at >= since), None)

    def resume_after(self, node: str, since: float) -> float | None:
        """RESUMED/MIGRATED or POSTCOPY on ``node`` (the cutover's signal)."""
        with self.lock:
            return next((at for at, n, e, d in self.lifecycle
                         if n == node and at >= since and e == 4 and d in (1, 3)), None)


def tour(lab: Any, events: Events, handover: bool, settle: float,
         opts: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.lab.flows import UDP_PORT, start_flows

    from .vmtrace import CpuWatch, Tracer

    t = lab.topology()
    drv = lab.driver(t)
    if not handover:
        for node in t.nodes:
            subprocess.run([sys.executable, "-m", "orchestrator", "install-hooks", "--libvirt",
                            "--uninstall", "--root", str(drv.daemon(t, node.name).root)],
                           check=True, capture_output=True)
            lab.kill_agent(node.name)
    flows = start_flows(lab, t, GUEST, [n.name for n in t.nodes])
    guest = t.guest(GUEST)
    tracer = Tracer((opts.trace_dir or lab.dir / "trace") / ("handover" if handover else "control"),
                    {n.name: lab.names.node(n.name) for n in t.nodes},
                    str(guest.addresses[0]), UDP_PORT)
    moves = []
    t_start = time.time()  # the tour's clock for "failed"
    packets: list[Any] = []
    pings: dict[str, list[float]] = {}
    try:
        tracer.start()
        time.sleep(settle)
        for dst in TOUR:
            src = lab.guest_node(t, GUEST)
            if opts.max_downtime is not None:
                drv.daemon(t, src).virsh("migrate-setmaxdowntime", GUEST,
                                         str(opts.max_downtime))
            warm = jit_tbs(drv, t, src)
            poller = JitPoller(events.by_node[dst])
            agents = {n.name: cpu_s(lab.agent_pid(n.name)) for n in t.nodes}
            watch = CpuWatch(cpu_probes(lab, drv, t, src, dst))
            start = time.time()
            try:
                drv.virsh_migrate(t, GUEST, src, dst, p2p=opts.p2p)
            finally:
                end = time.time()
                time.sleep(JIT_WATCH_S)
                cold = poller.stop()
                cpu = watch.stop()
                agents_cpu = {n: round((cpu_s(lab.agent_pid(n)) - c) * 1000)
                              for n, c in agents.items()} if handover else None
            if not handover:  # the guest's gateway entry lapses, compressed
                drv.ssh(t, GUEST, "ip neigh flush dev eth0")
            time.sleep(max(0.0, end + settle - time.time()))
            moves.append({"from": src, "to": dst, "kind": "migrate", "start": start,
                          "virsh_s": end - start, "tbs_src": warm, "tbs_dst": cold,
                          "agents_cpu_ms": agents_cpu, "cpu_samples": cpu})
        if handover and opts.local_pause:  # last: the guest's QEMU warm by now
            moves.append(local_pause(drv, t, lab.guest_node(t, GUEST), opts.local_pause,
                                     settle))
    finally:
        with contextlib.suppress(Exception):
            packets, pings = tracer.stop()
        results = flows.stop()
    for m in moves:
        window = (m["start"], m["start"] + m["virsh_s"] + settle)
        job = events.job_after(m["from"], m["start"]) or {}
        m["downtime_ms"] = job.get("downtime")
        m["flows"] = {r.name: round(max([g for at, g in r.gaps
                                         if window[0] <= at <= window[1]] or [0.0]), 1)
                      for r in results}
        m["largest_gap_ms"] = max(m["flows"].values())
        m["died"] = sorted(r.name for r in results if not r.survived
                           and r.died_at is not None and window[0] <= r.died_at <= window[1])
        # TCP keeps retransmitting: a flow stalled here may come back when the guest
        # returns to where its state is, and end the tour "alive"
        m["stalled"] = sorted(name for name, gap in m["flows"].items() if gap > STALL_MS)
        cutover = (cutover_after(lab, m["to"], m["start"])
                   if handover and m["kind"] == "migrate" else None)
        if handover and m["kind"] == "migrate":
            resumed = events.resume_after(m["to"], m["start"])
            m["resume_to_cutover_ms"] = (round((cutover - resumed) * 1000, 1)
                                         if cutover and resumed else None)
        m["timeline"] = move_timeline(t, events, m, window, packets, pings, results, cutover)
        if m["kind"] == "local-pause":  # no job: the pause QEMU saw stands for downtime
            m["downtime_ms"] = m["timeline"].get("qemu_pause_ms")
        m["tcg_tbs"] = tcg_growth(events, m)
        m["cpu_after_resume_ms"] = cpu_after_resume(events, m)
        m["virsh_s"] = round(m["virsh_s"], 2)
        m["at_s"] = round(m.pop("start") - t_start, 1)
    warm = next((m["timeline"].get("guest_first_ms", {}).get("udp") for m in moves
                 if m["kind"] == "local-pause"), None)
    for m in moves:
        m["bound"] = gap_bound(m, warm)
    return {"migrations": moves, "capture_dropped": tracer.dropped,
            "survived": sum(r.survived for r in results), "flows": len(results),
            "failed": {r.name: {"error": r.error, "at_s": round(r.died_at - t_start, 1)
                                if r.died_at else None}
                       for r in results if not r.survived},
            "resets": sorted(r.name for r in results
                             if r.error and ("reset" in r.error.lower()
                                             or "closed" in r.error.lower()))}


def local_pause(drv: Any, t: Any, node: str, pause_s: float,
                settle: float) -> dict[str, Any]:
    """The same pause without a move: ``virsh suspend``, ``pause_s``, ``virsh resume`` on
    the guest's own node. The guest meets the same dark time and backlog of queued packets,
    with its QEMU (and TCG's translated code) and every L2 path unchanged: what is left of
    a move's dark time beyond this is the move's."""
    d = drv.daemon(t, node)
    start = time.time()
    d.virsh("suspend", GUEST)
    time.sleep(pause_s)
    d.virsh("resume", GUEST)
    end = time.time()
    time.sleep(settle)
    return {"from": node, "to": node, "kind": "local-pause", "start": start,
            "virsh_s": end - start}


def tcg_growth(events: Events, m: dict[str, Any]) -> dict[str, Any] | None:
    """TCG's translated blocks: the source's before the move (the guest's warm working
    set), then the destination's at ms after its resume."""
    if m["kind"] != "migrate":
        return None
    with events.lock:
        resume = next((ts for ts, n, e, _ in events.qemu
                       if n == m["to"] and e == "RESUME" and ts >= m["start"]), None)
    samples = m.pop("tbs_dst")
    return {"src_before": m.pop("tbs_src"),
            "dst_after_resume": [[round((at - resume) * 1000), n] for at, n in samples
                                 if at >= resume] if resume else []}


class JitPoller:
    """``info jit`` on the destination's QEMU every ``every`` s from before the move until
    stopped, over the bench's own libvirt connection (no process per sample). libvirt holds
    the calls back while the incoming migration job runs, so the first lands right after
    the Finish phase: the curve of TCG translating the guest's code again."""

    def __init__(self, conn: Any, every: float = JIT_EVERY_S) -> None:
        self.conn, self.every = conn, every
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import libvirt
        import libvirt_qemu

        while not self.done.is_set():
            try:
                dom = self.conn.lookupByName(GUEST)
                if dom.isActive():
                    out = libvirt_qemu.qemuMonitorCommand(
                        dom, "info jit", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                    n = parse_tb_count(out)
                    if n is not None:
                        self.samples.append((time.time(), n))
            except libvirt.libvirtError:
                pass  # not there yet, or still incoming
            self.done.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self.done.set()
        self.thread.join(timeout=30)
        return self.samples


def cpu_probes(lab: Any, drv: Any, t: Any, src: str, dst: str) -> dict[str, Any]:
    """What to watch during a move: each QEMU, each agent with the processes it ran, each
    libvirtd and what its reaped children (the hooks) used."""
    from .vmtrace import proc_cpu_s

    def qemu(node: str) -> Any:
        pidfile = drv.daemon(t, node).root / "run" / "libvirt" / "qemu" / f"{GUEST}.pid"

        def probe() -> float | None:
            try:
                return proc_cpu_s(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                return None
        return probe

    probes: dict[str, Any] = {f"qemu@{src}": qemu(src), f"qemu@{dst}": qemu(dst)}
    for n in t.nodes:
        d = drv.daemon(t, n.name)
        # its own threads and the nft/conntrack processes it ran (once reaped)
        probes[f"agent@{n.name}"] = lambda n=n: _sum(
            proc_cpu_s(lab.agent_pid(n.name)), proc_cpu_s(lab.agent_pid(n.name), True))
        probes[f"libvirtd@{n.name}"] = lambda d=d: proc_cpu_s(d.pid())
        probes[f"hooks@{n.name}"] = lambda d=d: proc_cpu_s(d.pid(), children=True)
    return probes


def _sum(*xs: float | None) -> float | None:
    return None if any(x is None for x in xs) else sum(x or 0.0 for x in xs)


def cpu_after_resume(events: Events, m: dict[str, Any]) -> dict[str, Any] | None:
    """Who had the 2 cores in the first CPU_WINDOW_S after the resume on the destination."""
    from .vmtrace import cpu_after

    samples = m.pop("cpu_samples", None)
    if not samples:
        return None
    with events.lock:
        resume = next((ts for ts, n, e, _ in events.qemu
                       if n == m["to"] and e == "RESUME" and ts >= m["start"]), None)
    if resume is None:
        return None
    used = cpu_after(samples, resume, CPU_WINDOW_S)
    return {"window_ms": round(CPU_WINDOW_S * 1000), **used}


def cpu_s(pid: int | None) -> float:
    """A process's CPU so far, with what its reaped children used (an agent's nft and
    conntrack runs), in seconds; 0 when it is gone."""
    from .vmtrace import proc_cpu_s

    return _sum(proc_cpu_s(pid), proc_cpu_s(pid, children=True)) or 0.0


def jit_tbs(drv: Any, t: Any, node: str) -> int | None:
    """TCG's translated blocks in the guest's QEMU on ``node`` (HMP ``info jit``): a fresh
    QEMU after a migration starts from none, so the guest runs on cold translation."""
    p = drv.daemon(t, node).virsh("qemu-monitor-command", "--hmp", GUEST, "info jit",
                                  check=False, timeout=10)
    return parse_tb_count(p.stdout) if p.returncode == 0 else None


def parse_tb_count(text: str) -> int | None:
    m = re.search(r"^TB count\s+(\d+)", text, re.M)
    return int(m[1]) if m else None


def move_timeline(t: Any, events: Events, m: dict[str, Any], window: tuple[float, float],
                  packets: list[Any], pings: dict[str, list[float]], results: list[Any],
                  cutover: float | None) -> dict[str, Any]:
    from orchestrator.lab.flows import UDP_PORT
    from orchestrator.lab.plan import NODE_UPLINK_PORT

    from .vmtrace import MoveFacts, timeline

    guest = t.guest(GUEST)
    with events.lock:
        qemu, life = list(events.qemu), list(events.lifecycle)
    facts = MoveFacts(
        src=m["from"], dst=m["to"], window=window, qemu=qemu, lifecycle=life,
        downtime_ms=m["downtime_ms"], packets=packets, pings=pings,
        arrivals={r.name: [at for at, _ in r.gaps[:-1]] for r in results},
        guest_mac=guest.macs[0].lower(), guest_ip=str(guest.addresses[0]),
        gateway=str(t.cluster.gateway), pipes=frozenset(p for n in t.nodes for p in n.pipes),
        uplinks=frozenset({t.cluster.uplink, NODE_UPLINK_PORT}),
        node_pub={n.name: str(n.pub_ip) for n in t.nodes}, udp_port=UDP_PORT,
        cutover_at=cutover)
    return timeline(facts)


def gap_bound(m: dict[str, Any], warm_reply_ms: float | None) -> dict[str, Any]:
    """The target beside what it runs into, measured in the same move: the UDP flows' dark
    time (no retransmission in it: the floor for every flow), made of QEMU's pause and the
    time the guest took to answer its first datagram after the resume (TCG translating
    the guest's code afresh in the new QEMU; ``warm_reply_ms``: the same after a pause in
    place, its translations kept), and what TCP added on top of it."""
    tl = m["timeline"]
    udp = [f["dark_ms"] for f in tl.get("udp", {}).values() if f.get("dark_ms") is not None]
    dark = max(udp) if udp else None
    tcp = [g for name, g in m["flows"].items() if not name.startswith("udp@")]
    down = m["downtime_ms"]
    return {"target_ms": None if down is None else round(down + TARGET_OVER_DOWNTIME_MS, 1),
            "udp_dark_ms": dark, "qemu_pause_ms": tl.get("qemu_pause_ms"),
            "guest_first_udp_reply_ms": tl.get("guest_first_ms", {}).get("udp"),
            "warm_guest_first_udp_reply_ms": warm_reply_ms,
            "tcp_over_udp_dark_ms": (round(max(tcp) - dark, 1)
                                     if tcp and dark is not None else None)}


def cutover_after(lab: Any, dst: str, since: float) -> float | None:
    """When the cutover to ``dst`` was committed (its audit record), after ``since``."""
    for line in (lab.dir / "audit.log").read_text().splitlines():
        r = json.loads(line)
        if r.get("action") == "migration.cutover" and r.get("to_node") == dst:
            at = datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
            if at >= since:
                return at
    return None


def hook_cost(lab: Any) -> dict[str, Any]:
    """The installed hook run as libvirt runs it (its shebang, libvirt's environment, a
    recorded domain XML): answered by n1's agent, then spooled with that agent away."""
    t = lab.topology()
    root = lab.driver(t).daemon(t, "n1").root
    hook = root / "etc/libvirt/hooks/qemu.d/convergent"
    xml = (Path(__file__).resolve().parents[1] / "tests/data/libvirt/start.jsonl")
    stdin = next(json.loads(x)["stdin"] for x in xml.read_text().splitlines()
                 if '"started"' in x and '"hook"' in x)
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}

    def runs() -> list[float]:
        out = []
        for _ in range(HOOK_RUNS):
            t0 = time.perf_counter()
            subprocess.run([str(hook), GUEST, "started", "begin", "-"], input=stdin.encode(),
                           env=env, check=True, capture_output=True)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    up = runs()
    lab.kill_agent("n1")
    spool = t.agent.spool("n1")
    before = set(spool.glob("*.call.json")) if spool.exists() else set()
    down = runs()
    for p in set(spool.glob("*.call.json")) - before:
        p.unlink()  # not a guest event: nothing for a restarted agent to replay
    lab.start_agent("n1")
    return {"runs": HOOK_RUNS, "agent_up_ms": _stats(up), "spooled_ms": _stats(down)}


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 1), "p90": round(xs[int(len(xs) * .9)], 1),
            "min": round(xs[0], 1)}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.lab import netns as ns
    from orchestrator.lab.flows import demo_config
    from orchestrator.lab.lab import Lab

    lab = Lab(f"bv-{uuid.uuid4().hex[:6]}")
    try:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "demo.toml"
            cfg.write_text(demo_config(3, lab.name))
            t = lab.up(config=cfg, hypervisor="libvirt")
        up_s = time.time() - t0
        for node in t.nodes:
            ns.in_ns(lab.names.node(node.name), "sysctl", "-q", "-w",
                     f"net.netfilter.nf_conntrack_tcp_loose={opts.tcp_loose}")
        drv: Any = lab.driver(t)
        events = Events({n.name: drv.daemon(t, n.name).uri for n in t.nodes})
        hook = hook_cost(lab) if opts.hook else None
        result: dict[str, Any] = {
            "lab_up_s": round(up_s, 1), "tcp_loose": opts.tcp_loose, "settle_s": opts.settle,
            "max_downtime_ms": opts.max_downtime, "p2p": opts.p2p,
            "load_before": os.getloadavg()[0]}
        for mode in opts.modes:
            result[mode] = tour(lab, events, mode == "handover", opts.settle, opts)
        result.update({"hook": hook, "load": os.getloadavg()[0], "cpus": os.cpu_count()})
        return result
    finally:
        lab.down()


def render(r: dict[str, Any]) -> str:
    lines = [f"lab up {r['lab_up_s']} s, tcp_loose={r['tcp_loose']}, max downtime "
             f"{r['max_downtime_ms'] or 'default'}, p2p={r['p2p']}, load "
             f"{r['load_before']:.1f}-{r['load']:.1f}"]
    for mode in ("handover", "control"):
        if mode not in r:
            continue
        m = r[mode]
        lines.append(f"{mode}: {m['survived']}/{m['flows']} flows survived, resets "
                     f"{m['resets'] or 'none'}, failed {m.get('failed') or 'none'}")
        for x in m["migrations"]:
            extra = (f", resume->cutover {x['resume_to_cutover_ms']} ms"
                     if "resume_to_cutover_ms" in x else "")
            lines.append(f"  {x['from']}->{x['to']} ({x['kind']}, TCG blocks "
                         f"{x['tcg_tbs']}): downtime {x['downtime_ms']} ms, largest "
                         f"gap {x['largest_gap_ms']} ms, virsh {x['virsh_s']} s{extra}, "
                         f"died {x['died'] or 'none'}, stalled > 2 s {x['stalled'] or 'none'}")
            lines += ["    " + ln for ln in render_timeline(x["timeline"], x["bound"])]
            if x.get("cpu_after_resume_ms"):
                lines.append(f"    CPU ms in the first {CPU_WINDOW_S * 1000:.0f} ms after the "
                             f"resume (2 cores): {cpu_summary(x['cpu_after_resume_ms'])}")
    h = r["hook"]
    if h:
        lines.append(f"hook: agent up {h['agent_up_ms']['median']} ms, spooled "
                     f"{h['spooled_ms']['median']} ms (median of {h['runs']})")
    return "\n".join(lines)


def cpu_summary(cpu: dict[str, Any]) -> str:
    """The destination's QEMU, convergent (agents + hooks), libvirtd, the whole machine."""
    def total(prefix: str) -> int:
        return sum(v or 0 for k, v in cpu.items() if k.startswith(prefix))
    qemu = {k: v for k, v in cpu.items() if k.startswith("qemu@")}
    return (f"QEMU {qemu}, agents {total('agent@')}, hooks {total('hooks@')}, libvirtd "
            f"{total('libvirtd@')}, machine {cpu.get('machine')}")


def render_timeline(tl: dict[str, Any], bound: dict[str, Any]) -> list[str]:
    if "error" in tl:
        return [tl["error"]]
    steps = ", ".join(f"{k} {v:+.0f}" for k, v in tl["steps_ms"].items() if v is not None)
    udp = "; ".join(f"{k}: dark {v['dark_ms']} (last {v['last_before_ms']}, first "
                    f"{v['first_after_ms']}, guest reply on D's tap "
                    f"{v['guest_reply_on_dst_tap_ms']}, out via {','.join(v['replied_out_via'])})"
                    for k, v in tl["udp"].items())
    return [f"pause: QEMU {tl['qemu_pause_ms']} ms, events {tl['events_pause_ms']} ms, "
            f"libvirt downtime {tl['libvirt_downtime_ms']} ms",
            f"steps (ms from D's RESUME): {steps}",
            f"RARP reached {tl['rarp_reached_ms']}, gateway GARP {tl['gateway_garp_ms']}",
            f"guest's first frames on D's tap {tl['guest_first_ms']}",
            f"first ping reply per node {tl['ping_first_reply_ms']}",
            f"udp {udp}",
            f"target {bound['target_ms']} ms; UDP dark {bound['udp_dark_ms']} ms (no "
            f"retransmission: every flow's floor) = QEMU's pause {bound['qemu_pause_ms']} + the "
            f"guest's first UDP answer {bound['guest_first_udp_reply_ms']} ms after the resume "
            f"(after a pause in place: {bound['warm_guest_first_udp_reply_ms']}); TCP on top "
            f"{bound['tcp_over_udp_dark_ms']} ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--tcp-loose", type=int, choices=(0, 1), default=0)
    ap.add_argument("--max-downtime", type=int, default=None, metavar="MS",
                    help="virsh migrate-setmaxdowntime on the source before each move")
    ap.add_argument("--p2p", action="store_true", help="virsh migrate --p2p")
    ap.add_argument("--modes", type=lambda v: v.split(","), default=["handover", "control"],
                    help="tours to run, of handover,control")
    ap.add_argument("--local-pause", type=float, default=0.3, metavar="S",
                    help="after the handover tour: suspend and resume the guest in place "
                         "for S seconds, the same pause without a move (0: skip)")
    ap.add_argument("--trace-dir", type=Path, default=None,
                    help="keep the captures and pings there (default: the lab's, removed)")
    ap.add_argument("--no-hook", dest="hook", action="store_false",
                    help="skip the hook's cost")
    a = ap.parse_args()
    result = run(a)
    print(json.dumps(result, indent=1) if a.json else render(result))


if __name__ == "__main__":
    main()
