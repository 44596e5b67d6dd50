"""``tail -f`` for a chain: new complete lines as they land, across rotations."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.audit.chain import iter_lines
from orchestrator.audit.files import rotated


class Follower:
    """Polls one live file. A rotation renames it away: the old file is drained
    before the new one is opened, so no line is lost or shown twice; a file that
    shrank (replaced or truncated) is read again from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._ino = -1
        self._pos = 0
        self._rest = b""
        self._lineno = 0
        self._open()

    def _open(self) -> bool:
        fd = self._open_live()
        if fd < 0:
            return False
        self._use(fd)
        return True

    def _open_live(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1

    def _use(self, fd: int) -> None:
        self.close()
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        self._pos, self._rest, self._lineno = 0, b"", 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def poll(self) -> list[tuple[int, bytes]]:
        """``(lineno, line)`` of the complete lines written since the last poll."""
        lines = self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines
        if st.st_ino == self._ino:
            if st.st_size < self._pos and self._open():  # truncated: read it again
                lines += self._drain()
            return lines
        lines += self._drain()  # lines appended just before the rename
        # open the new live file BEFORE listing the rotated ones: a rotation between the
        # two then shows as a rotated file we stop at (its lines come from our fd), never
        # as one we skip (the writer may rotate again at any moment of this poll)
        fd = self._open_live()
        if fd < 0:
            return lines  # mid-rotation: the next poll finds the new file
        lines += self._skipped_files(until=os.fstat(fd).st_ino)
        self._use(fd)
        return lines + self._drain()

    def _skipped_files(self, until: int) -> list[tuple[int, bytes]]:
        """Files rotated in and out again since the last poll (a burst of writes): those
        after ours, up to the one now open (``until``), when it was rotated too."""
        lines: list[tuple[int, bytes]] = []
        newer = False
        for _, path in rotated(self.path):
            try:
                ino = os.stat(path).st_ino
                if ino == until:
                    break
                if newer:
                    lines += [(n, raw) for n, raw, _ in iter_lines(path)]
                elif ino == self._ino:
                    newer = True
            except FileNotFoundError:
                continue
        return lines

    def _drain(self) -> list[tuple[int, bytes]]:
        if self._fd < 0:
            return []
        data = b""
        while chunk := os.pread(self._fd, 1 << 20, self._pos + len(data)):
            data += chunk
        if not data:
            return []
        self._pos += len(data)
        parts = (self._rest + data).split(b"\n")
        self._rest = parts.pop()  # a line still being written waits for its newline
        out = []
        for part in parts:
            self._lineno += 1
            out.append((self._lineno, part))
        return out
