"""Namespace, link and process primitives for the lab (iproute2 underneath).

Every call names its namespace; nothing here ever touches the root namespace's links,
rules or sysctls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import LabError


def sh(argv: Sequence[str], check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {msg[-1] if msg else 'failed'}")
    return proc.stdout


def ip(netns: str, *args: str, check: bool = True) -> str:
    return sh(["ip", "-n", netns, *args], check=check)


def neighbours(netns: str, dev: str) -> list[tuple[str, str]]:
    """``(address, lladdr)`` of every neighbour entry on ``dev`` that has a link address."""
    out = json.loads(ip(netns, "-j", "neigh", "show", "dev", dev) or "[]")
    return [(n["dst"], n["lladdr"]) for n in out if n.get("lladdr") and n.get("dst")]


def restore_neighbours(netns: str, dev: str, entries: list[tuple[str, str]]) -> None:
    """Put entries back (stale: used at once, confirmed in the background), as a VM that
    never lost carrier still has them; a veth that moved had them flushed."""
    for dst, lladdr in entries:
        ip(netns, "neigh", "replace", dst, "lladdr", lladdr, "dev", dev, "nud", "stale")


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def in_ns(netns: str, *argv: str, check: bool = True, timeout: float = 30) -> str:
    return sh(exec_argv(netns, argv), check=check, timeout=timeout)


def list_netns() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_netns(name: str) -> None:
    sh(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")
    # no router solicitations or DAD chatter in the captures
    in_ns(name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", check=False)
    in_ns(name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1", check=False)


def kill_netns_processes(name: str, grace: float = 1.0) -> None:
    pids = [int(p) for p in sh(["ip", "netns", "pids", name], check=False).split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.02)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def del_netns(name: str) -> None:
    kill_netns_processes(name)
    sh(["ip", "netns", "del", name], check=False)


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str, mac_b: str | None = None) -> None:
    """A veth pair with one end in each namespace (created in ns_a, peer moved to ns_b)."""
    extra = ["address", mac_b] if mac_b else []
    ip(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, *extra,
       "netns", ns_b)


def bridge(netns: str, name: str, mac: str | None = None) -> None:
    ip(netns, "link", "add", name, "type", "bridge", "mcast_snooping", "0", "stp_state", "0",
       "forward_delay", "0")
    if mac:
        ip(netns, "link", "set", name, "address", mac)
    ip(netns, "link", "set", name, "up")


def enslave(netns: str, port: str, master: str) -> None:
    ip(netns, "link", "set", port, "master", master, "up")


def spawn(netns: str, argv: Sequence[str], log: Path,
          env: dict[str, str] | None = None) -> int:
    """Start a long-lived process inside ``netns``; it dies with the namespace."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            exec_argv(netns, argv), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    _children.append(proc)  # reaped below, so a killed one does not linger as a zombie
    _children[:] = [p for p in _children if p.poll() is None]
    return proc.pid


_children: list[subprocess.Popen[bytes]] = []


def wait_for_line(log: Path, needle: str, timeout: float = 10, after: int = 0) -> None:
    """Until ``needle`` appears in ``log`` past byte offset ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_bytes()[after:].decode(errors="replace"):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-400:] if log.exists() else "(no log)"
    raise LabError(f"timed out waiting for {needle!r} in {log}: {tail}")
