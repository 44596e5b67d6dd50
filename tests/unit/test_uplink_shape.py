"""The own uplink address's shape, pure: read from ``ip -j`` output (recorded from a real
kernel: tests/functional/test_failover_adopt.py holds the round trip), given back as
``ip`` arguments, kept as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.failover.uplink import UplinkShape, load, route_argv, save, shape_of

IP = "192.168.122.13"
ADDR_INFO = [{"family": "inet", "local": IP, "prefixlen": 24, "scope": "global",
              "label": "xenbr0", "valid_life_time": 4294967295},
             {"family": "inet", "local": "192.168.122.11", "prefixlen": 32}]
ROUTES = [  # ip -4 -j route show table all dev xenbr0, from a real kernel
    {"dst": "default", "gateway": "192.168.122.1", "flags": []},
    {"dst": "10.99.0.0/16", "gateway": "192.168.122.1", "metric": 50, "flags": [],
     "metrics": [{"mtu": 1400}]},
    {"dst": "192.168.122.0/24", "protocol": "kernel", "scope": "link", "prefsrc": IP,
     "flags": []},
    {"dst": "198.51.100.0/24", "protocol": "static", "scope": "link", "prefsrc": IP,
     "flags": []},
    {"type": "local", "dst": IP, "table": "local", "protocol": "kernel", "scope": "host",
     "prefsrc": IP, "flags": []},
]


def test_shape_keeps_prefix_and_the_routes_the_kernel_does_not_remake() -> None:
    shape = shape_of(IP, ADDR_INFO, ROUTES)
    assert shape is not None and shape.prefixlen == 24 and shape.scope == "global"
    assert [r["dst"] for r in shape.routes] == ["default", "10.99.0.0/16", "198.51.100.0/24"]
    assert shape.address_argv("xenbr0") == ["addr", "add", f"{IP}/24", "dev", "xenbr0"]
    assert shape_of("192.168.122.99", ADDR_INFO, ROUTES) is None


def test_routes_become_ip_arguments_link_routes_first() -> None:
    shape = shape_of(IP, ADDR_INFO, ROUTES)
    assert shape is not None
    assert shape.route_argvs("xenbr0") == [
        ["route", "add", "198.51.100.0/24", "dev", "xenbr0", "proto", "static",
         "scope", "link", "src", IP],
        ["route", "add", "default", "dev", "xenbr0", "via", "192.168.122.1"],
        ["route", "add", "10.99.0.0/16", "dev", "xenbr0", "via", "192.168.122.1",
         "metric", "50", "mtu", "1400"],
    ]


def test_route_arguments_carry_type_table_and_onlink() -> None:
    r = {"type": "local", "dst": "203.0.113.7", "table": "100", "protocol": "static",
         "flags": ["onlink"], "metrics": [{"mtu": {"lock": True}}]}
    assert route_argv(r, "up0") == ["route", "add", "local", "203.0.113.7", "dev", "up0",
                                    "table", "100", "proto", "static", "onlink"]


def test_shape_survives_the_state_file(tmp_path: Path) -> None:
    shape = shape_of(IP, ADDR_INFO, ROUTES)
    assert shape is not None
    path = tmp_path / "state" / "uplink-n3.json"
    save(path, shape)
    assert load(path) == UplinkShape.from_json(json.loads(path.read_text())) == shape
    assert path.stat().st_mode & 0o777 == 0o600
    assert load(tmp_path / "none.json") is None and load(None) is None
    path.write_text("{not json")
    assert load(path) is None  # unreadable: as a first start, said in the log
