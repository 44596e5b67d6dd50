"""The lab's kernel side of a Xen guest's NIC, and of pausing it.

A guest is a network namespace; its NIC ``eth<devid>`` is one end of a veth whose other
end plays netback's ``vif<domid>.<devid>`` in the node's namespace (netback's dummy MAC
``fe:ff:ff:ff:ff:ff``). One veth must play two vifs during ``xl migrate``: when the
destination attaches its devices (after the memory, with the guest suspended on the
source) the node end moves there and takes the new name; when a failed migration's copy is
destroyed it goes back, under its old name, onto the bridge the source never took it off.

A paused domain neither sends nor receives: the guest's namespace gets a netdev table
dropping everything on its NIC until unpause.
"""

from __future__ import annotations

import json
import os
import subprocess

from orchestrator.errors import ConvergentError

NETBACK_MAC = "fe:ff:ff:ff:ff:ff"
PAUSE_TABLE = "convergent_paused"


class NetbackError(ConvergentError):
    pass


def _ip(netns: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True,
                          timeout=30)
    if check and proc.returncode != 0:
        raise NetbackError(f"ip -n {netns} {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def exists(netns: str, dev: str) -> bool:
    return bool(_ip(netns, "link", "show", dev, check=False))


def guest_nic(devid: int) -> str:
    return f"eth{devid}"


def create(node_ns: str, vif: str, guest_ns: str, devid: int, mac: str) -> None:
    """netback's new device for a frontend: down, netback's MAC; the guest's end has the
    guest's MAC."""
    if exists(guest_ns, guest_nic(devid)):
        raise NetbackError(f"{guest_ns} already has {guest_nic(devid)}: the guest runs "
                           "somewhere else")
    _ip(node_ns, "link", "add", vif, "address", NETBACK_MAC, "type", "veth", "peer", "name",
        guest_nic(devid), "address", mac, "netns", guest_ns)


def move(src_ns: str, old: str, dst_ns: str, new: str) -> None:
    """The node end from ``src_ns`` (named ``old``) to ``dst_ns`` (named ``new``), down,
    through a temporary name so it never clashes with a device of the other node."""
    tmp = f"vmv{os.getpid()}"[:15]
    _ip(src_ns, "link", "set", old, "down")
    _ip(src_ns, "link", "set", old, "name", tmp)
    _ip(src_ns, "link", "set", tmp, "netns", dst_ns)
    _ip(dst_ns, "link", "set", tmp, "name", new)


def neighbours(guest_ns: str, devid: int) -> list[tuple[str, str]]:
    """The guest's ARP cache on its NIC: (address, MAC)."""
    out = _ip(guest_ns, "-j", "neigh", "show", "dev", guest_nic(devid), check=False)
    return [(n["dst"], n["lladdr"]) for n in json.loads(out or "[]")
            if "lladdr" in n and ":" not in n["dst"]]


def restore_neighbours(guest_ns: str, devid: int, entries: list[tuple[str, str]]) -> None:
    """A VM keeps its ARP cache across a migration; a veth whose peer changed namespace
    loses carrier and with it the cache: put it back (stale, so it is re-checked)."""
    for dst, mac in entries:
        _ip(guest_ns, "neigh", "replace", dst, "lladdr", mac, "dev", guest_nic(devid), "nud",
            "stale", check=False)


def destroy(node_ns: str, vif: str) -> None:
    if exists(node_ns, vif):
        _ip(node_ns, "link", "del", vif)


def reattach(node_ns: str, vif: str, bridge: str) -> None:
    """Back on the bridge it was on (a source resuming after a failed migration)."""
    _ip(node_ns, "link", "set", vif, "master", bridge)
    _ip(node_ns, "link", "set", vif, "up")


def pause(guest_ns: str, devids: list[int]) -> None:
    rules = "".join(
        f"add chain netdev {PAUSE_TABLE} in{d} {{ type filter hook ingress device "
        f"{guest_nic(d)} priority -500; policy drop; }}\n"
        f"add chain netdev {PAUSE_TABLE} out{d} {{ type filter hook egress device "
        f"{guest_nic(d)} priority -500; policy drop; }}\n" for d in devids)
    _nft(guest_ns, f"add table netdev {PAUSE_TABLE}\n{rules}")


def unpause(guest_ns: str) -> None:
    _nft(guest_ns, f"add table netdev {PAUSE_TABLE}\ndelete table netdev {PAUSE_TABLE}\n")


def paused(guest_ns: str) -> bool:
    proc = subprocess.run(["ip", "netns", "exec", guest_ns, "nft", "-j", "list", "tables"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return False
    tables = json.loads(proc.stdout or "{}").get("nftables", [])
    return any(t.get("table", {}).get("name") == PAUSE_TABLE for t in tables)


def _nft(netns: str, script: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetbackError(f"nft in {netns}: {proc.stderr.strip()}")
