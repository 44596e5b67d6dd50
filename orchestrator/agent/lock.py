"""One agent per node: an exclusive ``flock`` on ``run_dir/agent-NODE.lock``, taken before
the agent touches anything (store, kernel, sockets).

The kernel drops a flock when its holder dies, SIGKILL included, so a crashed agent never
leaves a stale lock behind and nothing has to guess whether a pid is still alive. The file
itself is never removed (unlinking a lock file lets a third process lock a fresh inode
while the second still holds the old one); it only carries the holder's pid, for the
refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import ConvergentError


class AgentRunning(ConvergentError):
    """Another agent holds this node's lock."""


def lock_path(run_dir: Path, node: str) -> Path:
    return run_dir / f"agent-{node}.lock"


@contextlib.contextmanager
def agent_lock(run_dir: Path, node: str) -> Iterator[Path]:
    """Hold the node's agent lock for the block; refuse at once if someone else has it."""
    path = lock_path(run_dir, node)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConvergentError(f"{path}: cannot open the agent lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise AgentRunning(f"another agent for node {node} is running (pid {holder}; "
                               f"lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
