"""What the replicator must remember across its own restart: the newest boot id it has
seen of every peer (so a replay of a peer's earlier life is refused even by a receiver
that just started) and its own last boot id (so its next one is greater even if the
clock stepped back, or peers that remember it would refuse it).

A small JSON file, replaced atomically (write, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.statefile import write_atomic


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
    data = json.dumps({"boot": state.boot, "peers": {str(k): v for k, v in state.peers.items()}})
    write_atomic(path, data)
