"""One real libvirtd per lab node (LIBVIRT-XEN.md §3): each inside the node's network
namespace and in a UTS + mount namespace of its own, with its own hostname, ``host_uuid``
and /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt
bind-mounted from the lab's directory. Two such daemons on one machine pass libvirt's
"same host" check, so a real ``virsh migrate --live`` runs between them.

The config renderers are pure; :class:`Daemon` starts and stops the process.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import LabError
from orchestrator.lab import netns as ns

BOUND_DIRS = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt",
              "var/cache/libvirt")
REQUIRED = {"libvirtd": "libvirt-daemon-system", "virsh": "libvirt-clients",
            "qemu-system-x86_64": "qemu-system-x86", "unshare": "util-linux"}
MIGRATION_PORTS = (49152, 49215)
# KVM is present but unusable on these machines (FACTS.md): the lab runs TCG guests, and
# libvirt keeps away from what a shared test machine lacks (cgroups, namespaces, labels)
QEMU_CONF = f"""\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
swtpm_user = "root"
swtpm_group = "root"
migration_port_min = {MIGRATION_PORTS[0]}
migration_port_max = {MIGRATION_PORTS[1]}
"""


def libvirtd_conf(host_uuid: str, listen_addr: str, log_file: Path) -> str:
    """Local clients without auth (the socket lives in the lab's directory, root only);
    TCP without TLS or auth on the lab's own migration segment (inside namespaces)."""
    return (f'host_uuid = "{host_uuid}"\nlisten_tcp = 1\nlisten_tls = 0\n'
            f'auth_tcp = "none"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\n'
            f'listen_addr = "{listen_addr}"\nlog_outputs = "3:file:{log_file}"\n'
            'keepalive_interval = 5\nkeepalive_count = 5\n')


def lab_host_uuid(lab: str, node: str) -> str:
    """Stable per lab and node, different for every daemon (libvirt refuses to migrate
    to a host with its own uuid)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"convergent-lab:{lab}:{node}"))


def preflight() -> None:
    missing = [f"{tool} (package {pkg})" for tool, pkg in REQUIRED.items()
               if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        raise LabError("libvirt lab: missing " + ", ".join(missing)
                       + " (bash scripts/setup.sh installs them)")
    if not Path("/dev/net/tun").exists():
        raise LabError("libvirt lab: /dev/net/tun is missing (guests need tap devices)")


@dataclass(frozen=True)
class Daemon:
    """The libvirtd of one lab node."""

    lab: str
    node: str
    netns: str
    root: Path  # the daemon's private /etc/libvirt & co live under here
    listen_addr: str  # its address on the lab's migration segment

    @property
    def hostname(self) -> str:
        return f"cvg-{self.lab}-{self.node}"[:63]

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How a client on this machine reaches it (the socket is in the lab directory)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """How another node's libvirtd reaches it (peer-to-peer migration)."""
        return f"qemu+tcp://{self.listen_addr}/system"

    @property
    def hooks_dir(self) -> Path:
        return self.root / "etc" / "libvirt" / "hooks"

    @property
    def log(self) -> Path:
        return self.root / "var" / "log" / "libvirt" / "libvirtd.log"

    @property
    def stdout_log(self) -> Path:
        return self.root / "libvirtd.out"

    @property
    def pidfile(self) -> Path:
        return self.root / "libvirtd.pid"

    def prepare(self, peers: Mapping[str, str] | None = None) -> None:
        """The daemon's private directories and configuration (before the first start);
        ``peers``: node -> address, so this daemon (and its qemu) finds the others by name."""
        for d in BOUND_DIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc" / "libvirt"
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirtd.conf").write_text(
            libvirtd_conf(lab_host_uuid(self.lab, self.node), self.listen_addr, self.log))
        # a hostname of its own that resolves (libvirt looks it up; a miss only warns)
        names = {self.listen_addr: [self.hostname], **{}}
        for node, addr in (peers or {}).items():
            names.setdefault(addr, []).append(node)
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{addr} {' '.join(n)}\n" for addr, n in names.items()))
        self.hooks_dir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 20.0) -> int:
        """Start libvirtd (foreground, so it dies with the namespace) and wait until it
        answers."""
        # the mount points may be missing on a machine that never ran libvirt
        binds = " ".join(f"mkdir -p /{d}; mount --bind {shlex.quote(str(self.root / d))} /{d};"
                         for d in BOUND_DIRS)
        script = (f"hostname {shlex.quote(self.hostname)}; "
                  f"mount --bind {shlex.quote(str(self.root / 'hosts'))} /etc/hosts; {binds} "
                  f"exec libvirtd --listen -f /etc/libvirt/libvirtd.conf "
                  f"-p {shlex.quote(str(self.pidfile))}")
        mark = self.stdout_log.stat().st_size if self.stdout_log.exists() else 0
        pid = ns.spawn(self.netns, ["unshare", "-m", "-u", "--propagation", "private",
                                    "sh", "-c", script], self.stdout_log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers():
                return pid
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        tail = self.stdout_log.read_bytes()[mark:].decode(errors="replace").strip()[-300:]
        raise LabError(f"libvirtd of {self.node} did not come up: {tail or 'no output'}")

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: the guests keep running (libvirtd reconnects to them)."""
        pid = self.pid()
        if pid is None:
            return
        ns.sh(["kill", "-TERM", str(pid)], check=False)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            if _zombie(pid):
                break
            time.sleep(0.05)

    def answers(self) -> bool:
        return self.socket.exists() and self.virsh("version", check=False).returncode == 0

    def virsh(self, *args: str, check: bool = True, timeout: float = 120,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, input=stdin)
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().replace("\n", " ")
            raise LabError(f"virsh {args[0]} on {self.node}: {msg}")
        return proc


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True
