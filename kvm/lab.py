"""The lab on libvirt: one real libvirtd per node namespace, the guest a real TCG VM on its
node's guest bridge, moved by a real ``virsh migrate --live``.

What this adds to the namespace lab (``orchestrator.lab``): a migration segment (one more
bridge in the switch namespace, ``mig0`` in every node, libvirt's TCP and the migration
stream), a libvirtd per node (:mod:`kvm.libvirtd`), the guest image (:mod:`kvm.image`) and
the guest's domain (:mod:`kvm.domxml`). The VM keeps its own ARP cache, carrier and
sockets across a move, and QEMU announces it on the destination, as in production.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import ConvergentError, LabError
from orchestrator.lab import netns as ns
from orchestrator.lab.flows import Proc, client_spec, demo_config
from orchestrator.lab.lab import WORKSTATION_TCP_PORT, Lab
from orchestrator.netfilter.apply import apply

from .domxml import LabDomain, lab_domain_xml
from .image import GuestImage, ensure_image
from .install import HookConf, install
from .libvirtd import Daemon
from .libvirtd import preflight as libvirt_preflight

MIG_BRIDGE = "mig"
MIG_IFACE = "mig0"
MIG_NET = "172.30.0"
READY_MARK = "CONVERGENT-GUEST-READY"
BOOT_TIMEOUT_S = 120.0  # TCG on a loaded 2-core machine: 10-25 s is normal
DEMO_PORTS = {("tcp", 22), ("tcp", 8765), ("tcp", 8000), ("udp", 9123)}  # the guest's own


def mig_addr(index: int) -> str:
    return f"{MIG_NET}.{10 + index}"


def switch_mig_port(index: int) -> str:
    return f"m{index}"


@dataclass
class VirtLab:
    """The libvirt parts of one lab (its namespaces come from :class:`Lab`)."""

    lab: Lab

    @property
    def dir(self) -> Path:
        return self.lab.dir / "libvirt"

    def daemons(self, t: Topology) -> dict[str, Daemon]:
        return {n.name: Daemon(self.lab.name, n.name, self.lab.names.node(n.name),
                               self.dir / n.name, mig_addr(i))
                for i, n in enumerate(t.nodes, start=1)}

    def daemon(self, t: Topology, node: str) -> Daemon:
        try:
            return self.daemons(t)[node]
        except KeyError:
            raise LabError(f"unknown node {node!r}") from None

    # building -----------------------------------------------------------------------
    def build(self, t: Topology) -> None:
        """Migration segment and one libvirtd per node (call after the lab's namespaces
        exist; hooks go into each daemon's hooks dir before it starts)."""
        libvirt_preflight()
        ns.bridge(self.lab.names.switch, MIG_BRIDGE)
        for i, node in enumerate(t.nodes, start=1):
            node_ns = self.lab.names.node(node.name)
            ns.veth(self.lab.names.switch, switch_mig_port(i), node_ns, MIG_IFACE)
            ns.enslave(self.lab.names.switch, switch_mig_port(i), MIG_BRIDGE)
            ns.ip(node_ns, "addr", "add", f"{mig_addr(i)}/24", "dev", MIG_IFACE)
            ns.ip(node_ns, "link", "set", MIG_IFACE, "up")
        for d in self.daemons(t).values():
            d.prepare()

    def start_daemons(self, t: Topology) -> None:
        for d in self.daemons(t).values():
            d.start()

    def ssh_key(self) -> Path:
        """The lab's client key: its public half goes on every guest's command line."""
        key = self.dir / "ssh" / "client_key"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            ns.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "convergent-lab",
                   "-f", str(key)])
        return key

    def domain(self, t: Topology, guest: str, image: GuestImage,
               metadata_only: bool = False) -> LabDomain:
        """A guest of the cluster file as a lab domain."""
        g = t.guest(guest)
        tcp = sorted({s.target_port for s in t.services if s.guest == guest
                      and s.proto == "tcp" and ("tcp", s.target_port) not in DEMO_PORTS})
        udp = sorted({s.target_port for s in t.services if s.guest == guest
                      and s.proto == "udp" and ("udp", s.target_port) not in DEMO_PORTS})
        return self.any_domain(t, g.name, g.macs[0], g.addresses[0], image,
                               tuple(g.addresses) if metadata_only else (), tcp, udp)

    def any_domain(self, t: Topology, name: str, mac: str, address: IPv4Address,
                   image: GuestImage, metadata: tuple[IPv4Address, ...] = (),
                   tcp: list[int] | None = None, udp: list[int] | None = None) -> LabDomain:
        """A lab domain for any guest, in the cluster file or not."""
        plen = t.cluster.guest_subnet.prefixlen
        pub = (self.ssh_key().with_suffix(".pub")).read_text().split()[1]
        return LabDomain(
            name=name, uuid=guest_uuid(self.lab.name, name), mac=mac,
            bridge=t.cluster.guest_bridge, address=IPv4Interface(f"{address}/{plen}"),
            gateway=t.cluster.gateway, kernel=str(image.kernel), initrd=str(image.initrd),
            rootfs=str(image.rootfs), console_log=str(self.console_log(name)), ssh_key=pub,
            tcp_ports=tuple(tcp or ()), udp_ports=tuple(udp or ()), metadata=metadata)

    def console_log(self, guest: str) -> Path:
        return self.dir / "console" / f"{guest}.log"

    def boot(self, t: Topology, guest: str, node: str, image: GuestImage | None = None,
             xml: str | None = None, wait: bool = True) -> None:
        """Start the guest as a transient domain on ``node`` and wait for its servers."""
        image = image or ensure_image()
        xml = xml or lab_domain_xml(self.domain(t, guest, image))
        log = self.console_log(guest)
        log.parent.mkdir(parents=True, exist_ok=True)
        mark = log.stat().st_size if log.exists() else 0
        path = self.dir / f"{guest}.xml"
        path.write_text(xml)
        self.daemon(t, node).virsh("create", str(path))
        if wait:
            self.wait_ready(guest, mark)

    def wait_ready(self, guest: str, mark: int = 0, timeout: float = BOOT_TIMEOUT_S) -> str:
        """Until the guest says its servers run; returns its boot id."""
        log = self.console_log(guest)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_bytes()[mark:].decode(errors="replace") if log.exists() else ""
            for line in text.splitlines():
                if READY_MARK in line:
                    return line.rpartition("boot=")[2].strip()
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-600:] if log.exists() else "(no console)"
        raise LabError(f"guest {guest} did not come up in {timeout:.0f} s: {tail}")

    # where and how ------------------------------------------------------------------
    def state(self, t: Topology, guest: str, node: str) -> str:
        """libvirt's state of the guest on ``node`` ('' when it has no such domain)."""
        p = self.daemon(t, node).virsh("domstate", guest, check=False)
        return p.stdout.strip() if p.returncode == 0 else ""

    def guest_node(self, t: Topology, guest: str) -> str | None:
        """The node whose libvirt runs the guest (the lab's ground truth)."""
        for node in t.nodes:
            if self.state(t, guest, node.name) == "running":
                return node.name
        return None

    def migrate_argv(self, t: Topology, guest: str, src: str, dst: str, p2p: bool = False,
                     extra: tuple[str, ...] = ()) -> list[str]:
        """The operator's ``virsh migrate --live`` from ``src`` to ``dst``."""
        s, d = self.daemon(t, src), self.daemon(t, dst)
        target = d.tcp_uri if p2p else d.uri
        return ["virsh", "-q", "-c", s.uri, "migrate", "--live", *(["--p2p"] if p2p else []),
                *extra, guest, target, f"tcp://{d.listen_addr}"]

    def virsh_migrate(self, t: Topology, guest: str, src: str, dst: str, p2p: bool = False,
                      extra: tuple[str, ...] = (), timeout: float = 180,
                      check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.migrate_argv(t, guest, src, dst, p2p, extra)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"{shlex.join(argv)}: {proc.stderr.strip()}")
        return proc

    def destroy_all(self, t: Topology) -> None:
        """Stop every domain of every node (before the namespaces go)."""
        for d in self.daemons(t).values():
            if not d.socket.exists():
                continue
            p = d.virsh("list", "--name", check=False, timeout=10)
            for name in p.stdout.split():
                d.virsh("destroy", name, check=False, timeout=20)


def guest_uuid(lab: str, guest: str) -> str:
    return str(uuid.UUID(hashlib.sha256(f"{lab}:{guest}".encode()).hexdigest()[:32]))


def hypervisor_section(lab_dir: Path, t_nodes: list[str]) -> str:
    """``[hypervisor]`` of a libvirt lab: each agent reaches its node's libvirtd on its
    socket in the lab directory, and the others' over the migration segment."""
    sock = lab_dir / "libvirt" / "{node}" / "run" / "libvirt" / "libvirt-sock"
    addrs = ", ".join(f'{n} = "{mig_addr(i)}"' for i, n in enumerate(t_nodes, start=1))
    return (f'[hypervisor]\nkind = "libvirt"\nuri = "qemu+unix:///system?socket={sock}"\n'
            f"addresses = {{ {addrs} }}\n")


@dataclass
class LibvirtLab(Lab):
    """The lab with real VMs: like :class:`Lab`, but each guest is a TCG VM run by its
    node's libvirtd (no guest namespaces), the hooks installed in every node's libvirt,
    and ``[hypervisor] kind = "libvirt"`` in the cluster file."""

    metadata_only: tuple[str, ...] = field(default=())  # guests booted with metadata

    @property
    def virt(self) -> VirtLab:
        return VirtLab(self)

    def up(self, nodes: int = 3, config: Path | None = None, agents: bool = True,
           store: str = "sqlite", hypervisor: str = "libvirt") -> Topology:
        """``hypervisor``: always libvirt here (the section is added below)."""
        libvirt_preflight()
        ensure_image()  # before any namespace exists: a failed build leaves nothing behind
        text = config.read_text() if config else demo_config(nodes, self.name)
        if "agent" not in _toml(text):
            # each node's hooks spool apart: an agent replays only its own node's calls
            text += f'\n[agent]\nspool_dir = "{self.dir}/spool/{{node}}"\n'
        if "hypervisor" not in _toml(text):
            names = [n["name"] for n in _toml(text).get("nodes", [])]
            text += "\n" + hypervisor_section(self.dir, names)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cluster.toml"
            path.write_text(text)
            return super().up(nodes, path, agents, store)

    def is_up(self, topology: Topology) -> bool:
        existing = set(ns.list_netns())
        guests = {self.names.guest(g.name) for g in topology.guests}
        return self.config_path.exists() and all(
            n in existing for n in self.names.all_for(topology) if n not in guests)

    def down(self) -> list[str]:
        with contextlib.suppress(ConvergentError, OSError):
            self.virt.destroy_all(self.topology())
        return super().down()

    def _build(self, t: Topology) -> None:
        n = self.names
        guests = {n.guest(g.name) for g in t.guests}
        for name in n.all_for(t):
            if name not in guests:
                ns.add_netns(name)
        for bridge in ("wan", "pipes", "sync"):
            ns.bridge(n.switch, bridge)
        self._build_workstation(t)
        for i, node in enumerate(t.nodes, start=1):
            self._build_node(t, i, node.name)
        for node in t.nodes:
            apply(t, node.name, n.node(node.name))
        self._responder(n.workstation, "workstation", [WORKSTATION_TCP_PORT], [])
        virt = self.virt
        virt.build(t)
        for name in virt.daemons(t):
            self.install_hooks(t, name)
        virt.start_daemons(t)
        image = ensure_image()
        for g in t.guests:
            if g.home:
                virt.boot(t, g.name, g.home, image, xml=lab_domain_xml(
                    virt.domain(t, g.name, image, g.name in self.metadata_only)))

    def install_hooks(self, t: Topology, node: str) -> list[str]:
        """``install-hooks --libvirt`` into the node's libvirt (before its libvirtd starts:
        libvirt looks for hooks at start)."""
        conf = HookConf(str(t.agent.socket(node)), str(t.agent.spool(node)), node)
        return install(self.virt.daemon(t, node).root, conf, None)

    def plug_guest(self, t: Topology, guest: Guest, node: str) -> None:
        raise LabError(f"{guest.name} is a VM: boot it with libvirt, not a veth")

    def guest_node(self, t: Topology, guest: str) -> str | None:
        return self.virt.guest_node(t, guest)


@dataclass
class VmGuest:
    """The flows' guest end inside a VM (flows.GuestSide): its servers run from its boot;
    the guest-initiated client runs there over SSH from its node (kvm.guestexec)."""

    lab: LibvirtLab
    topology: Topology
    guest: str
    # a TCG guest on a shared 2-core machine logs in 15 SSH sessions and starts Python
    ready_timeout_s: float = 90.0

    def start_servers(self, run_dir: Path) -> tuple[list[Proc], Path]:
        return [], self.lab.virt.ssh_key()

    def start_client(self, run_dir: Path, spec: dict[str, Any]) -> Proc:
        home = self.lab.guest_node(self.topology, self.guest)
        if home is None:
            raise LabError(f"guest {self.guest} runs nowhere")
        spec_path = run_dir / "guest-spec.json"
        spec_path.write_text(json.dumps(client_spec(spec)))
        result, log = run_dir / "guest-result.json", run_dir / "guest-client.log"
        address = self.topology.guest(self.guest).addresses[0]
        pid = ns.spawn(self.lab.names.node(home), [
            sys.executable, "-m", "orchestrator.kvm.guestexec", "--host", str(address),
            "--key", str(self.lab.virt.ssh_key()), "--spec", str(spec_path),
            "--result", str(result)], log)
        return Proc(pid, log, result)

    def restore(self, run_dir: Path) -> None:
        return None


def _toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}  # the lab's loader reports it, with its line
