"""``xl list`` output (pure).

``xl list -l`` prints a JSON array with one object per domain, ``{"domid": N, "config":
{...}}``, where ``config`` is libxl's ``libxl_domain_config`` as generated from
tools/libs/light/libxl_types.idl (``c_info.name``/``uuid``/``type``; ``nics[]`` with
``devid``, ``mac``, ``ip`` (space-separated), ``bridge``, ``script``, ``nictype``; keys at
their default value are omitted). The name is the domain's current one, so a migrating
copy shows its ``--incoming`` / ``--migratedaway`` suffix. ``domid`` may be null (a
dry run); a domain whose configuration libxl cannot retrieve is left out by xl itself.

``xl list`` prints ``Name ID Mem VCPUs State Time(s)``; State is six flags ``rbpscd``
(running, blocked, paused, shutdown, crashed, dying), ``-`` when unset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from .names import DOM0_NAME, Phase, split_name
from .vifcall import guest_addresses


@dataclass(frozen=True)
class XlNic:
    devid: int
    mac: str
    ip: str  # as libxl keeps it: space-separated, maybe empty
    bridge: str | None
    script: str | None

    @property
    def addresses(self) -> tuple[IPv4Address, ...]:
        return guest_addresses(self.ip)


@dataclass(frozen=True)
class XlDomain:
    domid: int | None
    name: str  # as xl shows it, suffix included
    uuid: str | None
    type: str | None  # pv, pvh, hvm
    nics: tuple[XlNic, ...]

    @property
    def guest(self) -> str:
        return split_name(self.name)[0]

    @property
    def phase(self) -> Phase:
        return split_name(self.name)[1]

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(n.mac for n in self.nics if n.mac)

    @property
    def addresses(self) -> tuple[IPv4Address, ...]:
        return tuple(dict.fromkeys(a for n in self.nics for a in n.addresses))


@dataclass(frozen=True)
class XlState:
    name: str
    domid: int
    state: str  # the six rbpscd flags

    @property
    def paused(self) -> bool:
        return "p" in self.state

    @property
    def running(self) -> bool:
        """Executing (or blocked, waiting for work): not paused, shut down or dying."""
        return not any(flag in self.state for flag in "pscd")


def parse_list_long(text: str, source: str = "xl list -l") -> list[XlDomain]:
    """Guest domains (dom0 left out). Raises ``ValueError`` naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise ValueError(f"{source}: expected a JSON array of domains, got {type(doc).__name__}")
    domains = []
    for i, item in enumerate(doc):
        dom = _domain(item, f"{source}[{i}]")
        if dom.domid != 0 and dom.name != DOM0_NAME:
            domains.append(dom)
    return domains


def _domain(item: Any, where: str) -> XlDomain:
    if not isinstance(item, dict) or not isinstance(item.get("config"), dict):
        raise ValueError(f"{where}: expected an object with a config object")
    domid = item.get("domid")
    if domid is not None and (not isinstance(domid, int) or domid < 0):
        raise ValueError(f"{where}.domid: {domid!r} is not a domain id")
    config = item["config"]
    c_info = config.get("c_info")
    if not isinstance(c_info, dict):
        raise ValueError(f"{where}.config.c_info: missing")
    name = c_info.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.config.c_info.name: missing")
    nics = config.get("nics", [])
    if not isinstance(nics, list):
        raise ValueError(f"{where}.config.nics: expected a list")
    return XlDomain(domid, name, _opt_str(c_info.get("uuid")), _opt_str(c_info.get("type")),
                    tuple(_nic(n, f"{where}.config.nics[{j}]", j) for j, n in enumerate(nics)))


def _nic(item: Any, where: str, index: int) -> XlNic:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    devid = item.get("devid", index)
    if not isinstance(devid, int):
        raise ValueError(f"{where}.devid: {devid!r} is not a number")
    return XlNic(devid, str(item.get("mac") or "").lower(), str(item.get("ip") or ""),
                 _opt_str(item.get("bridge")), _opt_str(item.get("script")))


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_list(text: str, source: str = "xl list") -> list[XlState]:
    """The short listing: one row per domain after the header."""
    rows = []
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].split()[:2] == ["Name", "ID"]:
        raise ValueError(f"{source}: no 'Name ID Mem VCPUs State Time(s)' header")
    for n, line in enumerate(lines[1:], start=2):
        # the name may hold spaces: the five columns after it are fixed
        parts = line.rsplit(None, 5)
        if len(parts) != 6 or not parts[1].isdigit() or len(parts[4]) != 6:
            raise ValueError(f"{source}: line {n}: cannot read {line!r}")
        rows.append(XlState(parts[0], int(parts[1]), parts[4]))
    return rows
