"""What libxl writes to xenstore and passes to hotplug scripts (pure), for the stand-ins.

Sources (xen-project/xen, tools/libs/light): ``libxl__domain_make`` (libxl_create.c: the
domain's home with ``vm``, ``name``, ``/vm/<uuid>``), ``libxl__device_generic_add``
(libxl_device.c: the libxl path, the frontend, then the backend with ``frontend``),
``libxl__set_xenstore_nic`` and the generic device keys (libxl_nic.c: ``mac``, ``ip``,
``mtu`` only when not 1500, ``bridge``, ``handle``, ``type``, ``hotplug-status`` empty so
the backend waits for the script; ``frontend-id``, ``online``, ``state``), the removal
(``online`` 0 and ``state`` 5 before the offline script, every path removed only after it:
``libxl__initiate_device_generic_remove``, ``device_hotplug_done``,
``libxl__device_destroy``), ``libxl__domain_rename`` and the hotplug call itself
(libxl_linux.c ``get_hotplug_env``, ``libxl__hotplug_nic``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..names import backend_path, domain_path, frontend_path, vif_name

MTU_DEFAULT = 1500
XENBUS_INITIALISING, XENBUS_INITWAIT, XENBUS_CONNECTED = 1, 2, 4
XENBUS_CLOSING, XENBUS_CLOSED = 5, 6
Writes = list[tuple[str, str]]


@dataclass(frozen=True)
class Nic:
    devid: int
    mac: str
    bridge: str = "xenbr0"  # libxl's default
    ip: str | None = None
    script: str = "vif-bridge"  # relative: resolved in the scripts directory
    mtu: int = MTU_DEFAULT
    vifname: str | None = None
    gatewaydev: str | None = None


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    type: str = "pv"
    memory_mb: int = 128
    vcpus: int = 1
    nics: tuple[Nic, ...] = field(default_factory=tuple)


def abs_script(script: str, scripts_dir: str) -> str:
    """libxl__abs_path: a relative script name lives in the scripts directory."""
    return script if script.startswith("/") else f"{scripts_dir.rstrip('/')}/{script}"


def domain_make_writes(domid: int, dom: Domain) -> Writes:
    home, vm = domain_path(domid), f"/vm/{dom.uuid}"
    return [
        (home, ""), (vm, ""), (f"/libxl/{domid}/device", ""),
        (f"{home}/vm", vm), (f"{home}/cpu", ""), (f"{home}/memory", ""),
        (f"{home}/memory/target", str(dom.memory_mb * 1024)),
        (f"{home}/device", ""), (f"{home}/control", ""), (f"{home}/control/shutdown", ""),
        (f"{home}/data", ""), (f"{home}/drivers", ""), (f"{home}/feature", ""),
        (f"{home}/attr", ""), (f"{home}/error", ""),
        (f"{vm}/uuid", dom.uuid), (f"{vm}/name", dom.name), (f"{home}/name", dom.name),
        (f"{home}/domid", str(domid)), (f"/libxl/{domid}/type", dom.type),
    ]


def nic_add_writes(domid: int, nic: Nic, scripts_dir: str) -> Writes:
    """In libxl's order: libxl path, frontend, backend (the backend's creation is what
    makes netback create the vif; it then moves the backend to InitWait)."""
    be = f"/local/domain/0/{backend_path(domid, nic.devid)}"
    fe = frontend_path(domid, nic.devid)
    lx = f"/libxl/{domid}/device/vif/{nic.devid}"
    backend: Writes = [(f"{be}/frontend", fe), (f"{be}/frontend-id", str(domid)),
                       (f"{be}/online", "1"), (f"{be}/state", str(XENBUS_INITIALISING)),
                       (f"{be}/script", abs_script(nic.script, scripts_dir))]
    if nic.vifname:
        backend.append((f"{be}/vifname", nic.vifname))
    backend.append((f"{be}/mac", nic.mac))
    if nic.ip:
        backend.append((f"{be}/ip", nic.ip))
    if nic.gatewaydev:
        backend.append((f"{be}/gatewaydev", nic.gatewaydev))
    if nic.mtu != MTU_DEFAULT:
        backend.append((f"{be}/mtu", str(nic.mtu)))
    backend += [(f"{be}/bridge", nic.bridge), (f"{be}/handle", str(nic.devid)),
                (f"{be}/type", "vif"), (f"{be}/hotplug-status", "")]
    return [
        (f"{lx}/frontend", fe), (f"{lx}/backend", be),
        (f"{fe}/backend", be), (f"{fe}/backend-id", "0"),
        (f"{fe}/state", str(XENBUS_INITIALISING)), (f"{fe}/handle", str(nic.devid)),
        (f"{fe}/mac", nic.mac), (f"{fe}/mtu", str(nic.mtu)), (f"{fe}/trusted", "1"),
        *backend,
    ]


def nic_remove_writes(domid: int, devid: int) -> Writes:
    """Before the offline script: the backend is told to close."""
    be = f"/local/domain/0/{backend_path(domid, devid)}"
    return [(f"{be}/online", "0"), (f"{be}/state", str(XENBUS_CLOSING))]


def nic_paths(domid: int, devid: int) -> list[str]:
    """Removed after the offline script returned (libxl__device_destroy)."""
    return [frontend_path(domid, devid), f"/libxl/{domid}/device/vif/{devid}",
            f"/local/domain/0/{backend_path(domid, devid)}"]


def domain_paths(domid: int, dom: Domain) -> list[str]:
    """Removed once every device is gone (devices_destroy_cb)."""
    return [f"/libxl/{domid}", domain_path(domid), f"/vm/{dom.uuid}"]


def rename_writes(domid: int, uuid: str, new_name: str) -> Writes:
    return [(f"{domain_path(domid)}/name", new_name), (f"/vm/{uuid}/name", new_name)]


def hotplug_argv(script: str, action: str) -> list[str]:
    """``action``: "add" -> online, "remove" -> offline (the PV vif; type_if=vif)."""
    return [script, "online" if action == "add" else "offline", "type_if=vif"]


def hotplug_env(script: str, domid: int, devid: int, gatewaydev: str = "") -> dict[str, str]:
    """Exactly the variables libxl sets (on top of what xl itself inherited)."""
    return {"script": script, "XENBUS_TYPE": "vif",
            "XENBUS_PATH": backend_path(domid, devid), "XENBUS_BASE_PATH": "backend",
            "netdev": gatewaydev, "vif": vif_name(domid, devid)}
