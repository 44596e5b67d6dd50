"""What the libvirt tests share: why they cannot run here, and a shell in the VM."""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any


@cache
def kvm_skip_reason() -> str | None:
    """The one reason the libvirt tests cannot run on this machine, if any."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, libvirtd)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (the VM's tap device)"
    for tool, pkg in (("libvirtd", "libvirt-daemon-system"), ("virsh", "libvirt-clients"),
                      ("qemu-system-x86_64", "qemu-system-x86")):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"needs {tool} (package {pkg}; bash scripts/setup.sh installs it)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "needs libvirt-python (the project's kvm extra; scripts/setup.sh installs it)"
    return None


def libvirt_lab(name: str) -> Any:
    """A lab on libvirt (``lab up --hypervisor libvirt``), not yet up."""
    from orchestrator.lab.lab import Lab

    return Lab(name)


def up(lab: Any, agents: bool = True) -> Any:
    """``lab up --hypervisor libvirt`` with the demo's services (the flows' ports)."""
    from orchestrator.lab.flows import demo_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "demo.toml"
        cfg.write_text(demo_config(3, lab.name))
        return lab.up(config=cfg, agents=agents, hypervisor="libvirt")


def driver(lab: Any) -> Any:
    """The lab's libvirt driver (orchestrator.kvm.lab.LibvirtLab)."""
    return lab.driver(lab.topology())


def ssh_guest(lab: Any, command: str, guest: str = "guest1", timeout: float = 30) -> str:
    """Run ``command`` in the VM, over SSH from the node it runs on."""
    out: str = driver(lab).ssh(lab.topology(), guest, command, timeout)
    return out
