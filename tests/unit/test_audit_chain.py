"""Tamper tests: every edit, deletion, insertion and reordering is detected and the
first bad line named; a crash-truncated last line is told apart from tampering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.audit import AuditLog, verify
from orchestrator.audit.chain import Report, expected_prefix
from orchestrator.audit.files import chain_files
from orchestrator.audit.record import line_hash, mac_ok

N = 12


def make_log(path: Path, n: int = N) -> list[bytes]:
    log = AuditLog(path, node="n1", fsync=False)
    for i in range(n):
        log.record("ruleset.apply", entries=i, detail=f"apply {i}")
    log.close()
    return path.read_bytes().splitlines()


def rewrite(path: Path, lines: list[bytes], tail: bytes = b"\n") -> None:
    path.write_bytes(b"\n".join(lines) + tail)


def check(path: Path) -> Report:
    return verify(chain_files(path))


def relink(lines: list[bytes], start: int) -> list[bytes]:
    """What a careful forger does: recompute seq/prev from ``start`` on."""
    out = lines[:start]
    for line in lines[start:]:
        record = json.loads(line)
        record["prev"] = hashlib.sha256(out[-1]).hexdigest()
        out.append(json.dumps(record, separators=(",", ":")).encode())
    return out


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


def test_intact_chain(path: Path) -> None:
    make_log(path)
    report = check(path)
    assert (report.exit_code, report.records, report.first_seq, report.last_seq) == (0, N, 1, N)
    assert report.problem is None and report.truncated is None


def test_edited_field_is_named(path: Path) -> None:
    lines = make_log(path)
    lines[3] = lines[3].replace(b'"entries":3', b'"entries":4')
    rewrite(path, lines)
    report = check(path)
    assert report.exit_code == 1
    assert report.problem and (report.problem.line, report.problem.kind) == (4, "edited")
    assert str(report.problem).startswith(f"{path}:4: edited: ")


def test_edited_seq_is_named(path: Path) -> None:
    lines = make_log(path)
    lines[5] = lines[5].replace(b'{"seq":6,', b'{"seq":60,')
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (6, "edited")


def test_deleted_line(path: Path) -> None:
    lines = make_log(path)
    del lines[4]
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (5, "deleted")
    assert "seq 5..5 missing" in problem.why


def test_deleted_lines(path: Path) -> None:
    lines = make_log(path)
    del lines[2:6]
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (3, "deleted")
    assert "4 line(s)" in problem.why


def test_inserted_copy(path: Path) -> None:
    lines = make_log(path)
    lines.insert(4, lines[8])
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (5, "inserted")


def test_inserted_forged_line_that_links_back(path: Path) -> None:
    """The forger links the new line to its predecessor; the next line still
    links past it."""
    lines = make_log(path)
    forged = json.loads(lines[3])
    forged.update(seq=5, prev=hashlib.sha256(lines[3]).hexdigest(), detail="forged")
    lines.insert(4, json.dumps(forged, separators=(",", ":")).encode())
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (5, "inserted")


def test_swapped_lines(path: Path) -> None:
    lines = make_log(path)
    lines[4], lines[5] = lines[5], lines[4]
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (5, "reordered")
    assert "swapped" in problem.why


def test_swapped_last_two_lines(path: Path) -> None:
    lines = make_log(path)
    lines[-2], lines[-1] = lines[-1], lines[-2]
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (N - 1, "reordered")


@pytest.mark.parametrize("keep", [1, 40, 150])
def test_truncated_last_line_is_a_crash_not_tampering(path: Path, keep: int) -> None:
    lines = make_log(path)
    rewrite(path, [*lines[:-1], lines[-1][:keep]], tail=b"")
    report = check(path)
    assert report.exit_code == 3 and report.problem is None
    assert report.truncated and (report.truncated.line, report.truncated.kind) == (N, "truncated")
    assert report.records == N - 1


def test_zero_filled_tail_after_a_crash_is_truncation(path: Path) -> None:
    lines = make_log(path)
    rewrite(path, lines[:-1], tail=b"\n" + b"\0" * 300)
    assert check(path).exit_code == 3


def test_writer_recovers_a_truncated_tail_and_says_so(path: Path) -> None:
    lines = make_log(path)
    rewrite(path, [*lines[:-1], lines[-1][:50]], tail=b"")
    log = AuditLog(path, node="n1", fsync=False)
    written = log.record("guest.start", guest="web1")
    report = check(path)
    assert report.exit_code == 0 and report.records == N + 1
    stored = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert stored[-2]["action"] == "error" and "dropped 50 bytes" in stored[-2]["detail"]
    assert stored[-1] == written and written["seq"] == N + 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda line: line[:-1],  # complete line, but no longer JSON
        lambda line: line.replace(b'"ruleset.apply"', b'"ruleset.sneak"'),
        lambda line: line.replace(b'"outcome":"ok"', b'"outcome":"fine"'),
    ],
)
def test_damaged_last_complete_line_is_tampering(path: Path, damage) -> None:
    lines = make_log(path)
    lines[-1] = damage(lines[-1])
    rewrite(path, lines)
    report = check(path)
    assert report.exit_code == 1
    assert report.problem and (report.problem.line, report.problem.kind) == (N, "edited")


def test_garbage_line_in_the_middle(path: Path) -> None:
    lines = make_log(path)
    lines[6] = b"hello"
    rewrite(path, lines)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (7, "corrupt")


def test_joined_lines_are_detected(path: Path) -> None:
    lines = make_log(path)
    lines[3:5] = [lines[3] + lines[4]]
    rewrite(path, lines)
    assert check(path).exit_code == 1


def test_missing_head_needs_partial(path: Path) -> None:
    lines = make_log(path)
    rewrite(path, lines[3:])
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (1, "no-genesis")
    report = verify(chain_files(path), partial=True)
    assert (report.exit_code, report.first_seq, report.records) == (0, 4, N - 3)


def test_restarted_chain(path: Path, tmp_path: Path) -> None:
    lines = make_log(path)
    other = make_log(tmp_path / "other.log", 3)
    rewrite(path, lines + other)
    problem = check(path).problem
    assert problem and (problem.line, problem.kind) == (N + 1, "restart")


def test_rewritten_chain_is_only_caught_by_an_anchor(path: Path) -> None:
    lines = make_log(path)
    head = check(path)
    lines[2] = lines[2].replace(b'"entries":2', b'"entries":99')
    rewrite(path, relink(lines, 2))
    assert check(path).exit_code == 0  # a bare hash chain cannot see this
    report = verify(chain_files(path), anchors={head.last_seq: head.head or ""})
    assert report.problem and report.problem.kind == "anchor" and report.problem.line == N


def test_deleted_last_lines_are_only_caught_by_an_anchor(path: Path) -> None:
    lines = make_log(path)
    head = check(path)
    rewrite(path, lines[:-2])
    assert check(path).exit_code == 0
    report = verify(chain_files(path), anchors={head.last_seq: head.head or ""})
    assert report.problem and report.problem.kind == "anchor"
    assert "last lines deleted" in report.problem.why


def test_empty_file_is_not_a_valid_chain(path: Path) -> None:
    path.write_bytes(b"")
    assert check(path).exit_code == 1


OPS = st.sampled_from(["edit", "delete", "insert", "swap", "seq"])


@settings(max_examples=150, deadline=None)
@given(op=OPS, at=st.integers(min_value=1, max_value=N - 3), data=st.data())
def test_any_tampering_before_the_last_line_is_caught(tmp_path_factory, op, at, data) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "audit.log"
    lines = make_log(path)
    if op == "edit":
        line = bytearray(lines[at])
        pos = data.draw(st.integers(min_value=0, max_value=len(line) - 1))
        line[pos] = data.draw(st.integers(32, 126).filter(lambda b: b != line[pos]))
        lines[at] = bytes(line)
    elif op == "delete":
        del lines[at]
    elif op == "insert":
        lines.insert(at, lines[data.draw(st.integers(0, N - 1))])
    elif op == "swap":
        lines[at], lines[at + 1] = lines[at + 1], lines[at]
    else:
        lines[at] = lines[at].replace(b'"seq":', b'"seq":1', 1)
    rewrite(path, lines)
    report = check(path)
    assert report.exit_code == 1
    # The named line is the tampered one or the one right after it.
    assert report.problem and report.problem.line in (at, at + 1, at + 2)


def test_every_problem_is_named_with_its_line(path: Path) -> None:
    lines = make_log(path)
    edited = lines[3].replace(b'"node":"', b'"node":"x')
    # a crash cut the last write short: a prefix of what the writer would write next
    cut = expected_prefix(len(lines) + 1, line_hash(lines[-1])) + b',"time":"2024-01-01T00:0'
    rewrite(path, [*lines[:3], edited, *lines[4:8], *lines[9:]], tail=b"\n" + cut)
    report = check(path)
    assert [(p.line, p.kind) for p in report.problems] == [(4, "edited"), (9, "deleted")]
    assert report.truncated is not None and report.truncated.line == len(lines)
    assert report.exit_code == 1


def test_only_a_prefix_of_the_next_record_counts_as_a_crash(path: Path) -> None:
    lines = make_log(path)
    nxt = expected_prefix(len(lines) + 1, line_hash(lines[-1]))
    for tail, code in [(nxt[:9], 3), (nxt + b',"time":"2024-01-01T', 3),
                       (b"junk without a newline", 1), (nxt[:-3] + b"bad", 1),
                       (expected_prefix(len(lines) + 5, line_hash(lines[-1])), 1),
                       (nxt + b',"detail":"x","time":"', 1),  # keys out of schema order
                       (nxt + b',"time":"\x01', 1), (nxt + b',"nope":1', 1)]:
        rewrite(path, lines, tail=b"\n" + tail)
        assert check(path).exit_code == code, tail


# --- a keyed chain: what a bare hash chain cannot see ----------------------------------------

AUDIT_KEY = b"0123456789abcdef-audit-key"


def forge(lines: list[bytes], **fields: object) -> bytes:
    """A line a forger appends: right seq, prev recomputed, whatever it likes inside."""
    last = json.loads(lines[-1])
    record = {"seq": last["seq"] + 1, "prev": hashlib.sha256(lines[-1]).hexdigest(),
              **{k: v for k, v in last.items() if k not in ("seq", "prev", "mac")}, **fields}
    return json.dumps(record, separators=(",", ":")).encode()


def test_a_forged_appended_line_and_a_rewritten_chain_are_caught_with_the_key(path: Path) -> None:
    log = AuditLog(path, node="n1", fsync=False, key=AUDIT_KEY)
    for i in range(6):
        log.record("ruleset.apply", entries=i, detail='looks like ,"mac":"' + "0" * 32 + '"}')
    log.close()
    lines = path.read_bytes().splitlines()
    assert all(mac_ok(line, AUDIT_KEY) for line in lines)
    assert verify(chain_files(path), key=AUDIT_KEY).exit_code == 0
    # appended: the hash chain is fine, so without the key it passes ...
    rewrite(path, [*lines, forge(lines, detail="all good")])
    assert check(path).exit_code == 0
    report = verify(chain_files(path), key=AUDIT_KEY)  # ... and with it, it does not
    assert [(p.line, p.kind) for p in report.problems] == [(7, "forged")]
    assert "no mac" in report.problems[0].why
    # rewritten: an edit in the middle, every later prev recomputed, the macs kept
    edited = [*lines[:2], lines[2].replace(b'"entries":2', b'"entries":9'), *lines[3:]]
    rewrite(path, relink(edited, 3))
    assert check(path).exit_code == 0
    report = verify(chain_files(path), key=AUDIT_KEY)
    assert [(p.line, p.kind) for p in report.problems] == [(n, "forged") for n in range(3, 7)]
    assert "does not check out" in report.problems[0].why
    # a wrong key finds nothing right
    assert len(verify(chain_files(path), key=b"another-key-entirely").problems) == 6
