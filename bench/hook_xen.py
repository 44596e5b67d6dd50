"""What convergent's vif script adds to a guest's boot and migration path, beside Debian's
plain vif-bridge run the same way in the same run.

Two identical dom0s in namespaces (a bridge, netback's vif, the stand-in xenstore written as
libxl writes it); each round runs, interleaved, ``/bin/true`` (the floor: what running
anything as libxl does costs here), vif-bridge ``online`` and ``offline`` on one dom0 and
convergent-vif (wrapping vif-bridge) on the other, every call with libxl's argv and
environment in the node's namespace. convergent-vif talks to the agent's real API server
answering ``hook.deliver`` at once ("agent up"), then to no agent at all ("spooled").
Reported: p50/p99 wall time per script and action, what the wrapper adds (its
percentile minus vif-bridge's), and the wrapper's own cost measured around ``/bin/true``
(paired per round, so vif-bridge's own spread does not drown it). Target: ≤ 15 ms added at
p99.

    python -m bench.hook_xen [--calls N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import BenchNamespaces, load_average
from orchestrator.agent.api import ApiServer
from orchestrator.xen.lab.rig import DEVID, DOMID, VifRig


class _Agent:
    """The agent's API server on its own loop, answering hook.deliver at once."""

    def __init__(self, path: Path) -> None:
        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.server = ApiServer(path, {"hook.deliver": self._deliver})
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    async def _deliver(self, call: dict[str, Any]) -> dict[str, str]:
        self.calls += 1
        return {"verdict": "allow"}

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return round(values[0], 2) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 2)


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99), "calls": len(values)}


def run(calls: int, work: Path) -> dict[str, Any]:
    with BenchNamespaces() as lab:
        sock = work / "run" / "agent-n1.sock"
        conf = {"socket": str(sock), "spool_dir": str(work / "spool"), "timeout_s": 1.5,
                "node": "n1", "wrap": "vif-bridge"}
        plain = VifRig.build(lab.netns("pn"), lab.netns("pg"), work / "plain", work / "bin")
        ours = VifRig.build(lab.netns("on"), lab.netns("og"), work / "ours", work / "bin", conf)
        # the wrapper around /bin/true: its own cost, without vif-bridge's
        thin = VifRig.build(lab.netns("tn"), lab.netns("tg"), work / "thin", work / "bin",
                            {**conf, "wrap": "/bin/true"})
        for rig in (plain, ours, thin):
            rig.plug("guest1")
        agent: _Agent | None = _Agent(sock)
        delivered = 0
        times: dict[str, list[float]] = {}
        own: dict[str, list[float]] = {"agent up": [], "spooled": []}

        def timed(label: str, rig: VifRig, script: str, verb: str) -> float:
            t0 = time.perf_counter()
            res = rig.dom0.hotplug(script, verb, DOMID, DEVID)
            took = (time.perf_counter() - t0) * 1000
            if res.returncode != 0:
                raise RuntimeError(f"{label}: exit {res.returncode}: {res.stderr.strip()}")
            times.setdefault(label, []).append(took)
            return took

        try:
            for i in range(calls):
                spooled = i >= calls // 2  # the second half: no agent listening
                if spooled and agent is not None:
                    delivered = agent.calls
                    agent.close()
                    agent = None
                mode = "spooled" if spooled else "agent up"
                floor = timed("/bin/true", thin, "/bin/true", "add")
                wrapped = timed(f"convergent-vif around /bin/true, {mode}", thin, thin.script,
                                "add")
                own[mode].append(wrapped - floor)
                for action, verb in (("online", "add"), ("offline", "remove")):
                    timed(f"vif-bridge {action}", plain, plain.script, verb)
                    timed(f"convergent-vif {action}, {mode}", ours, ours.script, verb)
        finally:
            if agent is not None:
                delivered = agent.calls
                agent.close()
        spooled_files = len(list((work / "spool").glob("*.call.json")))
    added = {}
    for action in ("online", "offline"):
        base = times[f"vif-bridge {action}"]
        for mode in ("agent up", "spooled"):
            key = f"convergent-vif {action}, {mode}"
            added[f"{action}, {mode}"] = {
                "p50_ms": round(_pct(times[key], 50) - _pct(base, 50), 2),
                "p99_ms": round(_pct(times[key], 99) - _pct(base, 99), 2)}
    return {"bench": "hook.xen-vif", "rounds": calls, "load": load_average(),
            "times": {k: _summary(v) for k, v in times.items()},
            "added_by_wrapper": added,
            "wrapper_own_cost": {k: _summary(v) for k, v in own.items()},
            "spooled_files": spooled_files, "delivered_while_up": delivered,
            "target_p99_added_ms": 15.0}


def render(r: dict[str, Any]) -> str:
    lines = [f"vif hotplug calls as libxl runs them ({r['rounds']} rounds, load "
             f"{r['load']})", f"{'':46}{'p50 ms':>9}{'p99 ms':>9}"]
    for k, v in r["times"].items():
        lines.append(f"{k:46}{v['p50_ms']:>9}{v['p99_ms']:>9}")
    lines.append("added by convergent-vif over vif-bridge:")
    for k, v in r["added_by_wrapper"].items():
        lines.append(f"  {k:44}{v['p50_ms']:>9}{v['p99_ms']:>9}")
    lines.append("the wrapper's own cost (around /bin/true, paired per round):")
    for k, v in r["wrapper_own_cost"].items():
        lines.append(f"  {k:44}{v['p50_ms']:>9}{v['p99_ms']:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hook_xen", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="rounds (each: every kind once)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cvb-xenvif-"))
    try:
        r = run(max(2, args.calls), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(r) if args.json else render(r))


if __name__ == "__main__":
    main()
