"""Build and tear down the seed topology in network namespaces.

One switch namespace holds two bridges: ``wan`` (the uplink segment: every node's uplink
bridge and the workstation) and ``pipes`` (every node's cluster pipe, so all guest bridges
meet at L2 without a loop). Each node gets the production ruleset through
:func:`orchestrator.netfilter.apply.apply`, the same code ``convergent apply`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.agent.client import AgentUnavailable, acall
from orchestrator.agent.keys import write_new_key
from orchestrator.config.loader import load, parse, read_text
from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConfigError, LabError
from orchestrator.lab import netns as ns
from orchestrator.lab.drivers import BUILTIN, LabDriver, driver_class
from orchestrator.lab.etcd import EtcdCluster
from orchestrator.lab.hookrun import DEFAULT_TIMEOUT_S, hook_conf, run_hook
from orchestrator.lab.plan import (
    GUEST_IFACE,
    NODE_UPLINK_PORT,
    PIPE_BRIDGE,
    SYNC_BRIDGE,
    WAN_BRIDGE,
    LabNames,
    default_config,
    lab_section,
    outside_lab,
    switch_pipe_port,
    switch_sync_port,
    switch_wan_port,
    toml_tables,
    vif_name,
    with_lab_agent,
)
from orchestrator.netfilter.apply import apply
from orchestrator.store import outwaits_refusal

STATE_ROOT = Path(os.environ.get("CONVERGENT_LAB_DIR", "/run/convergent/lab"))
REQUIRED_TOOLS = {"ip": "iproute2", "nft": "nftables", "conntrack": "conntrack",
                  "sysctl": "procps"}
WORKSTATION_TCP_PORT = 7000  # the workstation's own responder: guest-initiated checks


@dataclass
class Lab:
    name: str = "lab"
    root: Path | None = None  # where labs keep their state (default $CONVERGENT_LAB_DIR)

    @property
    def names(self) -> LabNames:
        return LabNames(self.name)

    @property
    def dir(self) -> Path:
        return (self.root or STATE_ROOT) / self.name

    @property
    def config_path(self) -> Path:
        return self.dir / "cluster.toml"

    def topology(self) -> Topology:
        if not self.config_path.exists():
            raise LabError(f"lab {self.name!r} is not up (no {self.config_path})")
        return load(self.config_path)

    # up / down ------------------------------------------------------------
    def up(self, nodes: int = 3, config: Path | None = None, agents: bool = True,
           store: str = "sqlite", hypervisor: str = BUILTIN) -> Topology:
        """Build the lab; ``agents``: start one agent per node (as production runs) and let
        each guest's home agent claim it. Without them, ``lab migrate`` coordinates
        in-process. ``store``: ``sqlite`` (a file in the lab's directory) or ``etcd`` (one
        etcd member per node, inside the node's namespace, peers on the sync segment)."""
        preflight()
        if store not in ("sqlite", "etcd"):
            raise LabError(f"--store {store!r}: sqlite or etcd")
        url = None
        if store == "etcd":
            names = [f"n{i}" for i in range(1, nodes + 1)] if config is None else \
                [n.name for n in parse(read_text(config), str(config)).nodes]
            url = EtcdCluster.create(names, self.dir / "etcd").url("/convergent")
        text = (read_text(config) if config
                else default_config(nodes, self.name, self.dir, url))
        source = str(config) if config else "<lab default>"
        text = with_lab_agent(text, self.dir, url)  # a lab never touches /var's state
        text = self._with_hypervisor(text, hypervisor)
        topology = parse(text, source)
        problems = self.names.clashes(topology) + outside_lab(topology, self.dir)
        if problems:
            raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
        if self.is_up(topology) and self.config_path.read_text() == text:
            for node in topology.nodes:  # idempotent: re-apply is a no-op when unchanged
                apply(topology, node.name, self.names.node(node.name))
            return topology
        self.down()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(text)
        try:
            self._build(topology)
            if store == "etcd":
                cluster = self.etcd(topology)
                cluster.start()
                cluster.wait_ready(timeout=30)
            if agents:
                self.start_agents(topology)
        except BaseException:
            self.down()
            raise
        return topology

    def _with_hypervisor(self, text: str, kind: str) -> str:
        """``--hypervisor KIND``: the cluster file gets the driver's ``[hypervisor]``."""
        cls = driver_class(kind)
        if cls is None and kind == BUILTIN:  # the lab's own adapter, unless the file says
            return text if toml_tables(text) >= {"hypervisor"} else text + "\n" + \
                lab_section(self.name, self.dir)
        if cls is None:
            return text
        if re.search(r"^\s*\[hypervisor\]", text, re.MULTILINE):
            raise LabError(f"--hypervisor {kind}: the config already has a [hypervisor] "
                           "section; leave one of them out")
        return text + "\n" + self._make_driver(cls).hypervisor_toml()

    def driver(self, t: Topology) -> LabDriver | None:
        """The lab hypervisor of this lab's cluster file (None: the built-in veth moves)."""
        cls = driver_class(t.hypervisor.kind)
        return None if cls is None else self._make_driver(cls)

    def _make_driver(self, cls: type[LabDriver]) -> LabDriver:
        return cls(self.dir, _NodeNetns(self.names), self.names.guest("{name}"))

    def is_up(self, topology: Topology) -> bool:
        existing = set(ns.list_netns())
        return self.config_path.exists() and all(
            n in existing for n in self._namespaces(topology)
        )

    def _namespaces(self, t: Topology) -> list[str]:
        """The lab's namespaces: no guest namespaces when its hypervisor runs real VMs."""
        drv = self.driver(t)
        if getattr(drv, "guests_in_namespaces", True):
            return self.names.all_for(t)
        guests = {self.names.guest(g.name) for g in t.guests}
        return [n for n in self.names.all_for(t) if n not in guests]

    def down(self) -> list[str]:
        """Remove every namespace (and so every link and process) of this lab."""
        removed = [n for n in ns.list_netns() if n.startswith(self.names.prefix)]
        for name in removed:
            ns.del_netns(name)
        shutil.rmtree(self.dir, ignore_errors=True)
        return removed

    def etcd(self, t: Topology | None = None) -> EtcdCluster:
        """The lab's etcd members (``up --store etcd``): one per node, in its namespace,
        peers over the sync segment (cutting a node's links partitions its member)."""
        t = t or self.topology()
        places = {n.name: (self.names.node(n.name), str(n.sync_ip) if n.sync_ip else None)
                  for n in t.nodes}
        return EtcdCluster.create([n.name for n in t.nodes], self.dir / "etcd", places)

    # building -------------------------------------------------------------
    def _build(self, t: Topology) -> None:
        n = self.names
        for name in self._namespaces(t):
            ns.add_netns(name)
        ns.bridge(n.switch, WAN_BRIDGE)
        ns.bridge(n.switch, PIPE_BRIDGE)
        ns.bridge(n.switch, SYNC_BRIDGE)
        self._build_workstation(t)
        for i, node in enumerate(t.nodes, start=1):
            self._build_node(t, i, node.name)
        drv = self.driver(t)
        if drv is not None:
            drv.build(t)
        in_namespaces = getattr(drv, "guests_in_namespaces", True)
        for guest in t.guests:
            if guest.home and drv is not None:
                drv.create(guest, guest.home)
            elif guest.home:
                self.plug_guest(t, guest, guest.home)
            if in_namespaces:
                self._build_guest(t, guest)
        for node in t.nodes:
            apply(t, node.name, n.node(node.name))
        self._start_responders(t, guests=in_namespaces)

    def _build_workstation(self, t: Topology) -> None:
        n = self.names
        ns.veth(n.switch, switch_wan_port(0), n.workstation, "eth0")
        ns.enslave(n.switch, switch_wan_port(0), WAN_BRIDGE)
        ns.ip(n.workstation, "addr", "add", f"{t.lab.workstation}/{t.lab.uplink_prefix}",
              "dev", "eth0")
        ns.ip(n.workstation, "link", "set", "eth0", "up")

    def _build_node(self, t: Topology, index: int, name: str) -> None:
        n, c, node = self.names, t.cluster, t.node(name)
        node_ns = n.node(name)
        ns.bridge(node_ns, c.uplink)
        ns.veth(n.switch, switch_wan_port(index), node_ns, NODE_UPLINK_PORT)
        ns.enslave(n.switch, switch_wan_port(index), WAN_BRIDGE)
        ns.enslave(node_ns, NODE_UPLINK_PORT, c.uplink)
        ns.ip(node_ns, "addr", "add", f"{node.pub_ip}/{t.lab.uplink_prefix}", "dev", c.uplink)
        ns.bridge(node_ns, c.guest_bridge, mac=node.bridge_mac)
        plen = c.guest_subnet.prefixlen
        # its own address first: a foreign node's ARP for a guest needs it (FACTS.md)
        ns.ip(node_ns, "addr", "add", f"{node.guest_ip}/{plen}", "dev", c.guest_bridge)
        ns.ip(node_ns, "addr", "add", f"{c.gateway}/{plen}", "dev", c.guest_bridge)
        pipe = node.pipes[0]
        ns.veth(n.switch, switch_pipe_port(index), node_ns, pipe)
        ns.enslave(n.switch, switch_pipe_port(index), PIPE_BRIDGE)
        ns.enslave(node_ns, pipe, c.guest_bridge)
        ns.ip(node_ns, "route", "add", "default", "via", str(t.lab.workstation))
        if node.sync_ip is not None:
            ns.veth(n.switch, switch_sync_port(index), node_ns, t.sync.interface)
            ns.enslave(n.switch, switch_sync_port(index), SYNC_BRIDGE)
            ns.ip(node_ns, "addr", "add", f"{node.sync_ip}/24", "dev", t.sync.interface)
            ns.ip(node_ns, "link", "set", t.sync.interface, "up")

    def _build_guest(self, t: Topology, guest: Guest) -> None:
        g_ns = self.names.guest(guest.name)
        plen = t.cluster.guest_subnet.prefixlen
        for addr in guest.addresses:
            ns.ip(g_ns, "addr", "add", f"{addr}/{plen}", "dev", GUEST_IFACE)
        ns.ip(g_ns, "link", "set", GUEST_IFACE, "up")
        ns.ip(g_ns, "route", "add", "default", "via", str(t.cluster.gateway))

    def plug_guest(self, t: Topology, guest: Guest, node: str) -> None:
        """Create the guest's NIC: the guest end keeps its MAC, the vif joins the bridge."""
        vif = vif_name(t, guest.name)
        node_ns = self.names.node(node)
        ns.veth(node_ns, vif, self.names.guest(guest.name), GUEST_IFACE, mac_b=guest.macs[0])
        ns.enslave(node_ns, vif, t.cluster.guest_bridge)

    def guest_node(self, t: Topology, guest: str) -> str | None:
        """Which node namespace currently holds the guest's vif (the lab's ground truth;
        with a lab hypervisor: where it runs, as that hypervisor says)."""
        drv = self.driver(t)
        if drv is not None:
            return drv.guest_node(t, guest)
        vif = vif_name(t, guest)
        for node in t.nodes:
            if ns.ip(self.names.node(node.name), "link", "show", vif, check=False):
                return node.name
        return None

    def _start_responders(self, t: Topology, guests: bool = True) -> None:
        """The responders of the guests' namespaces (``guests``; a VM runs its own) and the
        workstation's."""
        for guest in t.guests if guests else ():
            tcp = sorted({s.target_port for s in t.services
                          if s.guest == guest.name and s.proto == "tcp"})
            udp = sorted({s.target_port for s in t.services
                          if s.guest == guest.name and s.proto == "udp"})
            self._responder(self.names.guest(guest.name), guest.name, tcp, udp)
        self._responder(self.names.workstation, "workstation", [WORKSTATION_TCP_PORT], [])

    def _responder(self, netns: str, name: str, tcp: list[int], udp: list[int]) -> None:
        argv = [sys.executable, "-m", "orchestrator.lab.responder", "--name", name]
        argv += [a for p in tcp for a in ("--tcp", str(p))]
        argv += [a for p in udp for a in ("--udp", str(p))]
        log = self.dir / "logs" / f"responder-{name}.log"
        ns.spawn(netns, argv, log)
        ns.wait_for_line(log, "ready")

    # agents ---------------------------------------------------------------
    def start_agents(self, t: Topology) -> None:
        if not t.agent.key_file.exists():
            write_new_key(t.agent.key_file)
        for node in t.nodes:
            self.start_agent(node.name, wait=False)
        for node in t.nodes:
            ns.wait_for_line(self._agent_log(node.name), f"agent {node.name} ready", 30)
        asyncio.run(self._claim_homes(t))

    def start_agent(self, node: str, env: dict[str, str] | None = None,
                    wait: bool = True) -> int:
        """Start (or restart) ``node``'s agent inside its namespace; ``env`` adds variables
        (failpoints for the crash tests)."""
        log = self._agent_log(node)
        mark = log.stat().st_size if log.exists() else 0
        drv = self.driver(self.topology())
        if drv is not None:  # the hypervisor's tools, as the node's own environment
            env = {**drv.agent_env(node), **(env or {})}
        argv = [sys.executable, "-m", "orchestrator", "agent", "--config",
                str(self.config_path), "--node", node]
        pid = ns.spawn(self.names.node(node), argv, log, env=env)
        (self.dir / f"agent-{node}.pid").write_text(str(pid))
        if wait:
            ns.wait_for_line(log, f"agent {node} ready", 30, after=mark)
        return pid

    def kill_agent(self, node: str, sig: int = signal.SIGKILL) -> None:
        pid = self.agent_pid(node)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 2  # a killed child lingers as a zombie: agent_pid
        while (self.agent_pid(node) is not None or _threads_left(pid)) \
                and time.monotonic() < deadline:
            time.sleep(0.01)

    def agent_pid(self, node: str) -> int | None:
        pidfile = self.dir / f"agent-{node}.pid"
        if not pidfile.exists():
            return None
        pid = int(pidfile.read_text())
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().split()[2] != "Z"
        except OSError:
            return None
        return pid if alive else None

    def has_agents(self, t: Topology) -> bool:
        return all(self.agent_pid(n.name) is not None for n in t.nodes)

    def has_any_agent(self, t: Topology) -> bool:
        return any(self.agent_pid(n.name) is not None for n in t.nodes)

    def _agent_log(self, node: str) -> Path:
        return self.dir / "logs" / f"agent-{node}.log"

    async def _claim_homes(self, t: Topology) -> None:
        if t.hypervisor.kind == BUILTIN:  # as a hypervisor does: through the node's hook
            for g in t.guests:
                node = self.guest_node(t, g.name)
                if node is not None:
                    wait = outwaits_refusal(t.agent.store, DEFAULT_TIMEOUT_S)
                    v = await run_hook(hook_conf(self.dir, node, t.agent, wait),
                                       ["started", g.name], wait)
                    if v.get("spooled"):
                        raise LabError(f"the agent of {node} did not take {g.name}'s "
                                       f"start: {v.get('reason')}")
            return
        for g in t.guests:
            node = self.guest_node(t, g.name)
            if node is not None:
                try:
                    await acall(t.agent.socket(node), "guest.started", guest=g.name)
                except AgentUnavailable as exc:
                    raise LabError(f"agent of {node} did not come up: {exc}") from None

    def status(self) -> dict[str, object]:
        t = self.topology()
        return {
            "lab": self.name,
            "namespaces": [n for n in ns.list_netns() if n.startswith(self.names.prefix)],
            "guests": {g.name: self.guest_node(t, g.name) for g in t.guests},
        }


class _NodeNetns(dict[str, str]):
    """node -> its namespace, for any node name."""

    def __init__(self, names: LabNames) -> None:
        super().__init__()
        self.names = names

    def __missing__(self, node: str) -> str:
        return self.names.node(node)


def _threads_left(pid: int) -> bool:
    """A killed process's leader turns zombie before its other threads are gone, and its
    sockets close only with the last of them."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def preflight() -> None:
    """Say exactly what is missing before touching anything."""
    if os.geteuid() != 0:
        raise LabError("lab up needs root (it creates network namespaces)")
    missing = [f"{tool} (package {pkg})" for tool, pkg in REQUIRED_TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        raise LabError("missing tools: " + ", ".join(missing))


def dump_state(lab: Lab) -> str:
    return json.dumps(lab.status(), indent=2)
