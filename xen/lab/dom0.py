"""One node's dom0 for the stand-ins: a directory holding the Xen parts of its filesystem
(``etc/xen/scripts`` with Debian's scripts, ``var/log/xen``, ``var/lib/xen``, the xenstore
tree) and the network namespace its networking lives in.

Hotplug scripts run as libxl runs them (its argv, its environment on top of xl's), inside
the node's namespace and a private mount namespace whose ``/var/log`` is the node's: the
Debian scripts send their stderr to ``/var/log/xen/xen-hotplug.log`` and exit without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator.errors import ConvergentError

from . import debian
from .libxl import Writes, hotplug_argv, hotplug_env

XENSTORE_TOOLS = ("read", "write", "exists", "rm", "list", "watch")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Dom0Error(ConvergentError):
    pass


@dataclass(frozen=True)
class Dom0:
    root: Path
    netns: str
    bin_dir: Path  # the stand-in tools: xenstore-*, xl

    @property
    def scripts_dir(self) -> Path:
        return self.root / "etc/xen/scripts"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log"

    def env(self, guest_netns: str = "{name}") -> dict[str, str]:
        """What xl runs with (and so what its hotplug scripts inherit)."""
        return {"PATH": f"{self.bin_dir}:{SYSTEM_PATH}", "CONVERGENT_XEN_ROOT": str(self.root),
                "CONVERGENT_XEN_NETNS": self.netns, "CONVERGENT_XEN_BIN": str(self.bin_dir),
                "CONVERGENT_XEN_GUEST_NETNS": guest_netns, "LANG": "C.UTF-8"}

    # set-up ---------------------------------------------------------------
    def build(self) -> None:
        """The filesystem a Debian dom0 has after installing xen-utils-common (without
        installing it) and dom0's own xenstore entries."""
        refuse_real_xen_tools()
        shutil.copytree(debian.scripts_dir(), self.scripts_dir, dirs_exist_ok=True)
        for sub in ("var/log/xen", "var/lib/xen", "xenstore"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        install_stand_ins(self.bin_dir)
        self.xs_write([("/local/domain/0/name", "Domain-0"), ("/local/domain/0/domid", "0")])

    # xenstore -------------------------------------------------------------
    def xs(self, mode: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.bin_dir / f"xenstore-{mode}"), *args], env=self.env(),
                              capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise Dom0Error(f"xenstore-{mode} {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def xs_write(self, writes: Writes) -> None:
        if writes:
            self.xs("write", *(x for pair in writes for x in pair))

    def xs_read(self, path: str) -> str | None:
        proc = self.xs("read", path, check=False)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else None

    def xs_rm(self, *paths: str) -> None:
        for p in paths:
            self.xs("rm", "-t", p, check=False)

    def tree(self) -> dict[str, str]:
        """Every node and its value (for comparisons in tests)."""
        base = self.root / "xenstore"
        out = {}
        for dirpath, _dirs, files in os.walk(base):
            rel = "/" + os.path.relpath(dirpath, base).removeprefix(".")
            value = ""
            if ".v" in files:
                value = Path(dirpath, ".v").read_text().rstrip("\n")
            out[rel.rstrip("/") or "/"] = value
        return out

    # hotplug --------------------------------------------------------------
    def hotplug(self, script: str, action: str, domid: int, devid: int, gatewaydev: str = "",
                timeout: float = 40.0, base_env: Mapping[str, str] | None = None,
                capture: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a vif hotplug script as libxl does: its argv, its variables on top of xl's
        environment, stdin /dev/null, stdout onto xl's stderr (libxl_device.c
        device_hotplug), LIBXL_HOTPLUG_TIMEOUT 40 s. ``capture``: keep both for a test."""
        argv = hotplug_argv(script, action)
        env = {**(self.env() if base_env is None else base_env),
               **hotplug_env(script, domid, devid, gatewaydev)}
        out = subprocess.PIPE if capture else sys.stderr
        return subprocess.run(self.in_dom0(argv), env=env, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.PIPE if capture else None,
                              text=True, timeout=timeout, cwd="/")

    def in_dom0(self, argv: list[str]) -> list[str]:
        """``argv`` inside the node's namespace, with the node's /var/log."""
        return ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", "private",
                "sh", "-c", 'mount --bind "$0" /var/log && exec "$@"', str(self.log_dir), *argv]


def install_stand_ins(bin_dir: Path) -> None:
    """xenstore-* (one sh script) and xl (this Python running xen/lab/xl.py)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    _write_exec(bin_dir / "xl", f'#!/bin/sh\n# the lab\'s stand-in for xl\n'
                f'exec {sys.executable} -m {__package__}.xl "$@"\n')
    tool = Path(str(resources.files(__package__) / "xenstore.sh"))
    for mode in XENSTORE_TOOLS:
        link = bin_dir / f"xenstore-{mode}"
        if not (link.is_symlink() and link.resolve() == tool.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(tool)


def write_ssh(bin_dir: Path, dom0s: Mapping[str, Dom0], guest_netns: str) -> Path:
    """``ssh HOST COMMAND...`` for the lab (what ``xl migrate`` runs as its transport):
    COMMAND in HOST's dom0, its namespace and environment, as sshd would run it; the
    lab's fault and stream-time variables travel along (ssh's SendEnv)."""
    cases = "".join(
        f'    {host}) ns={d.netns} root={d.root} ;;\n' for host, d in sorted(dom0s.items()))
    path = bin_dir / "lab-ssh"
    _write_exec(path, f"""#!/bin/sh
# the lab's ssh: HOST is a node, the command runs in its dom0
host=$1; shift
case $host in
{cases}    *) echo "ssh: Could not resolve hostname $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" env CONVERGENT_XEN_ROOT="$root" CONVERGENT_XEN_NETNS="$ns" \\
    CONVERGENT_XEN_BIN="{bin_dir}" CONVERGENT_XEN_GUEST_NETNS="{guest_netns}" \\
    PATH="{bin_dir}:{SYSTEM_PATH}" \\
    ${{CONVERGENT_XL_FAULT:+CONVERGENT_XL_FAULT="$CONVERGENT_XL_FAULT"}} \\
    ${{CONVERGENT_XEN_STREAM_S:+CONVERGENT_XEN_STREAM_S="$CONVERGENT_XEN_STREAM_S"}} \\
    ${{CONVERGENT_LAB_KEEP_ARP:+CONVERGENT_LAB_KEEP_ARP="$CONVERGENT_LAB_KEEP_ARP"}} sh -c "$*"
""")
    return path


def _write_exec(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)


def refuse_real_xen_tools() -> None:
    """Debian's scripts put /usr/bin and /usr/sbin first in PATH: real xenstore tools there
    would shadow the stand-ins (and fail without a hypervisor)."""
    for d in ("/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        if Path(d, "xenstore-read").exists():
            raise Dom0Error(f"{d}/xenstore-read exists (package xenstore-utils): the lab's "
                            "stand-in xenstore cannot run beside the real tools")
