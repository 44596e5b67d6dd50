"""Where a chain lives on disk: the live file, its rotated predecessors, its lock.

Rotation renames ``audit.log`` to ``audit.log.N`` with N one more than the highest
existing number, so **higher numbers are newer** (``.1`` is the oldest) and a rotation
is one rename, never a cascade that a concurrent reader could catch half-done. A
chain is read as ``audit.log.1, audit.log.2, ..., audit.log``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from orchestrator.audit.errors import AuditError

DEFAULT_PATH = Path("/var/log/convergent/audit.log")
ENV_PATH = "CONVERGENT_AUDIT_LOG"
_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<n>\d+)$")


class Chain(NamedTuple):
    """One node's chain: ``live`` names it, ``files`` are oldest first."""

    live: Path
    files: list[Path]


def default_path() -> Path:
    return Path(os.environ.get(ENV_PATH) or DEFAULT_PATH)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def rotated(path: Path) -> list[tuple[int, Path]]:
    """``(n, path)`` of the rotated files of ``path``, oldest first."""
    found = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        match = _ROTATED.match(name)
        if match and match["base"] == path.name:
            found.append((int(match["n"]), path.parent / name))
    return sorted(found)


def next_rotated(path: Path) -> Path:
    done = rotated(path)
    return path.with_name(f"{path.name}.{done[-1][0] + 1 if done else 1}")


def chain_files(path: Path) -> list[Path]:
    files = [p for _, p in rotated(path)]
    if path.exists():
        files.append(path)
    return files


def _chains_in(directory: Path) -> list[Path]:
    """Live paths of the chains under a directory (e.g. one subdirectory per node):
    files named ``*.log`` or ``*.log.N``, so exports and lock files lying beside them
    are not taken for logs."""
    bases = set()
    for path in directory.rglob("*.log*"):
        match = _ROTATED.match(path.name)
        base = path.with_name(match["base"]) if match else path
        if base.name.endswith(".log") and not base.name.startswith(".") and path.is_file():
            bases.add(base)
    return sorted(bases)


def discover(paths: Iterable[Path]) -> list[Chain]:
    """Chains named by files or directories, each once. A missing log is an error,
    not an empty view, so a typo does not pass for a quiet night."""
    chains: dict[Path, Chain] = {}
    for path in paths:
        lives = _chains_in(path) if path.is_dir() else [path]
        found = [Chain(live, files) for live in lives if (files := chain_files(live))]
        if not found:
            raise AuditError(f"no audit log at {path} (use --log or ${ENV_PATH})")
        for chain in found:
            chains.setdefault(chain.live.resolve(), chain)
    return list(chains.values())
