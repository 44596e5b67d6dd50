"""The xl adapter's pure parts (xl migrate's lines, the name tracker) and its reading of
recorded ``xl`` / xenstore output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.hypervisor import EventKind, HookCall, HypervisorError, load_hypervisor
from orchestrator.xen.adapter import XenHypervisor
from orchestrator.xen.migrate import MigrateOptions, ProgressTracker, classify, migrate_argv
from orchestrator.xen.tools import Result, Tools
from orchestrator.xen.tracker import Tracker

DATA = Path(__file__).resolve().parents[1] / "data" / "xen"

# xl_migrate.c's lines, in the order a successful migration prints them (with libxc noise)
SUCCESS = """\
migration target: Ready to receive domain.
Saving to migration stream new xl format (info 0x3/0x0/1214)
Loading new save file <incoming migration stream> (new xl fmt info 0x3/0x0/1214)
 Savefile contains xl domain config in JSON format
Parsing config from <saved>
xc: info: Saving domain 5, type x86 PV
xc: info: Found x86 PV domain from Xen 4.17
xc: info: Restoring domain
xc: Frames: 0/32768    0%
xc: Frames: 16384/32768   50%
xc: Frames: 32768/32768  100%
migration target: Transfer complete, requesting permission to start domain.
migration sender: Target has acknowledged transfer.
migration sender: Giving target permission to start.
migration target: Got permission, starting domain.
migration target: Domain started successsfully.
migration sender: Target reports successful startup.
Migration successful.
"""
FAILURE = """\
migration target: Ready to receive domain.
migration target: Transfer complete, requesting permission to start domain.
migration sender: Target has acknowledged transfer.
migration sender: Giving target permission to start.
migration target: Got permission, starting domain.
migration target: Failure, destroying our copy.
migration sender: Target reports startup failure (status code 3).
migration target: Cleanup OK, granting sender permission to resume.
migration sender: Trying to resume at our end.
migration sender: Resumed OK.
Migration failed due to problems at target.
"""


def feed(text: str) -> tuple[ProgressTracker, list[tuple[str, float | None]]]:
    t = ProgressTracker()
    seen = []
    for line in text.splitlines():
        p = t.feed(line)
        if p is not None:
            seen.append((p.phase, p.fraction))
    return t, seen


def test_a_successful_migration_marks_each_phase_once_in_order() -> None:
    t, seen = feed(SUCCESS)
    assert [p for p, _ in seen] == ["starting", "memory", "memory", "memory", "paused",
                                    "resumed", "done"]
    assert [f for p, f in seen if p == "memory"] == [0.0, 0.5, 1.0]
    assert t.go_given and t.aborted is None


def test_a_failure_at_the_target_aborts_after_go() -> None:
    t, seen = feed(FAILURE)
    assert [p for p, _ in seen] == ["starting", "paused", "aborted"]
    assert t.go_given and t.aborted == "migration target: Failure, destroying our copy."
    assert t.tail[-1] == "Migration failed due to problems at target."


def test_a_failure_before_go_leaves_go_ungiven() -> None:
    t, seen = feed("migration target: Ready to receive domain.\n"
                   "migration sender: libxl_domain_suspend failed (rc=-3)\n"
                   "Migration failed, resuming at sender.\n")
    assert [p for p, _ in seen] == ["starting", "aborted"] and not t.go_given


def test_classify_ignores_noise_and_nonsense_percentages() -> None:
    assert classify("Parsing config from <saved>") is None
    assert classify("xc: Frames: 1/2  250%") is None
    assert classify("") is None


def test_migrate_argv_passes_the_operators_options() -> None:
    assert migrate_argv(["xl"], "g", "n2", MigrateOptions()) == ["xl", "migrate", "g", "n2"]
    opts = MigrateOptions(config="/etc/xen/g.cfg", pause=True, debug=True, ssh="ssh -p 2222",
                          extra=("-D",))
    assert migrate_argv(["/usr/sbin/xl", "-v"], "g", "h2", opts) == [
        "/usr/sbin/xl", "-v", "migrate", "-s", "ssh -p 2222", "-C", "/etc/xen/g.cfg", "-p",
        "--debug", "-D", "g", "h2"]
    assert migrate_argv(["xl"], "g", "cmd", MigrateOptions(ssh=""))[2:4] == ["-s", ""]


def test_tracker_sees_a_migration_arrive_resume_and_fail() -> None:
    t = Tracker()
    assert t.observe(3, "web") == []  # booted: its vif script says so
    assert t.observe(12, "guest1--incoming") == []
    assert t.waiting() == []
    assert t.observe(12, "guest1") == []  # renamed: asks whether it runs
    assert t.waiting() == [12]
    assert t.observe(12, "guest1", running=False) == []  # xl migrate -p: still paused
    (m,) = t.observe(12, "guest1", running=True)
    assert (m.kind, m.guest, m.domid) == (EventKind.RESUMED, "guest1", 12)
    assert t.observe(12, "guest1", running=True) == [] and t.waiting() == []
    assert t.observe(12, None) == []  # a later destroy is its vif script's to report
    assert t.observe(14, "guest1--incoming") == []
    (f,) = t.observe(14, None)
    assert (f.kind, f.guest) == (EventKind.FAILED, "guest1")
    assert t.observe(3, None) == [] and t.known() == set()


def test_tracker_renamed_and_destroyed_before_running_is_a_failure() -> None:
    t = Tracker()
    t.observe(7, "g--incoming")
    t.observe(7, "g")  # renamed, then unpause failed and it was destroyed
    (f,) = t.observe(7, None)
    assert f.kind is EventKind.FAILED


def test_a_domain_found_by_a_rescan_is_asked_whether_it_runs() -> None:
    t = Tracker()
    t.found(9, "guest1")
    t.found(10, "guest2--incoming")  # an arrival is tracked by its name already
    assert t.observe(9, "guest1") == [] and t.waiting() == [9]
    (m,) = t.observe(9, "guest1", running=True)
    assert (m.kind, m.guest) == (EventKind.RESUMED, "guest1")
    t.found(9, "guest1")  # known now: not asked again
    assert t.waiting() == []
    assert t.observe(10, "guest2--incoming") == [] and t.waiting() == []


def test_tracker_ignores_the_source_side() -> None:
    t = Tracker()
    for name in ("g", "g--migratedaway", "g", "g--migratedaway"):
        assert t.observe(5, name, running=True) == []
    assert t.observe(5, None) == []


@given(st.lists(st.tuples(st.integers(1, 3),
                          st.sampled_from([None, "g", "g--incoming", "g--migratedaway"]),
                          st.sampled_from([None, True, False])), max_size=30))
def test_tracker_reports_at_most_one_outcome_per_arrival(
        steps: list[tuple[int, str | None, bool | None]]) -> None:
    t = Tracker()
    arrivals, outcomes = 0, 0
    arriving: set[int] = set()
    for domid, name, running in steps:
        if name == "g--incoming" and domid not in arriving:
            arrivals += 1
            arriving.add(domid)
        ms = t.observe(domid, name, running)
        for m in ms:
            assert m.domid == domid and m.kind in (EventKind.RESUMED, EventKind.FAILED)
            arriving.discard(domid)
        outcomes += len(ms)
        if name is None:
            arriving.discard(domid)
    assert outcomes <= arrivals


@dataclass(frozen=True)
class Recorded(Tools):
    """Answers commands with recorded output."""

    answers: dict[str, str] = field(default_factory=dict)

    async def run(self, argv: Sequence[str]) -> Result:
        key = " ".join(argv[len(self.xl):] if list(argv[:len(self.xl)]) == list(self.xl)
                       else argv)
        if key not in self.answers:
            return Result(1, "", f"no recording for {key}")
        return Result(0, self.answers[key], "")


def adapter(answers: dict[str, str], **settings: object) -> XenHypervisor:
    hv = XenHypervisor(settings, "n2")
    object.__setattr__(hv, "tools", Recorded(answers=answers))
    return hv


def test_describe_and_running_from_xl_list_l() -> None:
    hv = adapter({"list -l": (DATA / "xl-list-l-running.json").read_text()})
    g = asyncio.run(hv.describe("guest1"))
    assert (g.name, g.node, g.running, g.uuid) == (
        "guest1", "n2", True, "039e9ee6-4a84-3055-4c81-8ba426ae2656")
    assert g.macs == ("52:54:00:00:02:01",) and g.addresses == (IPv4Address("10.5.5.201"),)
    assert [i.name for i in asyncio.run(hv.running())] == ["guest1", "web2"]
    with pytest.raises(HypervisorError, match="guest nope has no domain on n2"):
        asyncio.run(hv.describe("nope"))


def test_an_arriving_copy_is_here_but_not_running() -> None:
    hv = adapter({"list -l": (DATA / "xl-list-l-migrating-dst.json").read_text()})
    g = asyncio.run(hv.describe("guest1"))
    assert (g.node, g.running) == ("n2", False)
    assert asyncio.run(hv.running()) == []


def test_broken_xl_output_is_one_line() -> None:
    with pytest.raises(HypervisorError, match="xl list -l: not JSON"):
        asyncio.run(adapter({"list -l": "garbage"}).running())
    with pytest.raises(HypervisorError, match="xl list -l: no recording"):
        asyncio.run(adapter({}).running())


def test_parse_hook_reads_recorded_vif_calls_for_this_node() -> None:
    call = HookCall.from_dict(json.loads((DATA / "vif-online-incoming.call.json").read_text()))
    ev = adapter({}).parse_hook(call)
    assert ev is not None and (ev.kind, ev.node) == (EventKind.INCOMING, "n2")


def test_settings_are_checked_and_the_entry_point_resolves() -> None:
    assert load_hypervisor("xl") is XenHypervisor
    with pytest.raises(HypervisorError, match="unknown settings colour"):
        XenHypervisor({"colour": "red"}, "n1")
    hv = XenHypervisor({"xl": "/opt/xl -v", "hosts": {"n2": "h2"}, "pause": True}, "n1")
    assert hv.tools.xl == ("/opt/xl", "-v") and hv.options.pause and hv.hosts == {"n2": "h2"}
    with pytest.raises(HypervisorError, match="already runs on n1"):
        asyncio.run(hv.migrate("g", "n1", lambda p: None))
