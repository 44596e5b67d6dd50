"""The stand-ins' pure parts: xl.cfg, libxl's stored config, libxl's xenstore writes and
hotplug call (xen/lab/xlcfg.py, xen/lab/libxl.py)."""

from __future__ import annotations

import pytest

from orchestrator.xen.lab.libxl import (
    Domain,
    Nic,
    domain_make_writes,
    hotplug_argv,
    hotplug_env,
    nic_add_writes,
    nic_paths,
    nic_remove_writes,
    rename_writes,
)
from orchestrator.xen.lab.xlcfg import ConfigError, from_json, parse_cfg, to_json

CFG = """\
# guest1
name = "guest1"   # its name
uuid = '039e9ee6-4a84-3055-4c81-8ba426ae2656'
memory = 256
vcpus = 2
kernel = "/boot/vmlinuz"  # ignored, as xl ignores what it does not use
vif = [ 'mac=52:54:00:00:02:01,bridge=guestbr0,ip=10.5.5.201,script=convergent-vif',
        "mac=52:54:00:00:02:02, bridge=xenbr0, mtu=9000, vifname=g1pub",
      ]
"""


def test_xl_cfg_subset() -> None:
    dom = parse_cfg(CFG)
    assert (dom.name, dom.uuid, dom.memory_mb, dom.vcpus) == (
        "guest1", "039e9ee6-4a84-3055-4c81-8ba426ae2656", 256, 2)
    a, b = dom.nics
    assert (a.devid, a.mac, a.bridge, a.ip, a.script) == (
        0, "52:54:00:00:02:01", "guestbr0", "10.5.5.201", "convergent-vif")
    assert (b.devid, b.bridge, b.mtu, b.vifname, b.script, b.ip) == (
        1, "xenbr0", 9000, "g1pub", "vif-bridge", None)
    assert from_json(to_json(dom)) == dom


@pytest.mark.parametrize(("text", "message"), [
    ("memory = 1\n", "no name"),
    ('name = "g"\nvif = "mac=1"\n', "vif must be a list"),
    ('name = "g"\nvif = [ "bridge=x" ]\n', "no mac"),
    ('name = "g"\nvif = [ "mac" ]\n', "is not key=value"),
    ('name = "g"\nmemory = "lots"\n', "memory: 'lots' is not a number"),
    ('name = "g"\nthis is not\n', ":2: expected KEY = VALUE"),
    ('name = "g"\nvif = [ "a" \n', ":2: vif: cannot read"),
])
def test_bad_configs_name_the_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cfg(text, "g.cfg")


def test_stored_config_leaves_defaults_out_like_libxl() -> None:
    doc = to_json(parse_cfg(CFG))
    assert "mtu" not in doc["nics"][0] and doc["nics"][1]["mtu"] == 9000
    assert "ip" not in doc["nics"][1] and doc["nics"][1]["ifname"] == "g1pub"
    assert doc["c_info"]["name"] == "guest1" and doc["b_info"]["max_memkb"] == 256 * 1024


def test_libxl_writes_frontend_before_backend_and_waits_for_the_script() -> None:
    nic = Nic(0, "52:54:00:00:02:01", "guestbr0", "10.5.5.201", "convergent-vif")
    writes = nic_add_writes(5, nic, "/etc/xen/scripts")
    paths = [p for p, _ in writes]
    be = "/local/domain/0/backend/vif/5/0"
    assert paths.index("/local/domain/5/device/vif/0/backend") < paths.index(f"{be}/frontend")
    values = dict(writes)
    assert values[f"{be}/script"] == "/etc/xen/scripts/convergent-vif"
    assert values[f"{be}/hotplug-status"] == "" and paths[-1] == f"{be}/hotplug-status"
    assert (values[f"{be}/mac"], values[f"{be}/ip"], values[f"{be}/bridge"]) == (
        "52:54:00:00:02:01", "10.5.5.201", "guestbr0")
    assert f"{be}/mtu" not in values and values["/local/domain/5/device/vif/0/mtu"] == "1500"
    assert values[f"{be}/state"] == "1" and values[f"{be}/online"] == "1"
    assert dict(nic_remove_writes(5, 0)) == {f"{be}/online": "0", f"{be}/state": "5"}
    assert be in nic_paths(5, 0)


def test_domain_home_name_and_rename() -> None:
    dom = Domain("guest1--incoming", "u-1")
    values = dict(domain_make_writes(12, dom))
    assert values["/local/domain/12/name"] == "guest1--incoming"
    assert values["/local/domain/12/vm"] == "/vm/u-1" and values["/vm/u-1/name"] == dom.name
    assert dict(rename_writes(12, "u-1", "guest1")) == {"/local/domain/12/name": "guest1",
                                                        "/vm/u-1/name": "guest1"}


def test_the_hotplug_call_is_libxls() -> None:
    s = "/etc/xen/scripts/convergent-vif"
    assert hotplug_argv(s, "add") == [s, "online", "type_if=vif"]
    assert hotplug_argv(s, "remove") == [s, "offline", "type_if=vif"]
    assert hotplug_env(s, 5, 1) == {"script": s, "XENBUS_TYPE": "vif",
                                    "XENBUS_PATH": "backend/vif/5/1",
                                    "XENBUS_BASE_PATH": "backend", "netdev": "",
                                    "vif": "vif5.1"}
