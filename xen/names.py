"""libxl's names (pure): vif devices, xenstore paths, the migration suffixes of domain names.

During ``xl migrate`` the destination's copy is named ``NAME--incoming`` until it gets
permission to start, and the source's copy ``NAME--migratedaway`` from the moment it hands
over (tools/xl/xl_migrate.c); the guest is NAME in both.
"""

from __future__ import annotations

import re
from enum import StrEnum

INCOMING_SUFFIX = "--incoming"
AWAY_SUFFIX = "--migratedaway"
DOM0_NAME = "Domain-0"
_VIF = re.compile(r"vif(\d+)\.(\d+)")


class Phase(StrEnum):
    """Where a domain stands in an ``xl migrate``, from its name alone."""

    NONE = ""
    INCOMING = "incoming"  # the destination's copy, before it may start
    AWAY = "migratedaway"  # the source's copy, after it handed over


def split_name(name: str) -> tuple[str, Phase]:
    """``guest1--incoming`` -> (``guest1``, INCOMING); a plain name -> (name, NONE)."""
    for suffix, phase in ((INCOMING_SUFFIX, Phase.INCOMING), (AWAY_SUFFIX, Phase.AWAY)):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], phase
    return name, Phase.NONE


def parse_vif(vif: str) -> tuple[int, int]:
    """``vif5.0`` -> (domid 5, devid 0), as libxl names the netback device."""
    m = _VIF.fullmatch(vif)
    if m is None:
        raise ValueError(f"not a libxl vif name: {vif!r} (expected vifDOMID.DEVID)")
    return int(m.group(1)), int(m.group(2))


def vif_name(domid: int, devid: int) -> str:
    return f"vif{domid}.{devid}"


def backend_path(domid: int, devid: int) -> str:
    """Relative to dom0's home (/local/domain/0), as libxl passes it in XENBUS_PATH."""
    return f"backend/vif/{domid}/{devid}"


def frontend_path(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/vif/{devid}"


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def uuid_from_vm_path(vm: str) -> str | None:
    """``/vm/<uuid>`` (the domain's ``vm`` key) -> the uuid."""
    if vm.startswith("/vm/") and len(vm) > 4:
        return vm[4:].split("/")[0]
    return None
