"""The lab's names and default cluster (pure): which namespaces and links a lab has.

Everything a lab makes is named ``cvg-<lab>-*`` so ``lab down`` can find it all again even
if its state file is gone. Links only ever live inside those namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.model.cluster import Topology

MAX_NODES = 16


@dataclass(frozen=True)
class LabNames:
    lab: str

    @property
    def prefix(self) -> str:
        return f"cvg-{self.lab}-"

    @property
    def switch(self) -> str:
        """Holds the uplink segment bridge and the cluster-pipe bridge."""
        return f"{self.prefix}sw"

    @property
    def workstation(self) -> str:
        return f"{self.prefix}ws"

    def node(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def guest(self, name: str) -> str:
        return f"{self.prefix}g-{name}"

    def all_for(self, t: Topology) -> list[str]:
        return [
            self.switch,
            self.workstation,
            *(self.node(n.name) for n in t.nodes),
            *(self.guest(g.name) for g in t.guests),
        ]


# interface names (kernel limit: 15 characters)
WAN_BRIDGE = "wan"
PIPE_BRIDGE = "pipes"
SYNC_BRIDGE = "sync"  # the agents' own segment: peer channel and replicator multicast
NODE_UPLINK_PORT = "eth0"
GUEST_IFACE = "eth0"


def switch_wan_port(index: int) -> str:
    return f"w{index}"


def switch_pipe_port(index: int) -> str:
    return f"p{index}"


def switch_sync_port(index: int) -> str:
    return f"s{index}"


def vif_name(t: Topology, guest: str) -> str:
    """Stable across migrations: the same name in whichever node holds it."""
    return f"vif{[g.name for g in t.guests].index(guest) + 1}"


def agent_section(state: Path) -> str:
    """The lab's agents keep everything under the lab's directory, never in /var."""
    return (
        f'[agent]\nrun_dir = "{state}/run"\nstore = "sqlite://{state}/store.db"\n'
        f'audit_log = "{state}/audit.log"\nspool_dir = "{state}/spool"\n'
        f'key_file = "{state}/cluster.key"\nreconcile_interval_s = 5.0\n'
        'peer_retry_s = 5.0\n'
    )


def default_config(nodes: int = 3, lab: str = "lab", state: Path | None = None) -> str:
    """The seed's cluster grown to ``nodes`` nodes, as TOML (what ``lab up`` writes).
    ``state``: the lab's directory, where its agents keep socket, store, log and key."""
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}")
    parts = [
        f'[cluster]\nname = "{lab}"\nguest_subnet = "10.5.5.0/24"\ngateway = "10.5.5.254"\n'
        'guest_bridge = "guestbr0"\nuplink = "xenbr0"\ntag_mask = 0xff\n',
        '[lab]\nworkstation = "192.168.122.1"\nuplink_prefix = 24\n',
    ]
    if state is not None:
        parts.append(agent_section(state))
    for i in range(1, nodes + 1):
        guest_ip = 250 + i if i <= 3 else 220 + i
        parts.append(
            f'[[nodes]]\nname = "n{i}"\ntag = {i}\nmac_prefix = "0a:00:{i:02x}"\n'
            f'pub_ip = "192.168.122.{10 + i}"\nguest_ip = "10.5.5.{guest_ip}"\n'
            f'pipes = ["pipe0"]\nsync_ip = "172.31.0.{10 + i}"\n'
        )
    services = [
        ("http", 80, "tcp", None, "stateless"),
        ("ntp", 123, "udp", None, "stateless"),
        ("web-fullnat", 8080, "tcp", 80, "fullnat"),
    ]
    for name, port, proto, gport, mode in services:
        extra = f"guest_port = {gport}\n" if gport else ""
        parts.append(
            f'[[services]]\nname = "{name}"\nport = {port}\nproto = "{proto}"\n'
            f'guest = "guest1"\n{extra}mode = "{mode}"\n'
        )
    parts.append(
        '[[guests]]\nname = "guest1"\nmacs = ["52:54:00:00:02:01"]\n'
        'addresses = ["10.5.5.201"]\nhome = "n1"\n'
    )
    return "\n".join(parts)
