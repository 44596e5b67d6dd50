"""AuditLog: every action writes exactly one record with the fields it was given."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.audit import ACTIONS, AuditError, AuditLog, verify
from orchestrator.audit.files import chain_files
from orchestrator.errors import ConvergentError

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.log", node="n1", actor="agent")


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_each_action_writes_one_record_with_its_fields(log: AuditLog, action: str) -> None:
    written = log.record(
        action,
        guest="web1",
        addresses=["10.5.5.201", "2001:db8:0::1"],
        from_node="n1",
        to_node="n2",
        epoch=7,
        entries=1234,
        duration_ms=12.34567,
        migration="m-42",
        detail="why",
    )
    [stored] = lines(log.path)
    assert stored == written
    expected_outcome = {"hook.veto": "refused", "error": "failed"}.get(action, "ok")
    assert stored == {
        "seq": 1,
        "prev": "genesis",
        "time": stored["time"],
        "node": "n1",
        "actor": "agent",
        "action": action,
        "outcome": expected_outcome,
        "guest": "web1",
        "addresses": ["10.5.5.201", "2001:db8::1"],
        "from_node": "n1",
        "to_node": "n2",
        "epoch": 7,
        "entries": 1234,
        "duration_ms": 12.346,
        "migration": "m-42",
        "detail": "why",
    }
    assert TIME.match(stored["time"])


def test_key_order_is_fixed_and_empty_fields_are_omitted(log: AuditLog) -> None:
    log.record("guest.stop", guest="web1")
    raw = log.path.read_text()
    assert raw.startswith('{"seq":1,"prev":"genesis","time":"')
    assert list(json.loads(raw)) == [
        "seq", "prev", "time", "node", "actor", "action", "outcome", "guest"
    ]  # fmt: skip


def test_records_chain_and_verify(log: AuditLog) -> None:
    for action in sorted(ACTIONS):
        log.record(action)
    stored = lines(log.path)
    assert [r["seq"] for r in stored] == list(range(1, len(ACTIONS) + 1))
    assert [r["action"] for r in stored] == sorted(ACTIONS)
    report = verify(chain_files(log.path))
    assert (report.exit_code, report.records) == (0, len(ACTIONS))


def test_bound_context_carries_across_phases(log: AuditLog) -> None:
    mig = log.bind(migration="m-1", guest="web1", from_node="n1", to_node="n2")
    mig.record("migration.prepare", epoch=3)
    mig.record("migration.cutover", guest=None, entries=9)  # None keeps the bound value
    first, second = lines(log.path)
    assert first["migration"] == second["migration"] == "m-1"
    assert second["guest"] == "web1" and second["entries"] == 9
    assert "migration" not in log.record("ruleset.apply")  # the parent is unchanged


def test_outcome_can_be_given(log: AuditLog) -> None:
    assert log.record("migration.precopy", outcome="failed")["outcome"] == "failed"


@pytest.mark.parametrize(
    "call",
    [
        lambda log: log.record("migration.teleport"),
        lambda log: log.record("guest.start", outcome="meh"),
        lambda log: log.record("guest.start", addresses=["not-an-ip"]),
        lambda log: log.bind(colour="red"),
    ],
)
def test_bad_records_are_refused_with_a_readable_error(log: AuditLog, call) -> None:
    with pytest.raises(AuditError) as err:
        call(log)
    assert isinstance(err.value, ConvergentError) and "\n" not in str(err.value)
    assert not log.path.exists() or log.path.read_text() == ""


def test_bad_actor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="actor"):
        AuditLog(tmp_path / "a.log", node="n1", actor="robot")


def test_timed_records_duration_and_failure(log: AuditLog) -> None:
    with log.timed("migration.cutover", guest="web1") as extra:
        extra["entries"] = 17
    with pytest.raises(RuntimeError), log.timed("migration.precopy", guest="web1"):
        raise RuntimeError("dirty rate too high")
    ok, failed = lines(log.path)
    assert ok["outcome"] == "ok" and ok["entries"] == 17 and ok["duration_ms"] >= 0
    assert failed["outcome"] == "failed"
    assert failed["detail"] == "RuntimeError: dirty rate too high"


def test_arecord_from_asyncio(log: AuditLog) -> None:
    async def main() -> list[Any]:
        return list(
            await asyncio.gather(*(log.arecord("sync.resync", entries=i) for i in range(20)))
        )

    written = asyncio.run(main())
    assert sorted(r["seq"] for r in written) == list(range(1, 21))
    assert verify(chain_files(log.path)).exit_code == 0


def test_each_record_is_fsynced_unless_batched(log: AuditLog, monkeypatch) -> None:
    import orchestrator.audit.writer as writer

    log.record("guest.start")  # creates the file (and fsyncs its directory)
    calls: list[int] = []
    real = writer.os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(writer.os, "fsync", counting)
    log.record("guest.stop")
    log.record("guest.stop")
    per_record = len(calls)
    with log.batch():
        for _ in range(50):
            log.record("ruleset.apply")
    assert per_record == 2
    assert len(calls) - per_record == 1
    assert verify(chain_files(log.path)).records == 53


def test_default_path_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVERGENT_AUDIT_LOG", str(tmp_path / "env" / "audit.log"))
    log = AuditLog(node="n1")
    log.record("guest.start")
    assert (tmp_path / "env" / "audit.log").exists()
