"""Record what a real libvirt tells a node: every qemu hook call (argv, environment, stdin)
and every domain event, on all three nodes of a libvirt lab, while a real TCG guest starts,
live-migrates (client-managed, peer-to-peer, post-copy), gets its migration aborted and
vetoed, survives a libvirtd restart and is destroyed. One JSON-lines file per scenario
lands beside this script; the adapter's unit tests replay them.

    .venv/bin/python tests/data/libvirt/record.py      # as root, ~3 minutes

Nothing here is convergent's hook: a recording hook (stdlib, writes one line per call and
prints nothing) sits in each node's hooks/qemu.d, and, for the veto, a second one that
fails ``migrate begin`` as convergent's would.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import libvirt

from orchestrator.kvm.domxml import lab_domain_xml
from orchestrator.kvm.image import ensure_image
from orchestrator.lab.flows import demo_config
from orchestrator.lab.lab import Lab

OUT = Path(__file__).parent
GUEST = "guest1"
RECORD_HOOK = """#!/usr/bin/python3 -IS
import json, os, sys, time
rec = {"t": time.time(), "argv": sys.argv[1:], "env": dict(os.environ),
       "stdin": sys.stdin.read()}
with open(OUT, "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""
VETO_HOOK = """#!/bin/sh
cat >/dev/null
if [ "$2" = migrate ] && [ "$3" = begin ]; then
    echo "convergent: guest $1 is unknown to the cluster" >&2
    exit 1
fi
"""
EVENT_NAMES = {v: k[len("VIR_DOMAIN_EVENT_"):] for k, v in vars(libvirt).items()
               if k.startswith("VIR_DOMAIN_EVENT_") and "_" not in k[len("VIR_DOMAIN_EVENT_"):]
               and isinstance(v, int)}


def detail_name(kind: int, detail: int) -> str:
    prefix = f"VIR_DOMAIN_EVENT_{EVENT_NAMES.get(kind, '?')}_"
    for k, v in vars(libvirt).items():
        if k.startswith(prefix) and v == detail and not k.endswith("_LAST"):
            return k[len(prefix):]
    return str(detail)


class Events:
    """Domain events of every daemon, with libvirt's default event loop in a thread."""

    def __init__(self, uris: dict[str, str]) -> None:
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.uris = uris
        self.conns: dict[str, libvirt.virConnect] = {}
        libvirt.virEventRegisterDefaultImpl()
        for node in uris:
            self.connect(node)
        threading.Thread(target=self.loop, daemon=True).start()

    def add(self, node: str, **fields: Any) -> None:
        with self.lock:
            self.records.append({"t": time.time(), "node": node, "source": "event", **fields})

    def connect(self, node: str) -> None:
        c = libvirt.open(self.uris[node])
        c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.lifecycle, node)
        c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
                                 self.iteration, node)
        c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                 self.job_completed, node)
        c.registerCloseCallback(self.closed, node)
        c.setKeepAlive(5, 3)
        self.conns[node] = c

    def lifecycle(self, conn: Any, dom: Any, kind: int, detail: int, node: str) -> None:
        self.add(node, event="lifecycle", domain=dom.name(), type=kind, detail=detail,
                 type_name=EVENT_NAMES.get(kind, str(kind)), detail_name=detail_name(kind, detail))

    def iteration(self, conn: Any, dom: Any, iteration: int, node: str) -> None:
        self.add(node, event="migration-iteration", domain=dom.name(), iteration=iteration)

    def job_completed(self, conn: Any, dom: Any, params: dict[str, Any], node: str) -> None:
        self.add(node, event="job-completed", domain=dom.name(), params=params)

    def closed(self, conn: Any, reason: int, node: str) -> None:
        self.add(node, event="close", reason=reason)

    def loop(self) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


def main() -> None:
    lab = Lab("rec")
    cfg = OUT / ".record.toml"
    # guest1 without a home: the lab boots nothing, the recording starts before the boot
    cfg.write_text(demo_config(3, lab.name, GUEST).replace('home = "n1"\n', ""))
    t = lab.up(config=cfg, agents=False, hypervisor="libvirt")
    cfg.unlink()
    try:
        run(lab, t)
    finally:
        lab.down()


def run(lab: Lab, t: Any) -> None:
    vl = lab.driver(t)
    daemons = vl.daemons(t)
    hook_logs = {}
    for node, d in daemons.items():  # libvirt's calls alone: convergent's hook out
        qd = d.hooks_dir / "qemu.d"
        (qd / "convergent").unlink()
        hook_logs[node] = d.root / "hooks.jsonl"
        (qd / "record").write_text(RECORD_HOOK.replace("OUT", repr(str(hook_logs[node]))))
        (qd / "record").chmod(0o755)
    events = Events({n: d.uri for n, d in daemons.items()})
    image = ensure_image()

    def scenario(name: str, settle: float = 3.0) -> Any:
        def wrap(fn: Any) -> None:
            start = time.time()
            fn()
            time.sleep(settle)
            save(name, start, time.time(), events, hook_logs)
        return wrap

    @scenario("start")
    def _start() -> None:
        vl.boot(t, GUEST, "n1", image)

    @scenario("migrate")
    def _migrate() -> None:
        vl.virsh_migrate(t, GUEST, "n1", "n2")

    @scenario("migrate-p2p")
    def _p2p() -> None:
        vl.virsh_migrate(t, GUEST, "n2", "n3", p2p=True)

    @scenario("postcopy")
    def _postcopy() -> None:
        argv = vl.migrate_argv(t, GUEST, "n3", "n1", extra=("--postcopy", "--bandwidth", "4"))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        vl.daemon(t, "n3").virsh("migrate-postcopy", GUEST)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    @scenario("abort")
    def _abort() -> None:
        argv = vl.migrate_argv(t, GUEST, "n1", "n2", extra=("--bandwidth", "2"))
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not vl.state(t, GUEST, "n2"):
            time.sleep(0.1)
        time.sleep(1.5)
        vl.daemon(t, "n1").virsh("domjobabort", GUEST)
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0 and "canceled" in err, err

    @scenario("veto")
    def _veto() -> None:
        veto = daemons["n2"].hooks_dir / "qemu.d" / "zz-veto"
        veto.write_text(VETO_HOOK)
        veto.chmod(0o755)
        try:
            p = vl.virsh_migrate(t, GUEST, "n1", "n2", check=False)
            assert p.returncode != 0 and "unknown to the cluster" in p.stderr, p.stderr
        finally:
            veto.unlink()

    @scenario("restart")
    def _restart() -> None:
        daemons["n1"].stop()
        daemons["n1"].start()
        events.connect("n1")

    @scenario("destroy")
    def _destroy() -> None:
        vl.daemon(t, "n1").virsh("destroy", GUEST)

    @scenario("metadata-start")
    def _metadata() -> None:
        xml = lab_domain_xml(vl.domain(t, GUEST, image, metadata_only=True))
        vl.boot(t, GUEST, "n2", image, xml=xml)
        vl.daemon(t, "n2").virsh("destroy", GUEST)


def save(name: str, start: float, end: float, events: Events,
         hook_logs: dict[str, Path]) -> None:
    rows = [r for r in events.records if start <= r["t"] <= end]
    for node, log in hook_logs.items():
        if log.exists():
            for line in log.read_text().splitlines():
                r = json.loads(line)
                if start <= r["t"] <= end:
                    rows.append({"t": r["t"], "node": node, "source": "hook", "argv": r["argv"],
                                 "env": r["env"], "stdin": r["stdin"]})
    rows.sort(key=lambda r: r["t"])
    (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} records", flush=True)


if __name__ == "__main__":
    main()
