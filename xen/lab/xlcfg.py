"""Guest configuration files (xl.cfg(5)) and libxl's stored configuration (pure), for the
stand-in ``xl``.

The subset the lab needs: ``name``, ``uuid``, ``type``, ``memory``, ``vcpus`` and ``vif``
(a list of ``key=value,...`` specs: ``mac``, ``bridge``, ``ip``, ``script``, ``vifname``,
``mtu``, ``gatewaydev``); every other key is accepted and ignored, as xl ignores keys it
does not use. Values are Python-like literals (quoted strings, integers, lists), one
setting per line (a list may span lines); ``#`` starts a comment.
"""

from __future__ import annotations

import ast
import uuid as uuidlib
from typing import Any

from .libxl import MTU_DEFAULT, Domain, Nic


class ConfigError(ValueError):
    pass


def parse_cfg(text: str, source: str = "<config>") -> Domain:
    settings = _settings(text, source)
    name = settings.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: no name")
    vifs = settings.get("vif", [])
    if not isinstance(vifs, list) or not all(isinstance(v, str) for v in vifs):
        raise ConfigError(f"{source}: vif must be a list of strings")
    uuid = settings.get("uuid") or str(uuidlib.uuid4())  # libxl makes one up too
    return Domain(name=name, uuid=str(uuid), type=str(settings.get("type", "pv")),
                  memory_mb=_int(settings.get("memory", 128), "memory", source),
                  vcpus=_int(settings.get("vcpus", 1), "vcpus", source),
                  nics=tuple(parse_vif_spec(v, i, source) for i, v in enumerate(vifs)))


def parse_vif_spec(spec: str, devid: int, source: str = "<config>") -> Nic:
    """``mac=52:54:00:00:02:01,bridge=guestbr0,ip=10.5.5.201,script=convergent-vif``"""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"{source}: vif {devid}: {part.strip()!r} is not key=value")
        fields[key.strip()] = value.strip()
    if "mac" not in fields:
        raise ConfigError(f"{source}: vif {devid}: no mac (the lab needs fixed MACs)")
    return Nic(devid=devid, mac=fields["mac"].lower(), bridge=fields.get("bridge", "xenbr0"),
               ip=fields.get("ip") or None, script=fields.get("script", "vif-bridge"),
               mtu=_int(fields.get("mtu", MTU_DEFAULT), "mtu", source),
               vifname=fields.get("vifname") or None,
               gatewaydev=fields.get("gatewaydev") or None)


def _settings(text: str, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, stmt in _statements(text):
        key, sep, value = stmt.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{source}:{n}: expected KEY = VALUE, got {stmt.strip()!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"{source}:{n}: {key}: cannot read {value.strip()!r}") from None
    return out


def _statements(text: str) -> list[tuple[int, str]]:
    """Statements with their first line number; a list may span lines."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw)
        if not buf:
            if not line.strip():
                continue
            start = n
        buf += line + "\n"
        if buf.count("[") <= buf.count("]"):
            out.append((start, buf))
            buf = ""
    if buf.strip():
        out.append((start, buf))
    return out


def _strip_comment(line: str) -> str:
    quote = ""
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "#":
            return line[:i]
    return line


def _int(value: Any, key: str, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key}: {value!r} is not a number") from None


def to_json(dom: Domain) -> dict[str, Any]:
    """libxl_domain_config as libxl's JSON generator writes it (defaults left out)."""
    nics = []
    for nic in dom.nics:
        d: dict[str, Any] = {"devid": nic.devid}
        if nic.mtu != MTU_DEFAULT:
            d["mtu"] = nic.mtu
        d["mac"] = nic.mac
        if nic.ip:
            d["ip"] = nic.ip
        d["bridge"] = nic.bridge
        if nic.vifname:
            d["ifname"] = nic.vifname
        d["script"] = nic.script
        d["nictype"] = "vif"
        if nic.gatewaydev:
            d["gatewaydev"] = nic.gatewaydev
        nics.append(d)
    return {"c_info": {"type": dom.type, "name": dom.name, "uuid": dom.uuid},
            "b_info": {"max_vcpus": dom.vcpus, "avail_vcpus": list(range(dom.vcpus)),
                       "max_memkb": dom.memory_mb * 1024,
                       "target_memkb": dom.memory_mb * 1024},
            "nics": nics, "on_reboot": "restart"}


def from_json(doc: dict[str, Any]) -> Domain:
    c, b = doc["c_info"], doc.get("b_info", {})
    nics = tuple(Nic(devid=n["devid"], mac=n["mac"], bridge=n.get("bridge", "xenbr0"),
                     ip=n.get("ip"), script=n.get("script", "vif-bridge"),
                     mtu=n.get("mtu", MTU_DEFAULT), vifname=n.get("ifname"),
                     gatewaydev=n.get("gatewaydev"))
                 for n in doc.get("nics", []))
    return Domain(name=c["name"], uuid=c["uuid"], type=c.get("type", "pv"),
                  memory_mb=int(b.get("max_memkb", 131072)) // 1024,
                  vcpus=int(b.get("max_vcpus", 1)), nics=nics)
