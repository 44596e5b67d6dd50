"""Appending to a chain: the one place that writes audit files.

Every append runs under an exclusive ``flock`` on ``audit.log.lock`` (a separate file,
so the lock survives the rename of a rotation): read the last line's hash, append one
line with a single ``write``, fsync, unlock. Separate processes (agent, spool replayer)
therefore never interleave lines or fork the chain. The last line is cached by
(inode, size), so the usual append reads nothing back.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.audit.chain import is_record_prefix, parse_head
from orchestrator.audit.errors import AuditError
from orchestrator.audit.files import lock_path, next_rotated, rotated
from orchestrator.audit.record import GENESIS, encode, line_hash, seal

DEFAULT_MAX_BYTES = 64 << 20
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Tail:
    """What the next line links to: ``hash`` "" means the chain is empty (genesis)."""

    ino: int
    size: int
    seq: int
    hash: str


@dataclass(frozen=True)
class _Partial:
    """What follows the last record line: a crash's fragment, or junk."""

    cut: int  # offset of its first byte
    size: int
    digest: str
    ends_line: bool = False  # it ends with a newline: whole lines of junk, not a fragment
    head: bytes = b""  # its first bytes, to tell a crash's fragment from junk


class ChainWriter:
    """The final structlog "logger": ``record(**fields)`` appends one chained line and
    returns it as written. Safe across threads and processes."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, fsync: bool = True,
                 key: bytes | None = None):
        self.path = Path(path)
        self.key = key  # set: a keyed chain, every line sealed with its mac
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._mutex = threading.RLock()  # flock is per open file, not per thread
        self._depth = 0
        self._batch = 0
        self._dirty = False
        self._pid = -1
        self._lock_fd = -1
        self._fd = -1
        self._ino = -1
        self._tail: Tail | None = None

    @property
    def head(self) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last line this writer appended or read, None before
        any: what the agent anchors in the store (one attribute read, no lock)."""
        tail = self._tail
        return (tail.seq, tail.hash) if tail is not None and tail.hash else None

    # -- structlog logger protocol -------------------------------------------------
    def record(self, **event: Any) -> dict[str, Any]:
        with self.locked():
            return self._append(event)

    # -- locking and batching --------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the lock and fsync once at the end instead of per record (group commit)."""
        with self.locked():
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1

    def close(self) -> None:
        with self._mutex:
            for fd in (self._fd, self._lock_fd):
                if fd >= 0 and self._pid == os.getpid():
                    os.close(fd)
            self._fd = self._lock_fd = -1
            self._tail = None

    def _acquire(self) -> None:
        if self._pid != os.getpid():  # a forked child must not share our open files
            self._fd = self._lock_fd = -1
            self._tail = None
            self._pid = os.getpid()
        while True:
            if self._lock_fd < 0:
                self._lock_fd = self._open_lock()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            if self._lock_is_current():
                return
            # The lock file was removed or replaced while we waited: a lock on the old
            # inode no longer excludes anyone, so take the new one.
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _open_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            return os.open(lock_path(self.path), flags, 0o640)
        except OSError as exc:
            raise AuditError(f"audit: cannot lock {self.path}: {exc.strerror}") from exc

    def _lock_is_current(self) -> bool:
        try:
            return os.stat(lock_path(self.path)).st_ino == os.fstat(self._lock_fd).st_ino
        except FileNotFoundError:
            return False

    def _release(self) -> None:
        try:
            if self._dirty and self.fsync:
                self._sync(self._fd)
            self._dirty = False
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- the append ---------------------------------------------------------------------
    def _append(self, event: dict[str, Any]) -> dict[str, Any]:
        fd = self._open()
        tail = self._tail_of(fd, event)
        record = {"seq": tail.seq + 1, "prev": tail.hash or GENESIS, **event}
        line = seal(encode(record), self.key) + b"\n"
        if tail.size and tail.size + len(line) > self.max_bytes:
            fd, tail = self._rotate(fd, tail)
        self._write(fd, line, tail.size)
        self._tail = Tail(tail.ino, tail.size + len(line), tail.seq + 1, line_hash(line[:-1]))
        self._dirty = True
        if self._batch == 0 and self.fsync:
            self._sync(fd)
            self._dirty = False
        return record

    def _open(self) -> int:
        """The live file, reopened when another process rotated (or removed) it."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if self._fd >= 0 and current == self._ino:
            return self._fd
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1  # a failed open below must not close this number again later
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o640)
        except OSError as exc:
            raise AuditError(f"audit: cannot open {self.path}: {exc.strerror}") from exc
        self._ino = os.fstat(self._fd).st_ino
        if current is None:
            _sync_dir(self.path)
        return self._fd

    def _tail_of(self, fd: int, event: dict[str, Any]) -> Tail:
        st = os.fstat(fd)
        cached = self._tail
        if cached and (cached.ino, cached.size) == (st.st_ino, st.st_size):
            return cached
        if st.st_size == 0:
            seq, digest = _last_of_rotated(self.path)
            return Tail(st.st_ino, 0, seq, digest)
        seq, digest, partial = read_tail(fd, st.st_size, self.path)
        if partial is None:
            return Tail(st.st_ino, st.st_size, seq, digest)
        if partial.cut == 0:  # nothing complete here: continue the rotated files
            seq, digest = _last_of_rotated(self.path)
        crash = not partial.ends_line and partial.size == len(partial.head) and \
            is_record_prefix(partial.head, seq + 1, digest or GENESIS)  # fmt: skip
        if not crash:
            return self._step_over(fd, st, Tail(st.st_ino, st.st_size, seq, digest), partial,
                                   event)
        return self._recover(fd, Tail(st.st_ino, partial.cut, seq, digest), partial, event)

    def _step_over(self, fd: int, st: os.stat_result, tail: Tail, junk: _Partial,
                   event: dict[str, Any]) -> Tail:
        """Bytes after the last record that no crash leaves (someone wrote them): keep them
        for ``verify`` to name, end their line, and go on linking to the last record, saying
        so in the chain. The log stays writable; the break stays visible."""
        size = st.st_size
        if not junk.ends_line:
            self._write(fd, b"\n", size)
            size += 1
        self._tail = Tail(tail.ino, size, tail.seq, tail.hash)
        note: dict[str, Any] = {k: event[k] for k in ("time", "node", "actor") if k in event}
        detail = (f"audit: {junk.size} bytes after seq {tail.seq} are not audit records "
                  f"(sha256 {junk.digest}); left in place, the chain goes on from seq "
                  f"{tail.seq}")
        self._append({**note, "action": "error", "outcome": "failed", "detail": detail})
        assert self._tail is not None
        return self._tail

    def _recover(self, fd: int, tail: Tail, partial: _Partial, event: dict[str, Any]) -> Tail:
        """A crash cut the last write short: drop the fragment and say so in the chain,
        so verify sees an intact chain and the reader sees why a record may be missing."""
        os.ftruncate(fd, partial.cut)
        self._tail = tail
        note: dict[str, Any] = {
            key: event[key] for key in ("time", "node", "actor") if key in event
        }
        detail = (
            f"audit: dropped {partial.size} bytes of a line cut short by a crash "
            f"(sha256 {partial.digest})"
        )
        self._append({**note, "action": "error", "outcome": "failed", "detail": detail})
        assert self._tail is not None
        return self._tail

    def _rotate(self, fd: int, tail: Tail) -> tuple[int, Tail]:
        """Rename the full file away; the new file's first line links to its last."""
        if self._dirty and self.fsync:
            self._sync(fd)
        os.rename(self.path, next_rotated(self.path))
        fd = self._open()
        return fd, Tail(self._ino, 0, tail.seq, tail.hash)

    def _sync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:  # the line may not be on disk: the caller must know
            raise AuditError(f"audit: cannot fsync {self.path}: {exc.strerror}") from exc

    def _write(self, fd: int, line: bytes, size: int) -> None:
        try:
            done = os.write(fd, line)
            while done < len(line):  # only on odd filesystems; still under the lock
                done += os.write(fd, line[done:])
        except OSError as exc:
            os.ftruncate(fd, size)  # no half line left behind (ENOSPC, EIO ...)
            raise AuditError(f"audit: cannot write {self.path}: {exc.strerror}") from exc


def read_tail(fd: int, size: int, path: Path) -> tuple[int, str, _Partial | None]:
    """``(seq, hash)`` of the last record line, and what follows it: a line cut short (a
    crash), or lines that are not records (junk someone appended), as one ``_Partial``.
    ``(0, "", ...)`` when the file holds no record at all."""
    start = size
    while True:
        start = max(0, size - max(_BLOCK, 2 * (size - start)))  # look twice as far back
        data = os.pread(fd, size - start, start)
        found = _last_record(data, start > 0)
        if found is not None or start == 0:
            break
        if size - start > 64 << 20:
            raise AuditError(f"audit: {path}: no audit record in its last 64 MiB; run "
                             "`convergent audit verify`")
    if found is None:
        end, seq, digest = 0, 0, ""
    else:
        end, seq, digest = start + found[0], found[1], found[2]
    rest = size - end
    if not rest:
        return seq, digest, None
    tail = os.pread(fd, rest, end)
    return seq, digest, _Partial(end, rest, line_hash(tail), tail.endswith(b"\n"),
                                 tail[:4096])


def _last_record(data: bytes, cut_first: bool) -> tuple[int, int, str] | None:
    """(offset just past its newline, seq, hash) of the last complete record line."""
    end = data.rfind(b"\n")
    while end >= 0:
        begin = data.rfind(b"\n", 0, end) + 1
        if begin == 0 and cut_first:
            return None  # that line may start before this block
        line = data[begin:end]
        head = parse_head(line)
        if head is not None:
            return end + 1, head[0], line_hash(line)
        end = begin - 1
    return None


def _last_of_rotated(path: Path) -> tuple[int, str]:
    """An empty live file continues the newest rotated file (a crash right after a
    rotation), or starts the chain."""
    done = rotated(path)
    if not done:
        return 0, ""
    newest = done[-1][1]
    fd = os.open(newest, os.O_RDONLY | os.O_CLOEXEC)
    try:
        seq, digest, _ = read_tail(fd, os.fstat(fd).st_size, newest)
    finally:
        os.close(fd)
    return seq, digest


def _sync_dir(path: Path) -> None:
    """Make a created or renamed file's name durable too."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bulk_append(path: Path, events: Iterable[dict[str, Any]]) -> int:
    """Append already-normalized events without locking or fsync: for generating big
    test and bench logs only. The result chains exactly like ``ChainWriter``'s."""
    seq, digest = 0, ""
    if path.exists() and path.stat().st_size:
        fd = os.open(path, os.O_RDONLY)
        try:
            seq, digest, _ = read_tail(fd, os.fstat(fd).st_size, path)
        finally:
            os.close(fd)
    count = 0
    with open(path, "ab", buffering=1 << 20) as fh:
        for event in events:
            seq += 1
            line = encode({"seq": seq, "prev": digest or GENESIS, **event})
            fh.write(line + b"\n")
            digest = line_hash(line)
            count += 1
    return count
