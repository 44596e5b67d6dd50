"""The lab on libvirt (``convergent lab up --hypervisor libvirt``): one real libvirtd per
node namespace, each guest a real TCG VM on its node's guest bridge, moved by a real live
migration.

The lab driver (entry point ``libvirt`` of ``convergent.lab_hypervisors``) adds to the
namespace lab a migration segment (one more bridge in the switch namespace, ``mig0`` in
every node: libvirt's TCP and the migration stream), a libvirtd per node
(:mod:`.libvirtd`) with convergent's hook installed before it starts, the guest image
(:mod:`.image`) and each guest's domain (:mod:`.domxml`). Guests have no namespace: the
VM keeps its own ARP cache, carrier and sockets across a move, and QEMU announces it on
the destination, as in production. The flows' guest end runs inside the VM
(:class:`VmGuest`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import LabError
from orchestrator.hypervisor import Progress, ProgressFn
from orchestrator.lab import netns as ns
from orchestrator.lab.flow_client import ssh_argv
from orchestrator.lab.flows import Proc, client_spec
from orchestrator.lab.plan import LabNames
from orchestrator.store import outwaits_refusal

from .domxml import LabDomain, lab_domain_xml
from .image import GuestImage, ensure_image
from .install import HookConf, install
from .libvirtd import Daemon
from .libvirtd import preflight as libvirt_preflight

KIND = "libvirt"
MIG_BRIDGE = "mig"
MIG_IFACE = "mig0"
MIG_NET = "172.30.0"
READY_MARK = "CONVERGENT-GUEST-READY"
BOOT_TIMEOUT_S = 120.0  # TCG on a loaded 2-core machine: 10-25 s is normal
DEMO_PORTS = {("tcp", 22), ("tcp", 8765), ("tcp", 8000), ("udp", 9123)}  # the guest's own
KEEP_ARP_ENV = "CONVERGENT_LAB_KEEP_ARP"  # "0": a control run (the lab driver sets it)


def mig_addr(index: int) -> str:
    return f"{MIG_NET}.{10 + index}"


def switch_mig_port(index: int) -> str:
    return f"m{index}"


class LibvirtLab:
    """The lab driver (``orchestrator.lab.drivers.LabDriver``)."""

    guests_in_namespaces = False  # the lab makes no guest namespace: the guest is a VM

    def __init__(self, lab_dir: Path, netns_of: Mapping[str, str], guest_netns: str) -> None:
        self.lab_dir = lab_dir
        self.dir = lab_dir / "libvirt"
        self.netns_of = netns_of
        self.names = LabNames(lab_dir.name)  # the lab's own namespaces (its switch)

    @property
    def lab_name(self) -> str:
        return self.lab_dir.name

    # the driver's part ----------------------------------------------------------------
    def hypervisor_toml(self) -> str:
        """Each agent reaches its node's libvirtd on its socket in the lab directory; the
        libvirtd reach each other by node name over the migration segment (every daemon's
        /etc/hosts names them all), as the adapter's defaults expect."""
        sock = self.dir / "{node}" / "run" / "libvirt" / "libvirt-sock"
        return f'[hypervisor]\nkind = "{KIND}"\nuri = "qemu+unix:///system?socket={sock}"\n'

    def build(self, t: Topology) -> None:
        """Migration segment, then per node: its libvirtd's directories, convergent's hook
        (libvirt looks for hooks when it starts), the daemon itself."""
        libvirt_preflight()
        ensure_image()  # the first build takes a minute: before any daemon waits on it
        ns.bridge(self.names.switch, MIG_BRIDGE)
        for i, node in enumerate(t.nodes, start=1):
            node_ns = self.netns_of[node.name]
            ns.veth(self.names.switch, switch_mig_port(i), node_ns, MIG_IFACE)
            ns.enslave(self.names.switch, switch_mig_port(i), MIG_BRIDGE)
            ns.ip(node_ns, "addr", "add", f"{mig_addr(i)}/24", "dev", MIG_IFACE)
            ns.ip(node_ns, "link", "set", MIG_IFACE, "up")
        peers = {d.node: d.listen_addr for d in self.daemons(t).values()}
        for name, d in self.daemons(t).items():
            d.prepare(peers)
            self.install_hooks(t, name)
        for d in self.daemons(t).values():
            d.start()

    def create(self, guest: Guest, node: str) -> None:
        t = self.topology()
        self.boot(t, guest.name, node)

    def agent_env(self, node: str) -> dict[str, str]:
        return {}

    async def migrate(self, guest: str, src: str, dst: str, progress: ProgressFn,
                      env: Mapping[str, str] | None = None) -> None:
        """The operator's move: ``virsh migrate --live`` (the agents learn of it only from
        their hooks and events). ``env`` with a keep-ARP variable at "0": the guest's
        neighbour entries lapse right after (a control run's compressed ARP expiry)."""
        import asyncio

        t = self.topology()
        progress(Progress("starting", f"virsh migrate --live {guest} {src} -> {dst}"))
        await asyncio.to_thread(self.virsh_migrate, t, guest, src, dst)
        progress(Progress("resumed", f"{guest} runs on {dst}"))
        if env and env.get(KEEP_ARP_ENV) == "0":
            await asyncio.to_thread(self.ssh, t, guest, "ip neigh flush dev eth0")
        progress(Progress("done", f"{guest} runs on {dst}", 1.0))

    def flow_side(self, lab: Any, t: Topology, guest: str) -> VmGuest:
        """Where the flows' guest end runs (``orchestrator.lab.flows.GuestSide``)."""
        return VmGuest(self, t, guest)

    def topology(self) -> Topology:
        from orchestrator.config.loader import load

        return load(self.lab_dir / "cluster.toml")

    def install_hooks(self, t: Topology, node: str) -> list[str]:
        """``install-hooks --libvirt`` into the node's libvirt."""
        conf = HookConf(str(t.agent.socket(node)), str(t.agent.spool(node)), node,
                        verdict_timeout_s=outwaits_refusal(t.agent.store, HookConf.timeout_s))
        return install(self.daemon(t, node).root, conf, None)

    # libvirt --------------------------------------------------------------------------
    def daemons(self, t: Topology) -> dict[str, Daemon]:
        return {n.name: Daemon(self.lab_name, n.name, self.netns_of[n.name],
                               self.dir / n.name, mig_addr(i))
                for i, n in enumerate(t.nodes, start=1)}

    def daemon(self, t: Topology, node: str) -> Daemon:
        try:
            return self.daemons(t)[node]
        except KeyError:
            raise LabError(f"unknown node {node!r}") from None

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
            name=name, uuid=guest_uuid(self.lab_name, name), mac=mac,
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

    def answers_probes(self, proto: str, port: int) -> bool:
        """The VM's responder serves every service port but the real servers' (DEMO_PORTS)."""
        return (proto, port) not in DEMO_PORTS

    def ssh(self, t: Topology, guest: str, command: str, timeout: float = 60,
            address: IPv4Address | None = None) -> str:
        """Run ``command`` in the VM over SSH, from the node it runs on (the node reaches
        it on its guest bridge, or over the pipes after a move, with no NAT between)."""
        node = self.guest_node(t, guest)
        if node is None:
            raise LabError(f"guest {guest} runs on no node")
        host = address or next(g.addresses[0] for g in t.guests if g.name == guest)
        argv = [*ssh_argv(str(self.ssh_key()), str(host), 22)[:-1], command]
        proc = subprocess.run(ns.exec_argv(self.netns_of[node], argv), capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise LabError(f"ssh to {guest}: {command!r}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

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


@dataclass
class VmGuest:
    """The flows' guest end inside a VM (flows.GuestSide): its servers run from its boot;
    the guest-initiated client runs there over SSH from its node (kvm.guestexec)."""

    lab: LibvirtLab  # the driver
    topology: Topology
    guest: str
    # a TCG guest on a shared 2-core machine logs in 15 SSH sessions and starts Python
    ready_timeout_s: float = 90.0

    def start_servers(self, run_dir: Path) -> tuple[list[Proc], Path]:
        return [], self.lab.ssh_key()

    def start_client(self, run_dir: Path, spec: dict[str, Any]) -> Proc:
        home = self.lab.guest_node(self.topology, self.guest)
        if home is None:
            raise LabError(f"guest {self.guest} runs nowhere")
        spec_path = run_dir / "guest-spec.json"
        spec_path.write_text(json.dumps(client_spec(spec)))
        result, log = run_dir / "guest-result.json", run_dir / "guest-client.log"
        address = self.topology.guest(self.guest).addresses[0]
        pid = ns.spawn(self.lab.netns_of[home], [
            sys.executable, "-m", "orchestrator.kvm.guestexec", "--host", str(address),
            "--key", str(self.lab.ssh_key()), "--spec", str(spec_path),
            "--result", str(result)], log)
        return Proc(pid, log, result)

    def restore(self, run_dir: Path) -> None:
        return None
