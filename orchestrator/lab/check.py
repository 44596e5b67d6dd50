"""The seed acceptance (seeds/000 and 001), run inside a lab, one verdict per check."""

from __future__ import annotations

import base64
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Mode, Node, Topology
from orchestrator.errors import LabError
from orchestrator.lab import netns as ns
from orchestrator.lab import probe as probe_module
from orchestrator.lab.lab import WORKSTATION_TCP_PORT, Lab


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def probe(netns: str, kind: str, host: str, port: int) -> dict[str, Any]:
    out = ns.in_ns(netns, sys.executable, "-m", "orchestrator.lab.probe", kind, host,
                   str(port), check=False)
    try:
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": "probe printed nothing"}
    return result


def probe_from_guest(lab: Lab, t: Topology, guest: str, kind: str, host: str,
                     port: int) -> dict[str, Any]:
    """``probe`` run where the guest's own stack is: its namespace, or inside its VM (the
    same probe, its source sent over the driver's ssh: the guest image has python3)."""
    drv = lab.driver(t)
    if getattr(drv, "guests_in_namespaces", True):
        return probe(lab.names.guest(guest), kind, host, port)
    ssh = getattr(drv, "ssh", None)
    if ssh is None:
        return {"ok": False, "error": "this lab's guests are VMs the lab cannot log in to"}
    source = base64.b64encode(Path(probe_module.__file__).read_bytes()).decode()
    try:
        out = ssh(t, guest, f"echo {source} | base64 -d | python3 - {kind} {host} {port}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (LabError, ValueError, IndexError) as exc:
        result = {"ok": False, "error": f"probe in the VM: {exc}"}
    return result


def parse_answer(answer: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", answer))


def ct_mark(netns: str, proto: str, src: str, sport: str) -> int | None:
    """The mark of the entry with this original source, via the conntrack CLI."""
    out = ns.in_ns(netns, "conntrack", "-L", "-p", proto, "--orig-src", src,
                   "--orig-port-src", sport, check=False)
    m = re.search(r"mark=(\d+)", out)
    return int(m.group(1)) if m else None


def run_checks(lab: Lab) -> list[Check]:
    t = lab.topology()
    answers = getattr(lab.driver(t), "answers_probes", lambda proto, port: True)
    checks: list[Check] = []
    for guest in t.guests:
        host = lab.guest_node(t, guest.name)
        if host is None:
            checks.append(Check(f"{guest.name} placed", False, "its vif is on no node"))
            continue
        hosting = t.node(host)
        for svc in (s for s in t.services
                    if s.guest == guest.name and answers(s.proto, s.target_port)):
            for entry in t.nodes:
                checks.append(_service_check(lab, t, svc.name, entry, hosting))
        checks.append(_snat_check(lab, t, guest.name, hosting))
    return checks


def _service_check(lab: Lab, t: Topology, svc_name: str, entry: Node, hosting: Node) -> Check:
    svc = next(s for s in t.services if s.name == svc_name)
    where = "local" if entry.name == hosting.name else f"foreign, guest on {hosting.name}"
    name = f"{svc.name} {svc.proto}/{svc.port} via {entry.name} ({where})"
    r = probe(lab.names.workstation, svc.proto, str(entry.pub_ip), svc.port)
    if not r.get("ok"):
        return Check(name, False, f"no answer: {r.get('error')}")
    a = parse_answer(str(r["answer"]))
    if a.get("name") != svc.guest:
        return Check(name, False, f"answered by {a.get('name')!r}, not {svc.guest}")
    if r["from"] != f"{entry.pub_ip}:{svc.port}":
        return Check(name, False, f"reply came from {r['from']}, expected {entry.pub_ip}")
    peer_ip, _, _ = a.get("peer", "").partition(":")
    if svc.mode is Mode.FULLNAT:
        ok = peer_ip == str(entry.guest_ip)
        return Check(name, ok, f"guest saw {a.get('peer')} (entry node's guest-side address"
                     f" {entry.guest_ip} expected)")
    if peer_ip != str(t.lab.workstation):
        return Check(name, False, f"guest saw {a.get('peer')}, not the client's address")
    sport = str(r["local"]).rpartition(":")[2]
    mark = ct_mark(lab.names.node(hosting.name), svc.proto, str(t.lab.workstation), sport)
    tagged = mark is not None and mark & t.cluster.tag_mask == entry.tag
    return Check(name, tagged, f"reply from {r['from']}; guest saw client {a.get('peer')}; "
                 f"ct mark on {hosting.name} = {mark} (entry tag {entry.tag})")


def _snat_check(lab: Lab, t: Topology, guest: str, hosting: Node) -> Check:
    name = f"{guest} outbound SNAT via {hosting.name}"
    r = probe_from_guest(lab, t, guest, "tcp", str(t.lab.workstation), WORKSTATION_TCP_PORT)
    if not r.get("ok"):
        return Check(name, False, f"no answer: {r.get('error')}")
    seen = parse_answer(str(r["answer"])).get("peer", "").partition(":")[0]
    return Check(name, seen == str(hosting.pub_ip),
                 f"workstation saw {seen} (hosting node {hosting.name} is {hosting.pub_ip})")


def report(checks: list[Check]) -> dict[str, Any]:
    return {"checks": [asdict(c) for c in checks], "passed": all(c.passed for c in checks)}
