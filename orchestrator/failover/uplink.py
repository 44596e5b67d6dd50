"""A node's own uplink address as the operator configured it, kept across a fence.

A fenced node takes its own public address off its uplink. With it the kernel drops every
route the address carried: its connected route, and (the last address on the device) the
default route and every other route through the uplink. A failback must give the node back
exactly that, not a bare ``/32``. So the shape (prefix length, broadcast, scope, and the
routes through the uplink that the kernel does not re-create by itself) is read from the
kernel before the address goes, and kept in the agent's state dir: an agent restarted while
fenced (a rebooted node) still knows it. Routes are kept by device *name*, as ``ip -j``
prints them, not as ``ip route save``'s binary dump (which names the device by ifindex, and
a reboot may renumber it).

The parsing and the ``ip`` argument lists are pure; ``read_shape``/``load``/``save`` do I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from orchestrator.statefile import write_atomic

log = structlog.get_logger("convergent.failover")

# what ``ip -j route`` prints and ``ip route add`` takes back, in that order
_WORDS = (("gateway", "via"), ("table", "table"), ("protocol", "proto"), ("scope", "scope"),
          ("metric", "metric"), ("prefsrc", "src"))
_DEFAULTS = {"table": "main", "scope": "global", "type": "unicast"}


@dataclass(frozen=True)
class UplinkShape:
    """The own address's attributes and the routes that go with it."""

    ip: str
    prefixlen: int = 32
    broadcast: str | None = None
    scope: str = "global"
    routes: tuple[Mapping[str, Any], ...] = field(default=())  # as ``ip -j route`` prints

    def address_argv(self, dev: str) -> list[str]:
        """``ip`` arguments that put the address back as it was."""
        argv = ["addr", "add", f"{self.ip}/{self.prefixlen}"]
        if self.broadcast:
            argv += ["brd", self.broadcast]
        if self.scope != "global":
            argv += ["scope", self.scope]
        return [*argv, "dev", dev]

    def route_argvs(self, dev: str) -> list[list[str]]:
        """``ip`` arguments for each kept route: the ones without a gateway first (a
        gateway must be reachable when its route goes in)."""
        ordered = sorted(self.routes, key=lambda r: "gateway" in r)
        return [route_argv(r, dev) for r in ordered]

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "prefixlen": self.prefixlen, "broadcast": self.broadcast,
                "scope": self.scope, "routes": [dict(r) for r in self.routes]}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> UplinkShape:
        return cls(str(raw["ip"]), int(raw.get("prefixlen", 32)), raw.get("broadcast"),
                   str(raw.get("scope", "global")),
                   tuple(dict(r) for r in raw.get("routes", [])))


def shape_of(ip: str, addr_info: Iterable[Mapping[str, Any]],
             routes: Iterable[Mapping[str, Any]]) -> UplinkShape | None:
    """From ``ip -j addr show dev X``'s ``addr_info`` and ``ip -j -4 route show table all
    dev X``: ``ip``'s shape (None: not on the device)."""
    for a in addr_info:
        if a.get("family") == "inet" and a.get("local") == ip:
            kept = tuple(r for r in routes if r.get("protocol") != "kernel")
            return UplinkShape(ip, int(a.get("prefixlen", 32)), a.get("broadcast"),
                               str(a.get("scope", "global")), kept)
    return None


def route_argv(route: Mapping[str, Any], dev: str) -> list[str]:
    """``ip route add`` arguments for one route as ``ip -j route`` printed it."""
    argv = ["route", "add"]
    if route.get("type", "unicast") != "unicast":
        argv.append(str(route["type"]))
    argv.append(str(route["dst"]))
    argv += ["dev", dev]
    for key, word in _WORDS:
        value = route.get(key)
        if value is not None and value != _DEFAULTS.get(key):
            argv += [word, str(value)]
    for metrics in route.get("metrics", []):
        for key, value in dict(metrics).items():
            if isinstance(value, int):  # a locked metric prints as an object: left as is
                argv += [key, str(value)]
    if "onlink" in route.get("flags", []):
        argv.append("onlink")
    return argv


def read_shape(ip: str, dev: str, run: Callable[..., str]) -> UplinkShape | None:
    """``run(*ip_args)``: ``ip``'s output in the node's namespace."""
    links = json.loads(run("-j", "addr", "show", "dev", dev) or "[]")
    info = [a for link in links for a in link.get("addr_info", [])]
    routes = json.loads(run("-4", "-j", "route", "show", "table", "all", "dev", dev) or "[]")
    return shape_of(ip, info, routes)


def load(path: Path | None) -> UplinkShape | None:
    """What a previous life saved (None: nothing, or a file we cannot read: then we know
    no more than a first start does, and say so)."""
    if path is None:
        return None
    try:
        return UplinkShape.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("failover.uplink_shape_unreadable", path=str(path), error=str(exc))
        return None


def save(path: Path | None, shape: UplinkShape) -> None:
    if path is not None:
        write_atomic(path, json.dumps(shape.to_json(), sort_keys=True))
