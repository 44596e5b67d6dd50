"""What the libvirt tests share: why they cannot run here, and a shell in the VM."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from typing import Any

from orchestrator.lab import netns as ns
from orchestrator.lab.flow_client import ssh_argv


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


def ssh_guest(lab: Any, command: str, guest: str = "guest1", timeout: float = 30) -> str:
    """Run ``command`` in the VM, over SSH from the node it runs on."""
    t = lab.topology()
    node = lab.guest_node(t, guest)
    assert node is not None, f"{guest} runs nowhere"
    argv = [*ssh_argv(str(lab.virt.ssh_key()), str(t.guest(guest).addresses[0]), 22)[:-1],
            command]
    return subprocess.run(ns.exec_argv(lab.names.node(node), argv), capture_output=True,
                          text=True, timeout=timeout, check=True).stdout
