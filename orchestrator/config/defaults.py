"""Where the cluster file is and which node this host is, when the command line doesn't say.

The file: ``--config``, else ``$CONVERGENT_CONFIG``, else ``/etc/convergent/cluster.toml``.
The node: ``--node``, else the one node whose ``pub_ip``, ``guest_ip`` or ``sync_ip`` is
an address of this host (in this network namespace), else the node named like the host.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from pathlib import Path

from orchestrator.config.schema import Node, Topology
from orchestrator.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/convergent/cluster.toml")
CONFIG_ENV = "CONVERGENT_CONFIG"


def config_path(explicit: str | Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The cluster file to read; a missing default says how to name another one."""
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    if not DEFAULT_CONFIG.exists():
        raise ConfigError(f"no cluster config: {DEFAULT_CONFIG} does not exist "
                          f"(pass --config FILE or set {CONFIG_ENV})")
    return DEFAULT_CONFIG


def node_addresses(node: Node) -> list[IPv4Address]:
    return [a for a in (node.pub_ip, node.guest_ip, node.sync_ip) if a is not None]


def pick_node(topology: Topology, is_local: Callable[[IPv4Address], bool],
              hostname: str) -> str:
    """Pure: the node whose addresses are local, else the one named ``hostname`` (its
    first label too: ``n1.example.net`` is ``n1``)."""
    local = [n.name for n in topology.nodes if any(map(is_local, node_addresses(n)))]
    if len(local) == 1:
        return local[0]
    names = {n.name for n in topology.nodes}
    for candidate in (hostname, hostname.split(".")[0]):
        if candidate in names and (not local or candidate in local):
            return candidate
    known = ", ".join(sorted(names))
    if local:
        raise ConfigError(f"cannot tell which node this host is: addresses of {', '.join(local)} "
                          f"are all local and the hostname {hostname!r} is none of them; "
                          f"pass --node")
    raise ConfigError(f"cannot tell which node this host is: no address of a node ({known}) "
                      f"is on this host and the hostname {hostname!r} is not a node; "
                      f"pass --node")


def is_local_address(ip: IPv4Address) -> bool:
    """True when this network namespace holds ``ip``: the kernel binds only local
    addresses (unless ``ip_nonlocal_bind`` is set: then every node looks local and
    ``pick_node`` falls back to the hostname)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def this_node(topology: Topology) -> str:
    return pick_node(topology, is_local_address, socket.gethostname())
