"""What the replicator must remember across its own restart: the newest boot id it has
seen of every peer (so a replay of a peer's earlier life is refused even by a receiver
that just started) and its own last boot id (so its next one is greater even if the
clock stepped back, or peers that remember it would refuse it).

A small JSON file, replaced atomically (write, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SyncState:
    boot: int = 0  # this node's last boot id
    peers: dict[int, int] = field(default_factory=dict)  # tag -> newest boot id seen


def load_state(path: Path) -> SyncState:
    """The state a previous life left, or a fresh one (no file, or one we cannot read:
    then we know no more than a first start does)."""
    try:
        raw = json.loads(path.read_text())
        return SyncState(int(raw.get("boot", 0)),
                         {int(k): int(v) for k, v in dict(raw.get("peers", {})).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return SyncState()


def save_state(path: Path, state: SyncState) -> None:
    """Raises OSError if it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"boot": state.boot, "peers": {str(k): v for k, v in state.peers.items()}})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
