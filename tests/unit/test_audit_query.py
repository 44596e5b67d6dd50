"""Filters, time parsing, merging several nodes' logs, the timeline, and follow."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.audit import AuditError, AuditLog, follow
from orchestrator.audit.files import Chain, chain_files, discover
from orchestrator.audit.follow import Follower
from orchestrator.audit.query import Filter, Scanner, parse_ip, parse_when
from orchestrator.audit.record import normalize_event
from orchestrator.audit.render import table_row, timeline
from orchestrator.audit.writer import bulk_append


def at(minute: int, second: float = 0) -> str:
    return f"2024-05-01T03:{minute:02d}:{second:09.6f}Z"


def event(time: str, node: str, action: str, **fields: Any) -> dict[str, Any]:
    outcome = fields.pop("outcome", "ok")
    base = {"time": time, "node": node, "actor": "agent", "action": action, "outcome": outcome}
    return normalize_event({**base, **fields})


@pytest.fixture
def two_nodes(tmp_path: Path) -> list[Chain]:
    (tmp_path / "n1").mkdir()
    bulk_append(
        tmp_path / "n1" / "audit.log",
        [
            event(at(0), "n1", "guest.start", guest="web1", addresses=["10.5.5.201"]),
            event(at(10), "n1", "migration.prepare", guest="web1", migration="m-1",
                  from_node="n1", to_node="n2", epoch=3, duration_ms=15),
            event(at(10, 1.5), "n1", "migration.precopy", guest="web1", migration="m-1",
                  duration_ms=1400),
            event(at(10, 3), "n1", "migration.cutover", guest="web1", migration="m-1",
                  entries=1234, addresses=["10.5.5.201"], duration_ms=40),
            event(at(20), "n1", "ruleset.apply", entries=55),
        ],
    )  # fmt: skip
    (tmp_path / "n2").mkdir()
    bulk_append(
        tmp_path / "n2" / "audit.log",
        [
            event(at(5), "n2", "guest.start", guest="db1", addresses=["10.5.6.7"]),
            event(at(10, 2), "n2", "ownership.claim", guest="web1", migration="m-1",
                  addresses=["10.5.5.201"], epoch=4),
            event(at(10, 4), "n2", "migration.finalize", guest="web1", migration="m-1"),
            event(at(30), "n2", "hook.veto", guest="db1", outcome="refused", detail="pinned"),
        ],
    )  # fmt: skip
    return discover([tmp_path])


def actions(chains: list[Chain], **criteria: Any) -> list[str]:
    return [f"{r.node}:{r.record['action']}" for r in Scanner(Filter(**criteria)).merged(chains)]


def test_merge_is_time_ordered_across_nodes(two_nodes: list[Chain]) -> None:
    assert actions(two_nodes) == [
        "n1:guest.start", "n2:guest.start", "n1:migration.prepare", "n1:migration.precopy",
        "n2:ownership.claim", "n1:migration.cutover", "n2:migration.finalize",
        "n1:ruleset.apply", "n2:hook.veto",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ({"guest": "db1"}, ["n2:guest.start", "n2:hook.veto"]),
        ({"node": "n2", "actions": ("guest",)}, ["n2:guest.start"]),
        ({"actions": ("migration",)}, ["n1:migration.prepare", "n1:migration.precopy",
                                       "n1:migration.cutover", "n2:migration.finalize"]),
        ({"actions": ("migration.cutover", "ownership")},
         ["n2:ownership.claim", "n1:migration.cutover"]),
        ({"actions": ("migr",)}, []),  # prefixes stop at dots
        ({"ip": parse_ip("10.5.5.201")},
         ["n1:guest.start", "n2:ownership.claim", "n1:migration.cutover"]),
        ({"ip": parse_ip("10.5.0.0/16"), "node": "n2"}, ["n2:guest.start", "n2:ownership.claim"]),
        ({"since": at(10, 2), "until": at(20)},
         ["n2:ownership.claim", "n1:migration.cutover", "n2:migration.finalize",
          "n1:ruleset.apply"]),
        ({"migration": "m-1", "node": "n2"}, ["n2:ownership.claim", "n2:migration.finalize"]),
        ({"guest": "web"}, []),  # exact, not substring
    ],
)  # fmt: skip
def test_filters(two_nodes: list[Chain], criteria: dict[str, Any], expected: list[str]) -> None:
    assert actions(two_nodes, **criteria) == expected


def test_prefilter_never_rejects_a_match(two_nodes: list[Chain]) -> None:
    flt = Filter(guest="web1", actions=("migration",), ip=parse_ip("10.5.5.201"))
    for chain in two_nodes:
        for path in chain.files:
            for raw in path.read_bytes().splitlines():
                if flt.match(json.loads(raw)):
                    assert flt.match_raw(raw)


@given(detail=st.text(max_size=40), guest=st.sampled_from(["web1", 'we"b1', "wéb\n1"]))
def test_prefilter_agrees_with_exact_match_on_odd_strings(detail: str, guest: str) -> None:
    from orchestrator.audit.record import encode

    record = {"seq": 1, "prev": "genesis", **event(at(1), "n1", "guest.start", guest=guest,
                                                    detail=detail)}  # fmt: skip
    raw = encode(record)
    for wanted in (guest, "web1"):
        flt = Filter(guest=wanted)
        if flt.match(json.loads(raw)):
            assert flt.match_raw(raw)


def test_time_filter_skips_whole_rotated_files(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=1500)
    for i in range(60):
        log.record("sync.resync", entries=i)
    files = chain_files(path)
    last = json.loads(path.read_bytes().splitlines()[-1])
    opened: list[Path] = []
    import orchestrator.audit.query as query

    real = query.iter_blocks

    def counting(p: Path):
        opened.append(p)
        return real(p)

    monkeypatch.setattr(query, "iter_blocks", counting)
    rows = list(Scanner(Filter(since=last["time"])).chain(Chain(path, files)))
    assert rows[-1].record["seq"] == 60
    assert len(opened) <= 2 < len(files)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T03:12:00Z", "2024-05-01T03:12:00.000000Z"),
        ("2024-05-01T03:12", "2024-05-01T03:12:00.000000Z"),  # naive is UTC
        ("2024-05-01T05:12:00+02:00", "2024-05-01T03:12:00.000000Z"),
        ("2024-05-01", "2024-05-01T00:00:00.000000Z"),
        ("10m", "2024-05-01T11:50:00.000000Z"),
        ("2h", "2024-05-01T10:00:00.000000Z"),
        ("1.5d", "2024-04-30T00:00:00.000000Z"),
        ("30s", "2024-05-01T11:59:30.000000Z"),
        ("now", "2024-05-01T12:00:00.000000Z"),
    ],
)
def test_parse_when(text: str, expected: str) -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_when(text, now) == expected


@pytest.mark.parametrize("text", ["yesterday", "10x", "", "2024-13-01"])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(AuditError, match="bad time"):
        parse_when(text)


def test_parse_ip_refuses() -> None:
    with pytest.raises(AuditError, match="bad address"):
        parse_ip("10.5.5")


def test_timeline(two_nodes: list[Chain]) -> None:
    records = [r.record for r in Scanner(Filter(migration="m-1")).merged(two_nodes)]
    lines = timeline("m-1", records)
    assert lines[0] == ("migration m-1: guest web1, n1 -> n2, 5 records, 4.000s, completed")
    phases = [line.split()[2:6] for line in lines[2:]]
    assert phases == [
        ["+0.000s", "n1", "migration.prepare", "ok"],
        ["+1.500s", "n1", "migration.precopy", "ok"],
        ["+2.000s", "n2", "ownership.claim", "ok"],
        ["+3.000s", "n1", "migration.cutover", "ok"],
        ["+4.000s", "n2", "migration.finalize", "ok"],
    ]
    durations = [line.split()[6] for line in lines[2:]]
    assert durations == ["15.0ms", "1.400s", "1.000s", "40.0ms", "0.0ms"]


def test_timeline_verdicts() -> None:
    base = {"node": "n1", "outcome": "ok", "seq": 1}
    abort = [{**base, "time": at(1), "action": "migration.abort", "outcome": "failed"}]
    assert timeline("m", abort)[0].endswith("aborted")
    assert timeline("m", [{**base, "time": at(1), "action": "migration.prepare"}])[0].endswith(
        "in progress"
    )
    assert timeline("m", []) == ["migration m: no records"]


def test_table_row_is_one_line_with_details() -> None:
    row = table_row(
        event(at(1, 0.123456), "n1", "migration.cutover", guest="web1", addresses=["10.5.5.201"],
              from_node="n1", to_node="n2", epoch=7, entries=3, migration="m-1",
              duration_ms=1234.5, detail="two\nlines")
    )  # fmt: skip
    assert "\n" not in row
    assert row.startswith("2024-05-01 03:01:00.123  n1")
    assert "guest=web1 ip=10.5.5.201 n1->n2 epoch=7 entries=3 mig=m-1 took=1.234s" in row


def test_follower_reads_new_lines_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=1000)
    log.record("guest.start")
    follower = Follower(path)
    assert [json.loads(line)["seq"] for _, line in follower.poll()] == [1]
    seen = []
    for i in range(60):  # several rotations between polls: no file is skipped
        log.record("sync.resync", entries=i)
        if i % 25 == 0:
            seen += [json.loads(line)["seq"] for _, line in follower.poll()]
    seen += [json.loads(line)["seq"] for _, line in follower.poll()]
    assert len(chain_files(path)) > 8
    assert seen == list(range(2, 62))


def test_follower_loses_nothing_to_a_rotation_during_its_poll(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The writer rotates again while the follower handles a rotation (after it listed
    the rotated files): the file renamed meanwhile is still read, once."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=1000)
    log.record("guest.start")
    follower = Follower(path)
    seen = [json.loads(line)["seq"] for _, line in follower.poll()]
    listed = follow.rotated

    def listed_then_rotated(live: Path) -> list[tuple[int, Path]]:
        found = listed(live)
        for i in range(12):  # more than a file holds: the writer rotates meanwhile
            log.record("sync.resync", entries=i)
        return found

    for i in range(12):
        log.record("sync.resync", entries=i)
    monkeypatch.setattr(follow, "rotated", listed_then_rotated)
    seen += [json.loads(line)["seq"] for _, line in follower.poll()]
    monkeypatch.setattr(follow, "rotated", listed)
    seen += [json.loads(line)["seq"] for _, line in follower.poll()]
    assert seen == list(range(1, 26))


def test_follower_waits_for_a_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"seq":1')
    follower = Follower(path)
    assert follower.poll() == []
    with open(path, "ab") as fh:
        fh.write(b',"rest":1}\n')
    assert follower.poll() == [(1, b'{"seq":1,"rest":1}')]


def test_follower_waits_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    follower = Follower(path)
    assert follower.poll() == []
    AuditLog(path, node="n1", fsync=False).record("guest.start")
    assert len(follower.poll()) == 1


def test_discover_errors_on_a_missing_log(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        discover([tmp_path / "nope.log"])
    with pytest.raises(AuditError, match="no audit log"):
        discover([tmp_path])  # an empty directory


def test_discover_takes_each_chain_once_and_skips_non_logs(two_nodes: list[Chain]) -> None:
    root = two_nodes[0].live.parent.parent
    (root / "export.jsonl").write_text("{}\n")
    (root / "notes.txt").write_text("hi\n")
    chains = discover([root, root / "n1" / "audit.log", root / "n2"])
    assert [c.live for c in chains] == [root / "n1" / "audit.log", root / "n2" / "audit.log"]
