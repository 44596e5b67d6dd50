"""The vif script's calls, as recorded, mean what libxl's order says (xen/vifcall.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.hypervisor import EventKind, HookCall
from orchestrator.xen.names import Phase, parse_vif, split_name, uuid_from_vm_path
from orchestrator.xen.vifcall import guest_addresses, parse_vif_call

DATA = Path(__file__).resolve().parents[1] / "data" / "xen"


def recorded(name: str) -> HookCall:
    return HookCall.from_dict(json.loads((DATA / f"vif-{name}.call.json").read_text()))


@pytest.mark.parametrize(("name", "kind", "domid"), [
    ("online-boot", EventKind.STARTED, 5),
    ("online-incoming", EventKind.INCOMING, 12),
    ("offline-migratedaway", EventKind.GONE, 5),
    ("offline-incoming", EventKind.FAILED, 12),
    ("offline-stopped", EventKind.STOPPED, 5),
])
def test_each_recorded_call_means_its_moment(name: str, kind: EventKind, domid: int) -> None:
    call = recorded(name)
    ev = parse_vif_call(call, "n2")
    assert ev is not None
    assert (ev.kind, ev.guest, ev.node, ev.origin) == (kind, "guest1", "n2", "hook:xen-vif")
    assert ev.macs == ("52:54:00:00:02:01",)
    assert ev.addresses == (IPv4Address("10.5.5.201"),)
    assert ev.uuid == "039e9ee6-4a84-3055-4c81-8ba426ae2656"
    assert (ev.at, ev.id) == (call.at, call.id)
    assert f"vif{domid}.0" in ev.detail and not ev.wants_verdict


def test_tap_twin_and_failed_online_mean_nothing() -> None:
    assert parse_vif_call(recorded("add-tap"), "n1") is None
    assert parse_vif_call(recorded("online-failed"), "n1") is None


def test_a_failed_offline_still_reports_the_domain_going() -> None:
    call = recorded("offline-migratedaway")
    failed = replace(call, extra={**call.extra, "status": "1"})
    ev = parse_vif_call(failed, "n1")
    assert ev is not None and ev.kind is EventKind.GONE and "status 1" in ev.detail


def test_online_for_a_copy_already_handed_over_is_not_an_event() -> None:
    call = recorded("online-boot")
    away = replace(call, extra={**call.extra, "name": "guest1--migratedaway"})
    assert parse_vif_call(away, "n1") is None


def test_type_if_mismatch_is_ignored_like_vif_common() -> None:
    call = recorded("online-boot")
    assert parse_vif_call(replace(call, argv=(call.argv[0], "online", "type_if=tap")), "n1") is None
    # no type_if at all: older libxl; vif-common.sh defaults to vif
    ev = parse_vif_call(replace(call, argv=(call.argv[0], "online")), "n1")
    assert ev is not None and ev.kind is EventKind.STARTED


@pytest.mark.parametrize(("change", "message"), [
    ({"hook": "libvirt-qemu"}, "not a xen-vif call"),
    ({"argv": ("/x", "plug", "type_if=vif")}, "unknown action 'plug'"),
    ({"argv": ("/x",)}, "unknown action ''"),
    ({"env": {"XENBUS_PATH": "backend/vif/5/0"}}, "no vif in the environment"),
    ({"env": {"vif": "eth0"}}, "not a libxl vif name"),
])
def test_calls_that_are_not_libxls_are_refused_in_one_line(change: dict[str, object],
                                                           message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_vif_call(replace(recorded("online-boot"), **change), "n1")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_unreadable_xenstore_and_bad_status_are_refused() -> None:
    call = recorded("online-boot")
    with pytest.raises(ValueError, match="without a domain name"):
        parse_vif_call(replace(call, extra={**call.extra, "name": ""}), "n1")
    with pytest.raises(ValueError, match="status 'x' is not a number"):
        parse_vif_call(replace(call, extra={**call.extra, "status": "x"}), "n1")


def test_a_call_without_mac_or_ip_still_names_the_guest() -> None:
    call = recorded("online-boot")
    ev = parse_vif_call(replace(call, extra={"status": "0", "name": "g"}), "n1")
    assert ev is not None and (ev.guest, ev.macs, ev.addresses, ev.uuid) == ("g", (), (), None)


def test_guest_addresses_keep_ipv4_hosts_only() -> None:
    assert guest_addresses("10.0.0.1 2000:abcd::1 10.5.5.0/24 10.0.0.2/32 junk 10.0.0.1") == (
        IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"))
    assert guest_addresses("") == ()


def test_names() -> None:
    assert split_name("g--incoming") == ("g", Phase.INCOMING)
    assert split_name("g--migratedaway") == ("g", Phase.AWAY)
    assert split_name("--incoming") == ("--incoming", Phase.NONE)
    assert split_name("a--incoming--migratedaway") == ("a--incoming", Phase.AWAY)
    assert parse_vif("vif12.3") == (12, 3)
    for bad in ("vif12", "vif.0", "vifx.0", "vif1.0-emu", "tap1.0"):
        with pytest.raises(ValueError):
            parse_vif(bad)
    assert uuid_from_vm_path("/vm/abc") == "abc"
    assert uuid_from_vm_path("") is None and uuid_from_vm_path("/vm/") is None


names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@given(names, st.sampled_from(["", "--incoming", "--migratedaway"]))
def test_split_name_inverts_libxls_suffixing(guest: str, suffix: str) -> None:
    name, phase = split_name(guest + suffix)
    if suffix:
        assert name == guest and phase.value == suffix[2:]
    else:
        assert name + {Phase.INCOMING: "--incoming", Phase.AWAY: "--migratedaway",
                       Phase.NONE: ""}[phase] == guest


@given(st.sampled_from(["online", "offline", "add", "remove"]),
       st.sampled_from(["vif", "tap", "other"]), names, st.integers(0, 3),
       st.dictionaries(st.sampled_from(["mac", "ip", "vm", "bridge"]), st.text(max_size=30)))
def test_any_well_formed_call_parses_or_is_refused_in_one_line(
        action: str, type_if: str, name: str, status: int, extra: dict[str, str]) -> None:
    call = HookCall("xen-vif", ("/s", action, f"type_if={type_if}"), {"vif": "vif3.1"},
                    extra={**extra, "name": name, "status": str(status)})
    try:
        ev = parse_vif_call(call, "n1")
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    if ev is not None:
        assert ev.guest and ev.node == "n1"
        assert (action, type_if) in {("online", "vif"), ("offline", "vif")}
