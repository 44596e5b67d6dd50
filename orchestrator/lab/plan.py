"""The lab's names and default cluster (pure): which namespaces and links a lab has.

Everything a lab makes is named ``cvg-<lab>-*`` so ``lab down`` can find it all again even
if its state file is gone. Links only ever live inside those namespaces.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from orchestrator.config.schema import Topology
from orchestrator.errors import ConfigError

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

    def clashes(self, t: Topology) -> list[str]:
        """Config names that would collide with a namespace or link the lab makes itself,
        as ``key: reason`` (else ``ip netns add`` fails later with "File exists")."""
        ours = {self.switch: "switch", self.workstation: "workstation",
                **{self.guest(g.name): f"guest {g.name}'s" for g in t.guests}}  # fmt: skip
        out = [f"nodes[{i}].name: node {n.name!r} would be namespace {self.node(n.name)}, "
               f"which is the lab's {ours[self.node(n.name)]} namespace"
               for i, n in enumerate(t.nodes) if self.node(n.name) in ours]  # fmt: skip
        links = {NODE_UPLINK_PORT: "the node's uplink port",
                 **{vif_name(t, g.name): f"guest {g.name}'s vif" for g in t.guests}}
        for i, n in enumerate(t.nodes):
            for k, pipe in enumerate(n.pipes):
                if pipe in links:
                    out.append(f"nodes[{i}].pipes[{k}]: {pipe} is the lab's name for "
                               f"{links[pipe]}")
        for key, name in (("cluster.guest_bridge", t.cluster.guest_bridge),
                          ("cluster.uplink", t.cluster.uplink),
                          ("sync.interface", t.sync.interface)):
            if name in links:
                out.append(f"{key}: {name} is the lab's name for {links[name]}")
        return out


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


def lab_agent_paths(state: Path, store: str | None = None) -> dict[str, str]:
    """Where a lab's agents keep their state: under the lab's directory, never in /var.
    ``store``: another store URL (``lab up --store etcd``: the lab's own etcd members)."""
    return {"run_dir": f"{state}/run", "store": store or f"sqlite://{state}/store.db",
            "audit_log": f"{state}/audit.log", "spool_dir": f"{state}/spool/{{node}}",
            "key_file": f"{state}/cluster.key", "state_dir": f"{state}/state",
            "audit_key_file": f"{state}/audit.key"}  # fmt: skip


def agent_section(state: Path, store: str | None = None) -> str:
    lines = [f'{k} = "{v}"' for k, v in lab_agent_paths(state, store).items()]
    # a short lease: a killed agent shows dead within seconds
    # a migration a killed agent was preparing settles within seconds of its restart
    return "\n".join(["[agent]", *lines, "reconcile_interval_s = 5.0", "peer_retry_s = 5.0",
                      "lease_ttl_s = 3.0", "recovery_settle_s = 5.0"]) + "\n"


_AGENT_HEADER = re.compile(r"^[ \t]*\[[ \t]*agent[ \t]*\][ \t]*(#.*)?$", re.M)


def with_lab_agent(text: str, state: Path, store: str | None = None) -> str:
    """A lab config with the lab's own state paths for every ``[agent]`` path it leaves out
    (a lab never falls back to the production defaults under /var and /etc)."""
    try:
        agent = tomllib.loads(text).get("agent")
    except tomllib.TOMLDecodeError:
        return text  # the loader reports it, with its line
    if agent is None:
        return text + "\n" + agent_section(state, store)
    if not isinstance(agent, dict):
        return text  # the loader says what is wrong with it
    missing = [f'{k} = "{v}"' for k, v in lab_agent_paths(state, store).items()
               if k not in agent]
    if not missing:
        return text
    header = _AGENT_HEADER.search(text)
    if header is None:
        raise ConfigError("lab config: write [agent] as a table (an [agent] header) so lab up "
                          f"can add the lab's own {', '.join(k.split()[0] for k in missing)}")
    return text[: header.end()] + "\n" + "\n".join(missing) + text[header.end() :]


def lab_section(lab: str, state: Path) -> str:
    """The ``[hypervisor]`` table of a lab on its own hypervisor (``lab up``'s default):
    the agents run the lab's adapter (orchestrator/lab/hypervisor.py)."""
    return f'[hypervisor]\nkind = "lab"\nlab = "{lab}"\ndir = "{state}"\n'


def toml_tables(text: str) -> set[str]:
    """The top-level keys of a config (none when it does not parse: the loader says why)."""
    try:
        return set(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        return set()


def outside_lab(t: Topology, state: Path) -> list[str]:
    """Agent paths a lab config points outside the lab's directory, as ``key: reason``."""
    a = t.agent
    paths = {"run_dir": a.run_dir, "audit_log": a.audit_log, "spool_dir": a.spool_dir,
             "key_file": a.key_file, "state_dir": a.state_dir,
             "audit_key_file": a.audit_key_file}  # fmt: skip
    if a.store.startswith("sqlite://"):
        paths["store"] = Path(a.store.removeprefix("sqlite://"))
    root = state.resolve()
    return [f"agent.{k}: {p} is outside the lab's directory {state}: a lab keeps all its "
            "state there" for k, p in paths.items() if not p.resolve().is_relative_to(root)]


def default_config(nodes: int = 3, lab: str = "lab", state: Path | None = None,
                   store: str | None = None) -> str:
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
        parts.append(agent_section(state, store))
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


class MoveOptions(TypedDict):
    handover: bool
    keep_arp: bool


def move_options(control: bool) -> MoveOptions:
    """What a lab move does, for ``lab migrate`` and ``lab demo`` alike. With handover the
    guest keeps its whole neighbour table, as a VM does, and the destination's gratuitous
    ARP moves its gateway entry. The control run turns the handover off (no entries, no
    race gate, no gratuitous ARP) and the guest learns the gateway afresh (its gateway entry
    dropped, the rest kept): what a VM meets once that entry must be re-confirmed and the
    source's MAC no longer answers across the pipes. (A VM with busy TCP flows may instead
    keep confirming the source's MAC and hairpin through it for as long as the source
    forwards: measured in the lab, every flow then survives without any handover.)"""
    return MoveOptions(handover=not control, keep_arp=not control)
