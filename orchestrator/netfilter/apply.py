"""Apply a node's ruleset and sysctls, idempotently and atomically.

One nft transaction creates-or-replaces every table we own and puts back the elements the
agent had in our sets, so a rule change never drops a guest from the race gate. If the
stamped digest already matches, nothing is sent at all.

Given an :class:`~orchestrator.audit.log.AuditLog`, every attempt writes exactly one
``ruleset.apply`` record naming the node, with ``duration_ms``, outcome ``ok`` or
``failed``, and a ``detail`` that starts with what happened: ``changed digest=D
ruleset=replaced|unchanged sysctls=K=V,...|none``, ``unchanged digest=D``, or
``failed digest=D: <error>``. (The schema's outcomes are ok/failed/refused, so
changed/unchanged lives in the detail's first word.) A log that cannot be written is
reported through ``warn`` and never fails the apply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from orchestrator.audit.errors import AuditError
from orchestrator.config.schema import Topology
from orchestrator.errors import RulesetError
from orchestrator.netfilter import nft
from orchestrator.netfilter.render import (
    IP_TABLE,
    SET_LOCAL_GUESTS,
    SET_RACE_GATE,
    render,
    table_names,
)

if TYPE_CHECKING:
    from orchestrator.audit.log import AuditLog

Warn = Callable[[str], None]

NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    # br_netfilter: bridged frames to guests traverse the ip hooks (the ct mark rule)
    "net.bridge.bridge-nf-call-iptables": "1",
    # a node that sees one direction of a flow marks the other INVALID otherwise (FACTS.md)
    "net.netfilter.nf_conntrack_tcp_be_liberal": "1",
    # the default (2) gives an entry event reporting only if a listener existed when it was
    # created: a flow that began while the agent was down would never report a change or
    # its end to precopy or the replicator. 1: every entry reports.
    "net.netfilter.nf_conntrack_events": "1",
}

DYNAMIC_SETS = (SET_LOCAL_GUESTS, SET_RACE_GATE)


@dataclass
class ApplyResult:
    node: str
    digest: str
    ruleset_changed: bool
    sysctls_changed: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.ruleset_changed or bool(self.sysctls_changed)

    def audit_detail(self) -> str:
        if not self.changed:
            return f"unchanged digest={self.digest}"
        rules = "replaced" if self.ruleset_changed else "unchanged"
        sysctls = ",".join(f"{k}={v}" for k, v in self.sysctls_changed.items()) or "none"
        return f"changed digest={self.digest} ruleset={rules} sysctls={sysctls}"

    def summary(self) -> str:
        rules = "replaced" if self.ruleset_changed else "unchanged"
        sysctl = ", ".join(f"{k}={v}" for k, v in self.sysctls_changed.items()) or "unchanged"
        return f"{self.node}: ruleset {rules} (digest {self.digest}); sysctls {sysctl}"


def _warn_stderr(message: str) -> None:
    print(f"convergent: warning: {message}", file=sys.stderr)


def apply(
    topology: Topology,
    node: str,
    netns: str | None = None,
    audit: AuditLog | None = None,
    *,
    record_unchanged: bool = True,
    warn: Warn = _warn_stderr,
) -> ApplyResult:
    """Apply ``node``'s ruleset and sysctls (in ``netns``). With ``audit``: one
    ``ruleset.apply`` record per call (``record_unchanged=False`` skips the no-op ones,
    for a periodic reconcile loop)."""
    start = time.perf_counter()
    digest: list[str] = []  # known once rendered, also for the failure record
    try:
        result = _apply(topology, node, netns, digest)
    except Exception as exc:
        if audit is not None:
            where = f"digest={digest[0]}: " if digest else ""
            _record(audit, node, start, "failed", f"failed {where}{type(exc).__name__}: {exc}",
                    warn)
        raise
    if audit is not None and (result.changed or record_unchanged):
        _record(audit, node, start, "ok", result.audit_detail(), warn)
    return result


def _record(audit: AuditLog, node: str, start: float, outcome: str, detail: str,
            warn: Warn) -> None:
    ms = (time.perf_counter() - start) * 1000
    try:
        audit.bind(node=node).record("ruleset.apply", outcome=outcome, duration_ms=ms,
                                     detail=detail)
    except (AuditError, OSError) as exc:
        warn(f"{node}: ruleset.apply not recorded in the audit log: {exc}")


def local_addresses(netns: str | None = None) -> set[IPv4Address]:
    """The IPv4 addresses configured in ``netns`` (``ip -j addr``)."""
    proc = subprocess.run([*nft.netns_prefix(netns), "ip", "-j", "-4", "addr", "show"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        raise RulesetError(f"cannot list the addresses{where}: {proc.stderr.strip()}")
    return {IPv4Address(a["local"]) for link in json.loads(proc.stdout or "[]")
            for a in link.get("addr_info", []) if a.get("family") == "inet"}


def identity_problem(topology: Topology, node: str, local: set[IPv4Address]) -> str | None:
    """Why this host does not look like ``node`` (its own public and guest-side addresses
    are not local), naming the node it does look like; None when it does. Pure."""
    me = topology.node(node)
    missing = [str(a) for a in (me.pub_ip, me.guest_ip) if a not in local]
    if not missing:
        return None
    looks = [n.name for n in topology.nodes if n.name != node and
             (n.pub_ip in local or n.guest_ip in local)]  # fmt: skip
    hint = f"; it holds the addresses of {', '.join(looks)}" if looks else ""
    return (f"{node}'s own addresses {', '.join(missing)} are not configured here{hint}: "
            "refusing to replace this host's ruleset with another node's (--force to apply "
            "anyway)")


def _apply(topology: Topology, node: str, netns: str | None, digest: list[str]) -> ApplyResult:
    ruleset = render(topology, node)
    digest.append(ruleset.digest)
    changed_sysctls = ensure_sysctls(NODE_SYSCTLS, netns)
    current = {name: nft.table_digest(fam, name, netns) for fam, name in table_names()}
    if all(d == ruleset.digest for d in current.values()):
        return ApplyResult(node, ruleset.digest, False, changed_sysctls)
    kept = _kept_elements(netns) if current[IP_TABLE] is not None else {}
    nft.run(replace_script(ruleset.script(), kept), netns)
    return ApplyResult(node, ruleset.digest, True, changed_sysctls)


def _kept_elements(netns: str | None) -> dict[str, list[str]]:
    """The agent's set elements in the running ip table (which the caller saw exists)."""
    return nft.sets_elements("ip", IP_TABLE, list(DYNAMIC_SETS), netns)


def replace_script(script: str, kept: dict[str, list[str]]) -> str:
    """Create-then-delete makes the delete safe when a table is absent; all in one batch."""
    head = []
    for fam, name in table_names():
        head += [f"table {fam} {name}", f"delete table {fam} {name}"]
    tail = [
        f"add element ip {IP_TABLE} {s} {{ {', '.join(elems)} }}"
        for s, elems in kept.items()
        if elems
    ]
    return "\n".join([*head, script, *tail]) + "\n"


def ensure_sysctls(wanted: dict[str, str], netns: str | None = None) -> dict[str, str]:
    """Set what differs; return what changed. br_netfilter must be present for the bridge keys."""
    changed = {}
    for key, value in wanted.items():
        if read_sysctl(key, netns) != value:
            _write_sysctl(key, value, netns)
            changed[key] = value
    return changed


def _proc_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str, netns: str | None = None) -> str | None:
    if netns is None:
        try:
            with open(_proc_path(key)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None
    proc = subprocess.run(
        [*nft.netns_prefix(netns), "cat", _proc_path(key)], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _write_sysctl(key: str, value: str, netns: str | None) -> None:
    if key.startswith("net.bridge.") and not os.path.exists("/proc/sys/net/bridge"):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    proc = subprocess.run(
        [*nft.netns_prefix(netns), "sysctl", "-q", "-w", f"{key}={value}"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RulesetError(f"cannot set {key}={value}: {proc.stderr.strip() or 'sysctl failed'}")
