"""One vif on one node, ready for its hotplug script: what libxl and netback have done
before they run ``online`` (the domain's xenstore home, the device's entries, netback's
device in the node's namespace, the backend in InitWait). The vif script's tests and
``bench.hook`` drive a script through it exactly as libxl would."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..install import hook_source
from ..names import backend_path, vif_name
from .dom0 import Dom0
from .libxl import (
    XENBUS_INITWAIT,
    Domain,
    Nic,
    domain_make_writes,
    nic_add_writes,
    nic_remove_writes,
)
from .netback import NETBACK_MAC

DOMID, DEVID = 5, 0
MAC, IP, UUID = "52:54:00:00:02:01", "10.5.5.201", "039e9ee6-4a84-3055-4c81-8ba426ae2656"
BE = f"/local/domain/0/{backend_path(DOMID, DEVID)}"


@dataclass
class VifRig:
    dom0: Dom0
    script: str

    @classmethod
    def build(cls, node_ns: str, guest_ns: str, root: Path, bin_dir: Path,
              conf: dict[str, Any] | None = None) -> VifRig:
        """``conf`` None: the plain vif-bridge; else convergent's script with that
        hook.json."""
        ip = ["ip", "-n", node_ns, "link"]
        subprocess.run([*ip, "add", "guestbr0", "type", "bridge"], check=True)
        subprocess.run([*ip, "set", "guestbr0", "up"], check=True)
        subprocess.run([*ip, "add", vif_name(DOMID, DEVID), "address", NETBACK_MAC, "type",
                        "veth", "peer", "name", "eth0", "address", MAC, "netns", guest_ns],
                       check=True)
        dom0 = Dom0(root, node_ns, bin_dir)
        dom0.build()
        script = dom0.scripts_dir / "vif-bridge"
        if conf is not None:
            script = dom0.scripts_dir / "convergent-vif"
            script.write_text(hook_source())
            script.chmod(0o755)
            (dom0.scripts_dir / "hook.json").write_text(json.dumps(conf))
        return cls(dom0, str(script))

    def plug(self, name: str, bridge: str = "guestbr0") -> None:
        dom = Domain(name, UUID, nics=(Nic(DEVID, MAC, bridge, IP, self.script),))
        self.dom0.xs_write(domain_make_writes(DOMID, dom))
        self.dom0.xs_write(nic_add_writes(DOMID, dom.nics[0], str(self.dom0.scripts_dir)))
        self.dom0.xs_write([(f"{BE}/state", str(XENBUS_INITWAIT))])

    def online(self) -> subprocess.CompletedProcess[str]:
        return self.dom0.hotplug(self.script, "add", DOMID, DEVID)

    def offline(self, close: bool = True) -> subprocess.CompletedProcess[str]:
        if close:
            self.dom0.xs_write(nic_remove_writes(DOMID, DEVID))
        return self.dom0.hotplug(self.script, "remove", DOMID, DEVID)

    def link(self) -> dict[str, Any]:
        out = subprocess.run(["ip", "-j", "-d", "-n", self.dom0.netns, "link", "show",
                              vif_name(DOMID, DEVID)], capture_output=True, text=True,
                             check=True)
        info = json.loads(out.stdout)[0]
        return {k: info.get(k) for k in ("master", "flags", "mtu", "address", "operstate")}

    def tree(self) -> dict[str, str]:
        # the backend's script key names each host's own script: the one expected difference
        return {p: v for p, v in self.dom0.tree().items() if p != f"{BE}/script"}

