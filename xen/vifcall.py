"""What one call of convergent's vif script means (pure): the ``xen-vif`` hook forwards
libxl's argv and environment plus what it read from xenstore (``extra``: the wrapped
script's exit ``status``, ``mac``, ``bridge``, ``name``, ``vm``, ``ip``).

``online type_if=vif`` (libxl attached the device):
- for ``NAME--incoming``: INCOMING (``xl migrate-receive``, after the memory, before resume);
- for ``NAME``: STARTED (``xl create``, restore).

``offline type_if=vif`` (libxl removes the device; its keys go only afterwards):
- for ``NAME--migratedaway``: GONE (the source destroys its copy once the destination runs);
- for ``NAME--incoming``: FAILED (the destination destroys the copy of a failed migration);
- for ``NAME``: STOPPED (destroy, shutdown; or a destination that failed after the rename,
  which the agent's table tells from the migration it has open).

Nothing for ``add``/``remove type_if=tap`` (the emulated twin of a vif that has its own
call), nor for an ``online`` whose wrapped script failed (libxl fails the device and
destroys the domain: its offline follows).
"""

from __future__ import annotations

from ipaddress import IPv4Address, ip_interface

from orchestrator.hypervisor import EventKind, GuestEvent, HookCall

from .names import Phase, parse_vif, split_name, uuid_from_vm_path

HOOK = "xen-vif"
ACTIONS = {"online": "vif", "offline": "vif", "add": "tap", "remove": "tap"}
_KINDS = {
    ("online", Phase.INCOMING): EventKind.INCOMING,
    ("online", Phase.NONE): EventKind.STARTED,
    ("offline", Phase.AWAY): EventKind.GONE,
    ("offline", Phase.INCOMING): EventKind.FAILED,
    ("offline", Phase.NONE): EventKind.STOPPED,
}


def parse_vif_call(call: HookCall, node: str) -> GuestEvent | None:
    """Raises ``ValueError`` (one line) for a call that is not libxl's."""
    if call.hook != HOOK:
        raise ValueError(f"not a {HOOK} call: hook {call.hook!r}")
    action = call.argv[1] if len(call.argv) > 1 else ""
    if action not in ACTIONS:
        raise ValueError(f"{HOOK}: unknown action {action!r} (argv {list(call.argv)})")
    type_if = _type_if(call.argv[2:])
    if type_if != ACTIONS[action]:
        return None  # vif-common.sh exits 0 on these too
    if "vif" not in call.env:
        raise ValueError(f"{HOOK}: no vif in the environment (argv {list(call.argv)})")
    domid, devid = parse_vif(call.env["vif"])
    extra = call.extra
    status = _status(extra.get("status", "0"))
    name = extra.get("name", "")
    if not name:
        raise ValueError(f"{HOOK}: {action} of vif{domid}.{devid} without a domain name "
                         "(xenstore unreadable when the script ran?)")
    guest, phase = split_name(name)
    if action == "online" and status != 0:
        return None
    kind = _KINDS.get((action, phase))
    if kind is None:
        return None  # online for a --migratedaway copy: libxl never does that
    mac = extra.get("mac", "").strip().lower()
    return GuestEvent(
        kind=kind, guest=guest, node=node, origin=f"hook:{HOOK}", at=call.at,
        macs=(mac,) if mac else (), addresses=guest_addresses(extra.get("ip", "")),
        uuid=uuid_from_vm_path(extra.get("vm", "")), id=call.id,
        detail=f"{action} vif{domid}.{devid} of domain {name} (status {status})",
    )


def guest_addresses(ip: str) -> tuple[IPv4Address, ...]:
    """The vif's ``ip`` key: space-separated addresses or networks (vif-bridge allows
    both); the guest's own addresses are the IPv4 hosts among them."""
    found: list[IPv4Address] = []
    for word in ip.split():
        try:
            iface = ip_interface(word)
        except ValueError:
            continue
        if iface.version == 4 and iface.network.prefixlen == 32:
            addr = IPv4Address(int(iface.ip))
            if addr not in found:
                found.append(addr)
    return tuple(found)


def _type_if(args: tuple[str, ...]) -> str:
    for a in args:
        if a.startswith("type_if="):
            return a.split("=", 1)[1]
    return "vif"  # older libxl passed none; vif-common.sh defaults the same way


def _status(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{HOOK}: wrapped script status {text!r} is not a number") from None
