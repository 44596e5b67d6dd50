"""Reading and verifying a chain.

Each line stores ``seq`` (one more than the line before) and ``prev`` (sha256 of the
line before, exactly as stored). The writer always puts these two keys first, so the
hot loop checks a line with one ``startswith`` against the prefix it must have and
one sha256; JSON is parsed only for the last line (no later line vouches for it) and
for the few lines around a break, to say what happened there.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.audit.record import FIELDS, GENESIS, mac_ok, validate

CHUNK = 1 << 22
_SEQ = b'{"seq":'
_PREV = b',"prev":"'


def iter_blocks(path: Path) -> Iterator[tuple[int, list[bytes], bool]]:
    """``(number of the first line, lines without newline, complete)`` in big chunks;
    a last fragment that has no newline comes alone, with ``complete`` False."""
    with open(path, "rb") as fh:
        rest = b""
        lineno = 1
        while chunk := fh.read(CHUNK):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            if parts:
                yield lineno, parts, True
                lineno += len(parts)
        if rest:
            yield lineno, [rest], False


def iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """``(lineno, bytes without newline, ended by a newline)``."""
    for first, block, complete in iter_blocks(path):
        for offset, raw in enumerate(block):
            yield first + offset, raw, complete


def parse_head(line: bytes) -> tuple[int, str] | None:
    """``(seq, prev)`` from the fixed prefix of a line, or None if it has none."""
    if not line.startswith(_SEQ):
        return None
    comma = line.find(b",", len(_SEQ))
    if comma < 0 or line[comma : comma + len(_PREV)] != _PREV:
        return None
    start = comma + len(_PREV)
    end = line.find(b'"', start)
    try:
        return int(line[len(_SEQ) : comma]), line[start:end].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def expected_prefix(seq: int, prev: str) -> bytes:
    return b'%s%d%s%s"' % (_SEQ, seq, _PREV, prev.encode("ascii"))


@dataclass(frozen=True)
class Finding:
    """Where a chain breaks (or ends short) and why, as ``file:line: kind: why``."""

    file: Path
    line: int
    kind: str  # edited | deleted | inserted | reordered | corrupt | restart | no-genesis |
    #            anchor | forged | truncated
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.why}"


@dataclass
class Report:
    files: list[Path]
    records: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    head: str | None = None  # hash of the last good line: note it to anchor later checks
    problems: list[Finding] = field(default_factory=list)  # tampering or corruption, in order
    truncated: Finding | None = None  # a crash cut the last write short

    @property
    def problem(self) -> Finding | None:
        """The first problem (every one is in ``problems``)."""
        return self.problems[0] if self.problems else None

    @property
    def exit_code(self) -> int:
        """0 intact, 1 tampered or corrupt, 3 intact but the last write was cut short."""
        if self.problem:
            return 1
        return 3 if self.truncated else 0


@dataclass
class _Good:
    """The last line that checked out, and the one before it (for insert diagnosis)."""

    seq: int = 0
    hash: str = ""
    before: str = ""
    where: tuple[Path, int] | None = None
    raw: bytes = b""


@dataclass
class _Line:
    file: Path
    lineno: int
    raw: bytes
    complete: bool


@dataclass
class Verifier:
    """Walks one chain's files in order; ``partial`` accepts a chain whose older files
    were removed (the first line need not be genesis); ``anchors`` maps seq -> hash
    noted earlier (``audit verify`` prints the head), which catches a rewritten chain
    or deleted last lines, the two things a bare hash chain cannot see."""

    files: list[Path]
    partial: bool = False
    anchors: Mapping[int, str] = field(default_factory=dict)
    key: bytes | None = None  # the audit key: every line must carry a mac made with it
    source: str = "an earlier verify"  # where the anchors come from, for the messages

    def run(self) -> Report:
        """Every problem, each with its line: after one, the walk picks the chain up again
        at the next line that links to what it trusts (or at the bad line itself)."""
        report = Report(list(self.files))
        good = _Good()
        blocks = _Peek(self._blocks())
        for path, first, block, complete in blocks:
            start = 0
            while start < len(block):
                if good.where is None and complete and self._starts(block[start]):
                    self._accept_first(good, path, first + start, block[start], report)
                    report.first_seq = good.seq
                    start += 1
                    continue
                bad = self._fast(good, path, first, block, start, report) \
                    if complete and good.where else start  # fmt: skip
                if bad < 0:
                    break
                cur = _Line(path, first + bad, block[bad], complete)
                nxt = _after(block, bad, path, first, blocks)
                found = diagnose(good, cur, nxt)
                if found.kind == "truncated":
                    report.truncated = found
                else:
                    report.problems.append(found)
                start = bad + 1 + _resume(good, cur, nxt, found)
        return self._finish(report, good)

    def _blocks(self) -> Iterator[tuple[Path, int, list[bytes], bool]]:
        for path in self.files:
            for first, block, complete in iter_blocks(path):
                yield path, first, block, complete

    def _starts(self, raw: bytes) -> bool:
        head = parse_head(raw)
        return head is not None and (self.partial or head == (1, GENESIS))

    def _accept_first(self, good: _Good, path: Path, lineno: int, raw: bytes,
                      report: Report) -> None:  # fmt: skip
        good.seq = parse_head(raw)[0]  # type: ignore[index]  # _starts checked it
        good.hash = hashlib.sha256(raw).hexdigest()
        good.where, good.raw = (path, lineno), raw
        self._check_anchor(good.seq, good.hash, path, lineno, report)
        if self.key is not None:
            self._check_mac(raw, path, lineno, report)

    def _fast(self, good: _Good, path: Path, first: int, block: list[bytes], start: int,
              report: Report) -> int:  # fmt: skip
        """The hot loop: accept lines while each carries the prefix it must have; the
        index of the first that does not, or -1. Locals only, for speed."""
        seq, digest, before = good.seq, good.hash, good.before
        anchors, sha256, key = self.anchors, hashlib.sha256, self.key
        expect = expected_prefix(seq + 1, digest)
        bad, last = -1, start - 1
        for index in range(start, len(block)):
            raw = block[index]
            if not raw.startswith(expect):
                bad = index
                break
            seq += 1
            before, digest = digest, sha256(raw).hexdigest()
            expect = b'{"seq":%d,"prev":"%s"' % (seq + 1, digest.encode())
            if anchors:
                self._check_anchor(seq, digest, path, first + index, report)
            if key is not None:
                self._check_mac(raw, path, first + index, report)
            last = index
        if last >= start:
            good.seq, good.hash, good.before = seq, digest, before
            good.where, good.raw = (path, first + last), block[last]
        return bad

    def _check_anchor(self, seq: int, digest: str, path: Path, lineno: int,
                      report: Report) -> None:  # fmt: skip
        if self.anchors.get(seq, digest) != digest:
            why = (f"seq {seq} does not hash to the anchor from {self.source}: chain "
                   "rewritten from here")
            report.problems.append(Finding(path, lineno, "anchor", why))

    def _check_mac(self, raw: bytes, path: Path, lineno: int, report: Report) -> None:
        assert self.key is not None
        ok = mac_ok(raw, self.key)
        if not ok:
            why = ("no mac: the chain is keyed, and this line was written without the key"
                   if ok is None else "its mac does not check out under the audit key: "
                   "forged, or changed after it was written")  # fmt: skip
            report.problems.append(Finding(path, lineno, "forged", why))

    def _finish(self, report: Report, good: _Good) -> Report:
        report.records = 0 if report.first_seq is None else good.seq - report.first_seq + 1
        report.last_seq, report.head = good.seq, good.hash or None
        last = _check_last(good) if good.where else None
        missing = self._missing_anchor(good)
        report.problems += [f for f in (last, missing) if f is not None]
        if not report.problems and good.where is None and report.truncated is None:
            where = self.files[-1] if self.files else Path("-")
            report.problems.append(Finding(where, 1, "corrupt", "no records"))
        return report

    def _missing_anchor(self, good: _Good) -> Finding | None:
        beyond = sorted(seq for seq in self.anchors if seq > good.seq)
        if not beyond or good.where is None:
            return None
        why = (f"chain ends at seq {good.seq} but {self.source} anchored seq {beyond[0]}: "
               "last lines deleted")
        return Finding(good.where[0], good.where[1], "anchor", why)


class _Peek:
    """An iterator whose next item can be looked at without losing it."""

    def __init__(self, it: Iterator[tuple[Path, int, list[bytes], bool]]) -> None:
        self._it = it
        self._ahead: tuple[Path, int, list[bytes], bool] | None = None

    def __iter__(self) -> _Peek:
        return self

    def __next__(self) -> tuple[Path, int, list[bytes], bool]:
        if self._ahead is not None:
            item, self._ahead = self._ahead, None
            return item
        return next(self._it)

    def peek(self) -> tuple[Path, int, list[bytes], bool] | None:
        if self._ahead is None:
            self._ahead = next(self._it, None)
        return self._ahead


def _resume(good: _Good, cur: _Line, nxt: _Line | None, found: Finding) -> int:
    """After a problem, where the walk goes on: keep trusting ``good`` if the next line
    links to it (``cur`` was inserted or is junk); skip a swapped pair; else trust ``cur``
    from here. Returns how many lines after ``cur`` to skip (0 or 1)."""
    head = parse_head(cur.raw) if cur.complete else None
    nxt_head = parse_head(nxt.raw) if nxt is not None and nxt.complete else None
    if head is None or (nxt_head is not None and nxt_head[1] == good.hash):
        return 0  # junk or an inserted line: the chain goes on from ``good``
    if found.why == _SWAPPED and nxt is not None:
        _trust(good, cur)  # the later of the two, so the line after the pair links to it
        return 1
    _trust(good, cur)
    return 0


def _trust(good: _Good, line: _Line) -> None:
    head = parse_head(line.raw)
    assert head is not None
    good.before, good.hash = good.hash, hashlib.sha256(line.raw).hexdigest()
    good.seq, good.where, good.raw = head[0], (line.file, line.lineno), line.raw


def _after(
    block: list[bytes],
    index: int,
    path: Path,
    first: int,
    blocks: _Peek,
) -> _Line | None:
    """The line after ``block[index]``, for diagnosis."""
    if index + 1 < len(block):
        return _Line(path, first + index + 1, block[index + 1], True)
    following = blocks.peek()
    if following is None:
        return None
    path, first, block, complete = following
    return _Line(path, first, block[0], complete)


def verify(
    files: list[Path], partial: bool = False, anchors: Mapping[int, str] | None = None,
    key: bytes | None = None, source: str = "an earlier verify",
) -> Report:
    return Verifier(files, partial, anchors or {}, key, source).run()


def _check_last(good: _Good) -> Finding | None:
    """No later line vouches for the last one, so at least it must be a sound record."""
    assert good.where is not None
    try:
        record = json.loads(good.raw)
        why = validate(record) if isinstance(record, dict) else "not a JSON object"
    except ValueError as exc:
        why = f"not valid JSON ({exc})"
    return Finding(*good.where, "edited", why) if why else None


def diagnose(good: _Good, cur: _Line, nxt: _Line | None) -> Finding:
    """Name the first bad line and the likeliest cause, looking one line each way."""
    here = (cur.file, cur.lineno)
    if not cur.complete and nxt is None:
        if good.where is None or is_record_prefix(cur.raw, good.seq + 1, good.hash):
            return Finding(*here, "truncated", _truncated_why(cur))
        return Finding(*here, "corrupt", f"last line ({len(cur.raw)} bytes, no newline) is not "
                                         "the start of the next record: not a crash truncation")
    head = parse_head(cur.raw)
    if head is None or not cur.complete:
        return Finding(*here, "corrupt", "not an audit record (no seq/prev prefix or no newline)")
    seq, prev = head
    if good.where is None:
        why = f"chain starts at seq {seq}, not genesis: older files missing (or use --partial)"
        return Finding(*here, "no-genesis", why)
    if prev == GENESIS:
        why = f"a second genesis after seq {good.seq}: the log before it was replaced"
        return Finding(*here, "restart", why)
    return _diagnose_link(good, cur, nxt, seq, prev)


def _diagnose_link(good: _Good, cur: _Line, nxt: _Line | None, seq: int, prev: str) -> Finding:
    assert good.where is not None
    here = (cur.file, cur.lineno)
    if prev == good.hash:
        return Finding(*here, "edited", f"seq is {seq}, expected {good.seq + 1}")
    nxt_head = parse_head(nxt.raw) if nxt else None
    if nxt is not None and nxt_head and nxt_head[1] == good.hash:
        if prev == hashlib.sha256(nxt.raw).hexdigest():
            return Finding(*here, "reordered", _SWAPPED)
        return Finding(*here, "inserted", "the next line links to the line before this one")
    if prev == good.before:
        why = f"{cur.file}:{cur.lineno} links to the line before this one"
        return Finding(*good.where, "inserted", why)
    if seq == good.seq + 1:
        why = (
            f"its hash differs from the prev recorded by {cur.file}:{cur.lineno} "
            "(this line, or that prev, was changed)"
        )
        return Finding(*good.where, "edited", why)
    if seq > good.seq + 1:
        gap = seq - good.seq - 1
        why = f"seq {good.seq + 1}..{seq - 1} missing: {gap} line(s) deleted before this line"
        if cur.lineno == 1:
            why += " (a rotated file removed?)"
        return Finding(*here, "deleted", why)
    return Finding(*here, "reordered", f"seq {seq} after seq {good.seq}: inserted or moved line")


_SWAPPED = "this line and the next are swapped"
_KEY = re.compile(rb'[{,]"([a-z_]+)":')


def is_record_prefix(raw: bytes, seq: int, prev: str) -> bool:
    """Could ``raw`` be the first bytes of the record the writer would append next (what a
    crash mid-write leaves)? It must carry that record's exact ``seq``/``prev`` prefix (or a
    part of it), be printable ASCII, and name only schema keys, each once, in schema order.
    All zero bytes also count: a crash after the file grew but before its data reached the
    disk leaves exactly that (ext4's delayed allocation)."""
    if raw and not raw.strip(b"\0"):
        return True
    expect = expected_prefix(seq, prev)
    if len(raw) <= len(expect):
        return expect.startswith(raw)
    if not raw.startswith(expect) or not raw.isascii():
        return False
    if any(b < 0x20 or b == 0x7F for b in raw):
        return False
    keys = [k.decode() for k in _KEY.findall(raw)]
    if any(k not in FIELDS for k in keys) or len(set(keys)) != len(keys):
        return False
    order = [FIELDS.index(k) for k in keys]
    return order == sorted(order)


def _truncated_why(cur: _Line) -> str:
    return (
        f"last line cut short ({len(cur.raw)} bytes, no newline): a crash during a write, "
        "not tampering; the next write drops it and records the recovery"
    )
