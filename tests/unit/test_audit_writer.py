"""The writer: rotation keeps one chain across files; several processes append to one
chain without interleaving; crashes leave a log the next write can continue."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from orchestrator.audit import AuditError, AuditLog, verify
from orchestrator.audit.files import chain_files, discover, rotated
from orchestrator.audit.writer import ChainWriter


def fill(path: Path, n: int, max_bytes: int = 2000, **kw) -> AuditLog:
    log = AuditLog(path, node="n1", max_bytes=max_bytes, fsync=False, **kw)
    for i in range(n):
        log.record("sync.resync", entries=i, guest=f"g{i % 7}")
    return log


def test_rotation_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 100)
    files = chain_files(path)
    assert [p.name for p in files[:3]] == ["audit.log.1", "audit.log.2", "audit.log.3"]
    assert files[-1] == path and len(files) > 5
    assert all(p.stat().st_size <= 2000 for p in files)
    report = verify(files)
    assert (report.exit_code, report.records, report.last_seq) == (0, 100, 100)
    second = json.loads(files[1].read_bytes().splitlines()[0])
    assert second["prev"] != "genesis" and second["seq"] > 1


def test_deleted_rotated_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 100)
    files = chain_files(path)
    files[2].unlink()
    report = verify(chain_files(path))
    assert report.problem and report.problem.kind == "deleted"
    assert (report.problem.file, report.problem.line) == (files[3], 1)
    assert "rotated file removed" in report.problem.why


def test_deleted_oldest_rotated_file_needs_partial(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 100)
    chain_files(path)[0].unlink()
    assert verify(chain_files(path)).problem.kind == "no-genesis"  # type: ignore[union-attr]
    assert verify(chain_files(path), partial=True).exit_code == 0


def test_reordered_rotated_files_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 100)
    one, two = chain_files(path)[1:3]
    tmp = one.with_name("x")
    one.rename(tmp)
    two.rename(one)
    tmp.rename(two)
    assert verify(chain_files(path)).exit_code == 1


def test_crash_between_rotation_and_first_write(tmp_path: Path) -> None:
    """The live file was renamed away but no new one written: the next write links to
    the newest rotated file instead of starting a new chain."""
    path = tmp_path / "audit.log"
    fill(path, 30).close()
    path.rename(path.with_name(f"audit.log.{rotated(path)[-1][0] + 1}"))
    fill(path, 5)
    report = verify(chain_files(path))
    assert (report.exit_code, report.records) == (0, 35)


def test_crash_truncated_only_line_restarts_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"seq":1,"prev":"gene')
    fill(path, 3)
    report = verify(chain_files(path))
    assert (report.exit_code, report.records) == (0, 4)  # recovery note + 3


def test_writer_continues_an_existing_chain_from_another_instance(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a = fill(path, 10, max_bytes=1 << 20)
    b = fill(path, 10, max_bytes=1 << 20)
    a.record("guest.stop")  # a's cached tail is stale: it must re-read
    assert verify(chain_files(path)).records == 21
    b.close()


def test_foreign_lines_at_the_end_are_kept_named_and_stepped_over(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 3).close()
    with path.open("ab") as f:
        f.write(b"garbage someone appended\n")  # a whole line that is no record
    log = fill(path, 1)  # the writer is not stopped by it
    with path.open("ab") as f:
        f.write(b"more junk, no newline")  # not the start of any record: no crash did this
    log.record("guest.stop")
    lines = path.read_bytes().splitlines()
    assert lines[3] == b"garbage someone appended" and lines[6] == b"more junk, no newline"
    notes = [json.loads(x)["detail"] for x in lines if b'"action":"error"' in x]
    assert len(notes) == 2 and "are not audit records" in notes[0] and "left in place" in notes[1]
    report = verify(chain_files(path))
    assert [(p.line, p.kind) for p in report.problems] == [(4, "corrupt"), (7, "corrupt")]
    assert report.records == 7 and report.exit_code == 1  # the chain went on past both


def test_write_failure_leaves_no_half_line(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, 3, max_bytes=1 << 20)
    import orchestrator.audit.writer as writer

    def short(fd: int, data: bytes) -> int:
        real_write(fd, data[:10])  # part of the line lands, then the disk is full
        raise OSError(28, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(writer.os, "write", short)
    with pytest.raises(AuditError, match="No space left"):
        log.record("guest.start")
    monkeypatch.undo()
    log.record("guest.start")
    assert verify(chain_files(path)).exit_code == 0


def _worker(path: str, tag: int, count: int, max_bytes: int) -> None:
    # Rotating runs skip fsync: it only slows them, the lock is what is under test.
    fsync = max_bytes >= 1 << 30
    actor = "agent" if tag % 2 else "hook"  # agent and spool replayer
    log = AuditLog(path, node="n1", actor=actor, max_bytes=max_bytes, fsync=fsync)
    for i in range(count):
        log.record("hook.spooled", guest=f"w{tag}", entries=i, detail="x" * (i % 50))


@pytest.mark.parametrize(
    "max_bytes",
    [pytest.param(1 << 30, marks=pytest.mark.slow), 64 << 10],
    ids=["one-file-fsync", "rotating"],
)
def test_concurrent_writers_make_one_chain(tmp_path: Path, max_bytes: int) -> None:
    """4 processes x 500 records (agent and spool replayer are separate processes)."""
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), t, 500, max_bytes)) for t in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    files = chain_files(path)
    report = verify(files)
    assert (report.exit_code, report.records) == (0, 2000)
    records = [json.loads(line) for p in files for line in p.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 2001))
    for tag in range(4):  # each writer's records are all there, in its own order
        mine = [r["entries"] for r in records if r["guest"] == f"w{tag}"]
        assert mine == list(range(500))
    if max_bytes < 1 << 30:
        assert len(files) > 3


def test_threads_share_one_writer(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=8 << 10)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: log.record("ruleset.apply", entries=i), range(400)))
    assert verify(chain_files(path)).records == 400


def test_forked_child_reopens_its_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, 3, max_bytes=1 << 20)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            log.record("guest.start", guest="child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    log.record("guest.start", guest="parent")
    assert verify(chain_files(path)).records == 5


def test_lock_file_sits_beside_the_log_and_is_not_a_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    fill(path, 30)
    assert (tmp_path / "audit.log.lock").exists()
    [chain] = discover([tmp_path])
    assert chain.live == path


def test_unwritable_directory_is_a_readable_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditError, match="cannot lock"):
        ChainWriter(blocker / "audit.log").record(time="t", node="n", actor="agent")


def test_a_replaced_lock_file_is_taken_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, 2, max_bytes=1 << 20)
    (tmp_path / "audit.log.lock").unlink()
    log.record("guest.start")
    held = os.fstat(log.writer._lock_fd).st_ino
    assert held == (tmp_path / "audit.log.lock").stat().st_ino
    assert verify(chain_files(path)).records == 3


def test_a_log_that_cannot_be_reopened_never_closes_someone_elses_fd(tmp_path: Path) -> None:
    """The writer closed its old fd, failed to open the new file, and on the next write
    closed that fd number again: by then another file (an agent's socket) held it."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", actor="agent")
    log.record("agent.start")
    path.rename(tmp_path / "aside")
    path.mkdir()  # the next writes cannot open the log
    with pytest.raises(AuditError):
        log.record("agent.stop")
    other = os.open(tmp_path / "aside", os.O_RDONLY)  # takes the number the writer freed
    try:
        with pytest.raises(AuditError):
            log.record("agent.stop")
        os.fstat(other)  # still open: the writer did not close it behind our back
    finally:
        os.close(other)
