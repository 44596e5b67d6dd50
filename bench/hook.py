"""What one hook call costs the hypervisor: ``python -m bench.hook --json``.

The lab's hook (``hooks/lab``, run as a hypervisor runs a hook: exec'd through its
``#!/usr/bin/python3 -IS`` line, with a bare environment) against, in turn:

- **agent up**: the agent's real API server and intake (``hook.deliver``: the adapter
  parses the call, the store gives the guest's facts, the event table decides; here a
  "started" for a guest this node already owns, so nothing changes and every call takes
  the whole read path), in a thread of this process, with a real SQLite store;
- **agent hung**: a socket that accepts and never answers (a stopped or deadlocked agent):
  each call waits out the hook's timeout (``--hung-timeout``, 0.25 s, so 200 calls take a
  minute; the bound is relative to it), then spools and exits 0;
- **agent absent**: no socket at all: the hook spools at once;
- ``/bin/true`` exec'd the same way: the floor (what starting any process costs here);
  and, to show where a hook's time goes, ``python3 -IS -c pass`` (the interpreter's
  start-up) and ``python3 -IS -c "import json"`` (plus the one module a hook cannot do
  without: it pulls in ``re`` and ``enum``).

Rounds are interleaved (true, up, absent, hung), ``--calls`` each. Reported: p50/p99 wall
time per kind. Targets: p99 <= 15 ms with the agent up; never longer than the timeout +
100 ms with it hung.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import load_average
from orchestrator.agent.api import ApiServer
from orchestrator.agent.events import Op
from orchestrator.agent.guests import GuestBook
from orchestrator.agent.intake import Intake
from orchestrator.audit.log import AuditLog
from orchestrator.config.loader import parse
from orchestrator.hypervisor import GuestEvent, Hypervisor
from orchestrator.lab.hookrun import hook_path
from orchestrator.lab.hypervisor import LabHypervisor
from orchestrator.lab.plan import default_config
from orchestrator.logs import configure as configure_logs
from orchestrator.store import open_store
from orchestrator.store.base import Store

TARGET_UP_P99_MS = 15.0
PYTHON = "/usr/bin/python3"  # what the hooks' #! line runs
HOOKS = Path(__file__).resolve().parent.parent / "hooks"
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "libvirt"
HUNG_SLACK_MS = 100.0


def _libvirt_adapter() -> Hypervisor | None:
    """The libvirt adapter as a KVM node's agent has it (parsing a call needs no libvirtd),
    or None where libvirt-python is not installed."""
    try:
        from orchestrator.kvm.adapter import LibvirtHypervisor
    except ImportError:
        return None
    return LibvirtHypervisor({"uri": "qemu:///system"}, "n1")


def _started_xml() -> str:
    """The domain XML libvirt gave the qemu hook at ``started begin`` (a recording)."""
    for line in (DATA / "start.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("argv", [])[1:3] == ["started", "begin"]:
            return str(rec["stdin"])
    raise RuntimeError(f"no 'started begin' call in {DATA / 'start.jsonl'}")


class _Agent:
    """The agent's intake behind its API server, on a loop of its own."""

    def __init__(self, work: Path, name: str, hv: Hypervisor) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sock = work / f"{name}.sock"
        self.server, self.store, self.intake = self._call(self._start(work / name, hv))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, work: Path, hv: Hypervisor) -> tuple[ApiServer, Store, Intake]:
        work.mkdir()
        t = parse(default_config(3))
        store = await open_store(f"sqlite://{work / 'store.db'}")
        for n in t.nodes:
            await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
        await store.claim_all({a: 0 for a in t.guest("guest1").addresses}, "n1", "guest1")
        audit = AuditLog(work / "audit.log", node="n1", actor="agent")

        async def execute(op: Op, event: GuestEvent) -> Any:
            raise AssertionError(f"the bench's calls change nothing, got {op.name}")

        intake = Intake("n1", hv, GuestBook(t, hv), store, audit, execute, work / "spool-up")
        server = ApiServer(self.sock, {"hook.deliver": intake.deliver})
        await server.start()
        return server, store, intake

    def close(self) -> None:
        self._call(self.server.close())
        self._call(self.store.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _hung(path: Path) -> socket.socket:
    """Accepts (the kernel does, into the backlog) and never answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4096)
    return s


def _conf(work: Path, name: str, sock: Path, timeout: float) -> Path:
    path = work / f"{name}.json"
    path.write_text(json.dumps({"socket": str(sock), "spool_dir": str(work / f"spool-{name}"),
                                "timeout_s": timeout, "node": "n1"}))
    return path


def _pct(values: list[float], q: int) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": _pct(values, 50), "p99_ms": _pct(values, 99),
            "max_ms": round(max(values), 2), "calls": len(values)}


def run(calls: int, hung_timeout: float, work: Path) -> dict[str, Any]:
    hook = str(hook_path())
    agent = _Agent(work, "up", LabHypervisor({"lab": "bench", "dir": str(work / "bench")}, "n1"))
    libvirt_hv = _libvirt_adapter()
    kvm = _Agent(work, "kvm", libvirt_hv) if libvirt_hv is not None else None
    hung = _hung(work / "hung.sock")
    confs = {"agent up": _conf(work, "up", agent.sock, 1.5),
             "agent hung": _conf(work, "hung", work / "hung.sock", hung_timeout),
             "agent absent": _conf(work, "absent", work / "nobody.sock", 1.5)}
    qemu_hook = [str(HOOKS / "libvirt-qemu"), "guest1", "started", "begin", "-"]
    qemu_xml = _started_xml().encode()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    floors = {"/bin/true": ["/bin/true"], "python3 -IS": [PYTHON, "-IS", "-c", "pass"],
              "python3 -IS json": [PYTHON, "-IS", "-c", "import json"]}
    times: dict[str, list[float]] = {k: [] for k in (*floors, *confs)}

    if kvm is not None:
        times["libvirt hook, agent up"] = []
        kvm_conf = _conf(work, "kvm", kvm.sock, 1.5)

    def timed(label: str, argv: list[str], conf: Path | None, stdin: bytes = b"") -> None:
        e = {**env, "CONVERGENT_HOOK_CONF": str(conf)} if conf else env
        t0 = time.perf_counter()
        done = subprocess.run(argv, env=e, input=stdin, capture_output=True)
        times[label].append((time.perf_counter() - t0) * 1000)
        if done.returncode != 0:
            raise RuntimeError(f"{label}: exit {done.returncode}: {done.stderr.decode()}")

    try:
        for _ in range(calls):
            for label, argv in floors.items():
                timed(label, argv, None)
            for label, conf in confs.items():
                timed(label, [hook, "started", "guest1"], conf)
            if kvm is not None:
                timed("libvirt hook, agent up", qemu_hook, kvm_conf, qemu_xml)
        counts = dict(agent.intake.counts)
        kvm_counts = dict(kvm.intake.counts) if kvm is not None else None
    finally:
        hung.close()
        agent.close()
        if kvm is not None:
            kvm.close()
    spool_of = {"agent hung": "hung", "agent absent": "absent", "libvirt hook": "kvm"}
    spooled = {k: len(list((work / f"spool-{n}").glob("*.call.json"))) for k, n in spool_of.items()}
    up, hung_t = _summary(times["agent up"]), _summary(times["agent hung"])
    lv = times.get("libvirt hook, agent up")
    lv_met = _summary(lv)["p99_ms"] <= TARGET_UP_P99_MS if lv else None
    bound = hung_timeout * 1000 + HUNG_SLACK_MS
    return {"bench": "hook", "calls": calls, "load": load_average(), "hook": hook,
            "hung_timeout_s": hung_timeout,
            "times": {k: _summary(v) for k, v in times.items()},
            "agent_intake": counts, "libvirt_intake": kvm_counts, "spooled": spooled,
            "targets": {"up_p99_ms": TARGET_UP_P99_MS, "hung_max_ms": bound},
            "met": {"up_p99": up["p99_ms"] <= TARGET_UP_P99_MS,
                    "libvirt_up_p99": lv_met,
                    "hung_max": hung_t["max_ms"] <= bound}}


def render(r: dict[str, Any]) -> str:
    lines = [f"one hook call, exec'd as a hypervisor runs it ({r['calls']} calls each, "
             f"load {r['load']}; hung timeout {r['hung_timeout_s']} s)",
             f"{'':24}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for k, v in r["times"].items():
        lines.append(f"{k:24}{v['p50_ms']:>9}{v['p99_ms']:>9}{v['max_ms']:>9}")
    t, m = r["targets"], r["met"]
    lines.append(f"targets: up p99 <= {t['up_p99_ms']} ms ({'met' if m['up_p99'] else 'MISSED'}), "
                 f"hung <= {t['hung_max_ms']:.0f} ms ({'met' if m['hung_max'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hook",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per kind (at least 2)")
    p.add_argument("--hung-timeout", type=float, default=0.25,
                   help="the hook's timeout_s against the hung agent")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    configure_logs("warning")  # stdout is the report; the intake logs every call at info
    work = Path(tempfile.mkdtemp(prefix="cvb-hook-"))
    try:
        r = run(max(2, args.calls), args.hung_timeout, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(r) if args.json else render(r))


if __name__ == "__main__":
    main()
