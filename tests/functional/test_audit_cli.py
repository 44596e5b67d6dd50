"""``convergent audit ...`` end to end, as a subprocess (no root needed)."""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.audit import AuditLog

CONVERGENT = str(Path(sys.executable).with_name("convergent"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CONVERGENT_AUDIT_LOG"}
    full_env.update(env or {})
    return subprocess.run(
        [CONVERGENT, "audit", *args], capture_output=True, text=True, timeout=60, env=full_env
    )


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Two nodes' logs in one directory tree, a migration spanning both."""
    n1 = AuditLog(tmp_path / "n1" / "audit.log", node="n1", fsync=False)
    n2 = AuditLog(tmp_path / "n2" / "audit.log", node="n2", fsync=False)
    n1.record("guest.start", guest="web1", addresses=["10.5.5.201"])
    n2.record("guest.start", guest="db1", addresses=["10.5.6.7"])
    mig = dict(migration="m-7", guest="web1", from_node="n1", to_node="n2")
    n1.bind(**mig).record("migration.prepare", epoch=3, duration_ms=10)
    n1.bind(**mig).record("migration.precopy", duration_ms=900)
    n2.bind(**mig).record("ownership.claim", epoch=4, addresses=["10.5.5.201"])
    n1.bind(**mig).record("migration.cutover", entries=321, duration_ms=35)
    n2.bind(**mig).record("migration.finalize")
    n2.record("hook.veto", guest="db1", detail="pinned")
    return tmp_path


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_show_merges_nodes_in_time_order(logs: Path) -> None:
    out = run("show", "--log", str(logs / "n1"), "--log", str(logs / "n2" / "audit.log"))
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].startswith("TIME (UTC)")
    assert [row.split()[4] for row in rows[1:]] == [
        "guest.start", "guest.start", "migration.prepare", "migration.precopy",
        "ownership.claim", "migration.cutover", "migration.finalize", "hook.veto",
    ]  # fmt: skip
    assert [row.split()[2] for row in rows[1:3]] == ["n1", "n2"]


def test_show_json_is_json_lines_as_stored(logs: Path) -> None:
    out = run("show", "--log", str(logs), "--json", "--action", "migration", "--node", "n1")
    records = json_lines(out.stdout)
    assert [r["action"] for r in records] == [
        "migration.prepare",
        "migration.precopy",
        "migration.cutover",
    ]
    stored = (logs / "n1" / "audit.log").read_text().splitlines()
    assert out.stdout.splitlines() == stored[1:]


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (["--guest", "db1"], 2),
        (["--ip", "10.5.5.201"], 2),
        (["--ip", "10.5.6.0/24"], 1),
        (["--action", "migration,ownership"], 5),
        (["--since", "10m"], 8),
        (["--until", "10m"], 0),
        (["--since", "2000-01-01", "--until", "2000-01-02"], 0),
        (["--node", "n2", "--guest", "web1"], 2),
    ],
)
def test_show_filters(logs: Path, args: list[str], count: int) -> None:
    out = run("show", "--log", str(logs), "--json", *args)
    assert out.returncode == 0, out.stderr
    assert len(json_lines(out.stdout)) == count


def test_show_last(logs: Path) -> None:
    out = run("show", "--log", str(logs), "--json", "-n", "2")
    assert [r["action"] for r in json_lines(out.stdout)] == ["migration.finalize", "hook.veto"]


def test_show_migration_timeline(logs: Path) -> None:
    out = run("show", "--log", str(logs), "--migration", "m-7")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("migration m-7: guest web1, n1 -> n2, 5 records,")
    assert lines[0].endswith("completed")
    assert [line.split()[4] for line in lines[2:]] == [
        "migration.prepare", "migration.precopy", "ownership.claim", "migration.cutover",
        "migration.finalize",
    ]  # fmt: skip
    assert "900.0ms" in lines[3]


def test_default_log_comes_from_the_environment(logs: Path) -> None:
    out = run("show", "--json", env={"CONVERGENT_AUDIT_LOG": str(logs / "n2" / "audit.log")})
    assert {r["node"] for r in json_lines(out.stdout)} == {"n2"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "--log", "/nonexistent/audit.log"], 1, "no audit log at /nonexistent"),
        (["show", "--since", "last tuesday"], 2, "bad time 'last tuesday'"),
        (["show", "--ip", "10.5.5"], 2, "bad address '10.5.5'"),
        (["verify", "--anchor", "12"], 2, "is not SEQ:HASH"),
    ],
)
def test_errors_are_one_readable_line(logs: Path, args: list[str], code: int, message: str) -> None:
    out = run(*args, env={"CONVERGENT_AUDIT_LOG": str(logs)})
    assert out.returncode == code
    [line] = out.stderr.splitlines()
    assert line.startswith("convergent: ") and message in line
    assert "Traceback" not in out.stderr


def test_verify_ok_prints_heads(logs: Path) -> None:
    out = run("verify", "--log", str(logs))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(": ok: 4 records, seq 1..4 in 1 file(s); head 4:" in x
                                   for x in lines)  # fmt: skip
    head = lines[0].rsplit(" ", 1)[1]
    again = run("verify", "--log", str(logs / "n1"), "--anchor", head)
    assert again.returncode == 0, again.stderr


def test_verify_names_the_edited_line(logs: Path) -> None:
    path = logs / "n1" / "audit.log"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"epoch":3', '"epoch":2')
    path.write_text("".join(lines))
    out = run("verify", "--log", str(logs))
    assert out.returncode == 1
    assert f"convergent: {path}:2: edited: " in out.stderr
    assert "n2/audit.log: ok" in out.stdout  # the other chain is still reported


def test_verify_tells_truncation_from_tampering(logs: Path) -> None:
    path = logs / "n2" / "audit.log"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    out = run("verify", "--log", str(path))
    assert out.returncode == 3
    assert f"convergent: warning: {path}:4: truncated: " in out.stderr
    assert "not tampering" in out.stderr


def test_verify_rotated_chain_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=1000)
    for i in range(50):
        log.record("sync.resync", entries=i)
    out = run("verify", "--log", str(path))
    assert out.returncode == 0 and "50 records" in out.stdout
    (tmp_path / "audit.log.2").unlink()
    out = run("verify", "--log", str(path))
    assert out.returncode == 1
    assert f"{tmp_path / 'audit.log.3'}:1: deleted: " in out.stderr


def test_export_csv_and_jsonl(logs: Path, tmp_path: Path) -> None:
    out = run("export", "--log", str(logs), "--format", "csv", "--guest", "web1")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["action"] for r in rows][:3] == ["guest.start", "migration.prepare",
                                               "migration.precopy"]  # fmt: skip
    assert rows[0]["addresses"] == "10.5.5.201" and rows[1]["epoch"] == "3"
    target = tmp_path / "out.jsonl"
    out = run("export", "--log", str(logs), "-o", str(target))
    assert out.returncode == 0 and out.stdout == ""
    assert len(json_lines(target.read_text())) == 8


def test_export_refuses_a_tampered_chain(logs: Path) -> None:
    path = logs / "n1" / "audit.log"
    lines = path.read_text().splitlines(keepends=True)
    del lines[1]
    path.write_text("".join(lines))
    out = run("export", "--log", str(logs))
    assert out.returncode == 1 and out.stdout == ""
    assert "deleted" in out.stderr and "--no-verify" in out.stderr
    out = run("export", "--log", str(logs), "--no-verify")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 7


def _reader(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _take(lines: queue.Queue[str], n: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while len(got) < n and time.monotonic() < deadline:
        try:
            got.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
    return got


def test_follow_picks_up_new_lines_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, node="n1", fsync=False, max_bytes=2000)
    log.record("guest.start", guest="old")
    log.record("sync.resync", entries=-1)  # the backlog: printed once follow is watching
    cmd = [CONVERGENT, "audit", "follow", "--log", str(path), "--json", "--interval", "0.05",
           "--action", "sync", "-n", "5"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _reader(proc)
        # not a sleep: a loaded machine can take seconds to start the command, and what
        # is written before it opens the file would only show as the last 5 of a backlog
        assert [json.loads(line)["entries"] for line in _take(lines, 1)] == [-1]
        for i in range(40):
            log.record("sync.resync", entries=i)
            log.record("guest.stop", guest="noise")
        got = _take(lines, 40)
        assert [json.loads(line)["entries"] for line in got] == list(range(40))
        assert len(list(tmp_path.glob("audit.log.*[0-9]"))) > 3
    finally:
        proc.terminate()
        proc.wait(10)


def test_follow_shows_the_recent_backlog_first(logs: Path) -> None:
    cmd = [CONVERGENT, "audit", "follow", "--log", str(logs), "-n", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _reader(proc)
        got = _take(lines, 3)
        assert got[0].startswith("TIME (UTC)")
        assert [line.split()[4] for line in got[1:]] == ["migration.finalize", "hook.veto"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_show_into_a_closed_pipe_is_quiet(logs: Path) -> None:
    log = AuditLog(logs / "n1" / "audit.log", node="n1", fsync=False)
    with log.batch():
        for i in range(5000):
            log.record("ruleset.apply", entries=i)
    shell = f"{CONVERGENT} audit show --log {logs} | head -n 3"
    out = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=60)
    assert len(out.stdout.splitlines()) == 3
    assert out.stderr == ""
