"""A lab whose nodes are Xen dom0s (``convergent lab up --hypervisor xl``).

Each node's namespace gets a dom0 directory (``LAB/xen/NODE``: Debian's scripts,
convergent-vif installed by the install-hooks code with that node's agent socket and
spool, the stand-in xenstore tree), the lab shares one ``bin`` of stand-in tools and a
``lab-ssh`` that runs a command in a node's dom0. Guests are booted with ``xl create`` from
an xl.cfg naming ``script=convergent-vif``; each node's agent runs the xl adapter with its
node's environment. ``migrate`` is the adapter's, so a lab migration is a plain ``xl
migrate`` seen by the agents only through the vif script and xenstore.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Guest, Topology
from orchestrator.errors import LabError
from orchestrator.hypervisor import ProgressFn

from ..adapter import XenHypervisor
from ..install import HookConf, install
from ..xllist import parse_list
from .dom0 import Dom0, write_ssh

KIND = "xl"


class XlLab:
    def __init__(self, lab_dir: Path, netns_of: Mapping[str, str], guest_netns: str) -> None:
        """``netns_of``: node -> its namespace; ``guest_netns``: the guests' namespaces
        with ``{name}`` for the guest's name."""
        self.dir = lab_dir / "xen"
        self.netns_of = netns_of
        self.guest_netns = guest_netns

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def dom0(self, node: str) -> Dom0:
        return Dom0(self.dir / node, self.netns_of[node], self.bin_dir)

    def settings(self) -> dict[str, Any]:
        """The ``[hypervisor]`` section's settings (the same for every node)."""
        return {"xl": str(self.bin_dir / "xl"), "ssh": str(self.bin_dir / "lab-ssh"),
                "poll_s": 0.02, "resync_s": 2.0}

    def hypervisor_toml(self) -> str:
        s = self.settings()
        return (f'[hypervisor]\nkind = "{KIND}"\nxl = "{s["xl"]}"\nssh = "{s["ssh"]}"\n'
                f'poll_s = {s["poll_s"]}\nresync_s = {s["resync_s"]}\n')

    def agent_env(self, node: str) -> dict[str, str]:
        return self.dom0(node).env(self.guest_netns)

    # building ---------------------------------------------------------------------------
    def build(self, t: Topology) -> None:
        """Every node's dom0, its hook, the lab's ssh and each guest's config."""
        for node in t.nodes:
            d = self.dom0(node.name)
            d.build()
            install(d.root, HookConf(str(t.agent.socket(node.name)),
                                     str(t.agent.spool(node.name)), node.name))
        write_ssh(self.bin_dir, {n.name: self.dom0(n.name) for n in t.nodes}, self.guest_netns)
        for g in t.guests:
            self.cfg(g).write_text(guest_cfg(g, t.cluster.guest_bridge))

    def cfg(self, g: Guest) -> Path:
        return self.dir / f"{g.name}.cfg"

    def create(self, guest: Guest, node: str) -> None:
        """``xl create`` on ``node``: the guest's NIC appears, convergent-vif runs."""
        res = self.xl(node, "create", str(self.cfg(guest)))
        if res.returncode != 0:
            raise LabError(f"xl create {guest.name} on {node}: {_last(res.stderr)}")

    def xl(self, node: str, *args: str,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        d = self.dom0(node)
        return subprocess.run(["ip", "netns", "exec", d.netns, str(self.bin_dir / "xl"), *args],
                              env={**os.environ, **self.agent_env(node), **(env or {})},
                              capture_output=True, text=True, timeout=120)

    def guest_node(self, t: Topology, guest: str) -> str | None:
        """Where the guest runs: the node whose xl lists it by its plain name, unpaused."""
        for node in t.nodes:
            if not (self.dir / node.name / "var/lib/xen/hv").is_dir():
                continue
            res = self.xl(node.name, "list")
            if res.returncode != 0:
                continue
            for row in parse_list(res.stdout):
                if row.name == guest and row.running:
                    return node.name
        return None

    async def migrate(self, guest: str, src: str, dst: str, progress: ProgressFn,
                      env: Mapping[str, str] | None = None) -> None:
        """``xl migrate`` from ``src`` through the adapter, as ``convergent migrate`` runs
        it on the source node (``env``: e.g. a fault for the destination's xl)."""
        hv = XenHypervisor({**self.settings(), "env": {**self.agent_env(src), **(env or {})}},
                           src)
        await hv.migrate(guest, dst, progress)


def guest_cfg(g: Guest, bridge: str) -> str:
    vifs = [f"mac={mac},bridge={bridge},script=convergent-vif"
            + (f",ip={' '.join(str(a) for a in g.addresses)}" if i == 0 else "")
            for i, mac in enumerate(g.macs)]
    return (f"# {g.name}: written by convergent lab up --hypervisor xl\n"
            f'name = "{g.name}"\nmemory = 128\nvcpus = 1\n'
            f"vif = {json.dumps(vifs)}\n")


def _last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"
