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
"""

from __future__ import annotations

import argparse
import json
import os
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


class Events:
    """libvirt's events on every node, timestamped on arrival (libvirt's default event
    loop, in a thread of its own)."""

    def __init__(self, uris: dict[str, str]) -> None:
        import libvirt

        self.lock = threading.Lock()
        self.jobs: list[tuple[float, str, dict[str, Any]]] = []  # (at, node, stats)
        self.resumed: list[tuple[float, str]] = []  # (at, node): RESUMED/MIGRATED|POSTCOPY
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        libvirt.virEventRegisterDefaultImpl()
        self.conns = []
        for node, uri in uris.items():
            c = libvirt.open(uri)
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                     self._lifecycle, node)
            c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                     self._job, node)
            self.conns.append(c)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        import libvirt

        while True:
            libvirt.virEventRunDefaultImpl()

    def _lifecycle(self, _c: Any, _dom: Any, event: int, detail: int, node: str) -> None:
        if event == 4 and detail in (1, 3):  # RESUMED / MIGRATED, POSTCOPY
            with self.lock:
                self.resumed.append((time.time(), node))

    def _job(self, _c: Any, _dom: Any, stats: dict[str, Any], node: str) -> None:
        with self.lock:
            self.jobs.append((time.time(), node, dict(stats)))

    def job_after(self, node: str, since: float) -> dict[str, Any] | None:
        with self.lock:
            return next((s for at, n, s in self.jobs if n == node and at >= since), None)

    def resume_after(self, node: str, since: float) -> float | None:
        with self.lock:
            return next((at for at, n in self.resumed if n == node and at >= since), None)


def tour(lab: Any, events: Events, handover: bool, settle: float) -> dict[str, Any]:
    from orchestrator.lab.flows import start_flows

    t = lab.topology()
    drv = lab.driver(t)
    if not handover:
        for node in t.nodes:
            subprocess.run([sys.executable, "-m", "orchestrator", "install-hooks", "--libvirt",
                            "--uninstall", "--root", str(drv.daemon(t, node.name).root)],
                           check=True, capture_output=True)
            lab.kill_agent(node.name)
    flows = start_flows(lab, t, GUEST, [n.name for n in t.nodes])
    moves = []
    try:
        time.sleep(settle)
        for dst in TOUR:
            src = lab.guest_node(t, GUEST)
            start = time.time()
            drv.virsh_migrate(t, GUEST, src, dst)
            end = time.time()
            if not handover:  # the guest's gateway entry lapses, compressed
                drv.ssh(t, GUEST, "ip neigh flush dev eth0")
            time.sleep(settle)
            moves.append({"from": src, "to": dst, "start": start, "virsh_s": end - start})
    finally:
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
        if handover:
            m["resume_to_cutover_ms"] = resume_to_cutover(lab, events, m["to"], m["start"])
        m["virsh_s"] = round(m["virsh_s"], 2)
        del m["start"]
    return {"migrations": moves,
            "survived": sum(r.survived for r in results), "flows": len(results),
            "resets": sorted(r.name for r in results
                             if r.error and ("reset" in r.error.lower()
                                             or "closed" in r.error.lower()))}


def resume_to_cutover(lab: Any, events: Events, dst: str, since: float) -> float | None:
    resumed = events.resume_after(dst, since)
    for line in (lab.dir / "audit.log").read_text().splitlines():
        r = json.loads(line)
        if r.get("action") == "migration.cutover" and r.get("to_node") == dst:
            at = datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
            if resumed is not None and at >= resumed:
                return round((at - resumed) * 1000, 1)
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


def run(settle: float, tcp_loose: int) -> dict[str, Any]:
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
                     f"net.netfilter.nf_conntrack_tcp_loose={tcp_loose}")
        drv: Any = lab.driver(t)
        events = Events({n.name: drv.daemon(t, n.name).uri for n in t.nodes})
        hook = hook_cost(lab)
        on = tour(lab, events, True, settle)
        off = tour(lab, events, False, settle)
        return {"lab_up_s": round(up_s, 1), "tcp_loose": tcp_loose, "settle_s": settle,
                "handover": on, "control": off, "hook": hook,
                "load": os.getloadavg()[0], "cpus": os.cpu_count()}
    finally:
        lab.down()


def render(r: dict[str, Any]) -> str:
    lines = [f"lab up {r['lab_up_s']} s, tcp_loose={r['tcp_loose']}, load {r['load']:.1f}"]
    for mode in ("handover", "control"):
        m = r[mode]
        lines.append(f"{mode}: {m['survived']}/{m['flows']} flows survived, resets "
                     f"{m['resets'] or 'none'}")
        for x in m["migrations"]:
            extra = (f", resume->cutover {x['resume_to_cutover_ms']} ms"
                     if "resume_to_cutover_ms" in x else "")
            lines.append(f"  {x['from']}->{x['to']}: downtime {x['downtime_ms']} ms, largest "
                         f"gap {x['largest_gap_ms']} ms, virsh {x['virsh_s']} s{extra}, "
                         f"died {x['died'] or 'none'}, stalled > 2 s {x['stalled'] or 'none'}")
    h = r["hook"]
    lines.append(f"hook: agent up {h['agent_up_ms']['median']} ms, spooled "
                 f"{h['spooled_ms']['median']} ms (median of {h['runs']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--tcp-loose", type=int, choices=(0, 1), default=0)
    a = ap.parse_args()
    result = run(a.settle, a.tcp_loose)
    print(json.dumps(result, indent=1) if a.json else render(result))


if __name__ == "__main__":
    main()
