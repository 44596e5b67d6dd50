"""The libvirt adapter's reading of hooks and events, driven by what a real libvirt 9.0
said during real migrations (tests/data/libvirt, recorded by its record.py)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.hypervisor import EventKind, GuestEvent, HookCall
from orchestrator.kvm.domxml import parse_domain
from orchestrator.kvm.events import (
    HOOK,
    Lifecycle,
    Resumed,
    Started,
    Stopped,
    from_lifecycle,
    lifecycle_kind,
    lifecycle_name,
    parse_hook,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "libvirt"
HOOK_PATH = "/etc/libvirt/hooks/qemu.d/convergent"
IN, RE, GO, FA, ST, SP = (EventKind.INCOMING, EventKind.RESUMED, EventKind.GONE,
                          EventKind.FAILED, EventKind.STARTED, EventKind.STOPPED)


def recording(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def as_call(r: dict[str, Any]) -> HookCall:
    return HookCall(HOOK, (HOOK_PATH, *r["argv"]), r["env"], r["stdin"], at=r["t"],
                    id=f"call-{r['t']}")


def replay(name: str) -> list[tuple[str, str, EventKind]]:
    """(node, origin, kind) of every record that means something, in recorded order."""
    out = []
    for r in recording(name):
        ev: GuestEvent | None = None
        if r["source"] == "hook":
            ev = parse_hook(as_call(r), r["node"])
        elif r["event"] == "lifecycle":
            ev = from_lifecycle(r["node"], r["domain"], r["type"], r["detail"], r["t"])
        if ev is not None:
            assert ev.node == r["node"] and ev.guest == "guest1" and ev.at == r["t"]
            out.append((r["node"], ev.origin.split(":")[0], ev.kind))
    return out


def test_boot_is_started_from_hook_and_event() -> None:
    assert replay("start") == [("n1", "hook", ST), ("n1", "event", ST)]


@pytest.mark.parametrize("name, src, dst", [("migrate", "n1", "n2"),
                                            ("migrate-p2p", "n2", "n3")])
def test_a_live_migration_reads_incoming_resumed_on_d_then_gone_on_s(
        name: str, src: str, dst: str) -> None:
    assert replay(name) == [
        (dst, "hook", IN), (dst, "hook", ST), (dst, "event", IN),  # before the memory copy
        (dst, "event", RE),  # the guest runs on D: the cutover
        (src, "hook", SP),  # S's hook cannot tell this from a destroy...
        (src, "event", GO),  # ...the event can
    ]


def test_post_copy_cuts_over_when_post_copy_starts() -> None:
    seq = replay("postcopy")
    resumes = [r for r in recording("postcopy") if r.get("type") == Lifecycle.RESUMED]
    assert [r["detail"] for r in resumes] == [Resumed.POSTCOPY, Resumed.MIGRATED]
    assert seq == [("n1", "hook", IN), ("n1", "hook", ST), ("n1", "event", IN),
                   ("n1", "event", RE), ("n1", "event", RE),  # the second is a repeat
                   ("n3", "hook", SP), ("n3", "event", GO)]
    first = next(from_lifecycle("n1", "guest1", r["type"], r["detail"], r["t"])
                 for r in resumes)
    assert first is not None and first.detail == "RESUMED/POSTCOPY"


def test_an_aborted_migration_fails_on_d_and_leaves_s_silent() -> None:
    assert replay("abort") == [("n2", "hook", IN), ("n2", "hook", ST), ("n2", "event", IN),
                               ("n2", "hook", SP), ("n2", "event", FA)]


def test_a_vetoed_migration_is_one_incoming_that_wants_a_verdict() -> None:
    (r,) = recording("veto")
    ev = parse_hook(as_call(r), "n2")
    assert ev is not None and ev.kind is IN and ev.wants_verdict
    assert ev.macs == ("52:54:00:00:02:01",) and ev.uuid
    assert ev.origin == "hook:libvirt-qemu" and ev.detail == "migrate begin"


def test_libvirtd_restart_and_destroy() -> None:
    assert replay("restart") == []  # reconnect: the adapter reconciles instead
    assert replay("destroy") == [("n1", "hook", SP), ("n1", "event", SP)]


def test_only_migrate_begin_wants_a_verdict() -> None:
    for name in ("start", "migrate", "migrate-p2p", "postcopy", "abort", "destroy"):
        for r in recording(name):
            if r["source"] == "hook":
                ev = parse_hook(as_call(r), r["node"])
                assert ev is None or ev.wants_verdict == (r["argv"][1] == "migrate")


def test_the_source_stopped_end_xml_is_the_same_after_migrating_and_destroying() -> None:
    """LIBVIRT-XEN.md's finding, on this recording: only the event tells them apart."""
    def stopped_xml(name: str) -> str:
        return next(r["stdin"] for r in recording(name)
                    if r["source"] == "hook" and r["argv"][1:3] == ["stopped", "end"])
    assert stopped_xml("migrate") == stopped_xml("destroy")  # both on n1, byte for byte


def test_metadata_addresses_come_through_the_hook() -> None:
    calls = [r for r in recording("metadata-start") if r["source"] == "hook"]
    for r in calls:
        assert parse_domain(r["stdin"]).addresses == (IPv4Address("10.5.5.201"),)
    ev = parse_hook(as_call(next(r for r in calls if r["argv"][1] == "started")), "n2")
    assert ev is not None and ev.kind is ST and ev.addresses == (IPv4Address("10.5.5.201"),)


def test_hook_environment_is_only_what_libvirt_passes() -> None:
    for name in ("start", "migrate", "abort"):
        for r in recording(name):
            if r["source"] == "hook":
                assert set(r["env"]) == {"LC_ALL", "PATH", "HOME"}


@pytest.mark.parametrize("argv, message", [
    ((HOOK_PATH, "guest1", "migrate"), "expected NAME OP SUBOP EXTRA"),
    ((HOOK_PATH, "guest1", "explode", "begin", "-"), "unknown operation"),
    ((HOOK_PATH, "guest1", "started", "sideways", "-"), "unknown operation"),
])
def test_calls_that_are_not_libvirts_say_why(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hook(HookCall(HOOK, argv, stdin="<domain><name>guest1</name></domain>"), "n1")


def test_bad_xml_and_a_name_mismatch_are_refused() -> None:
    r = recording("veto")[0]
    bad = HookCall(HOOK, (HOOK_PATH, *r["argv"]), stdin="<domain><name>guest1")
    with pytest.raises(ValueError, match="does not parse"):
        parse_hook(bad, "n2")
    other = HookCall(HOOK, (HOOK_PATH, "guest2", "migrate", "begin", "-"), stdin=r["stdin"])
    with pytest.raises(ValueError, match="argv names 'guest2' but the domain XML 'guest1'"):
        parse_hook(other, "n2")


def test_calls_convergent_ignores_need_no_xml() -> None:
    for op, sub in (("prepare", "begin"), ("start", "begin"), ("release", "end"),
                    ("reconnect", "begin"), ("restore", "begin"), ("attach", "begin")):
        assert parse_hook(HookCall(HOOK, (HOOK_PATH, "g", op, sub, "-")), "n1") is None


@given(st.integers(-2, 12), st.integers(-2, 12))
def test_every_lifecycle_pair_maps_to_one_kind_or_nothing(event: int, detail: int) -> None:
    kind = lifecycle_kind(event, detail)
    ev = from_lifecycle("n1", "g", event, detail, 1.0)
    assert (ev is None) == (kind is None)
    if ev is not None:
        assert ev.kind is kind and not ev.wants_verdict and ev.origin == "event:libvirt"
    assert lifecycle_name(event, detail)


def test_the_kinds_convergent_acts_on() -> None:
    assert lifecycle_kind(Lifecycle.RESUMED, Resumed.UNPAUSED) is None  # an unpause
    assert lifecycle_kind(Lifecycle.RESUMED, Resumed.POSTCOPY_FAILED) is None
    assert lifecycle_kind(Lifecycle.STARTED, Started.MIGRATED) is IN
    assert lifecycle_kind(Lifecycle.STOPPED, Stopped.MIGRATED) is GO
    assert lifecycle_kind(Lifecycle.STOPPED, Stopped.FAILED) is FA
    assert lifecycle_kind(Lifecycle.SUSPENDED, 7) is None  # ST in post-copy: not yet gone


def test_enums_are_libvirts_own_values() -> None:
    """The pure module mirrors libvirt's constants; held to libvirt-python here."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python (extra kvm) not installed")
    for enum, prefix in ((Lifecycle, "VIR_DOMAIN_EVENT_"), (Started, "VIR_DOMAIN_EVENT_STARTED_"),
                         (Resumed, "VIR_DOMAIN_EVENT_RESUMED_"),
                         (Stopped, "VIR_DOMAIN_EVENT_STOPPED_")):
        for member in enum:
            assert getattr(libvirt, prefix + member.name) == member.value, member
