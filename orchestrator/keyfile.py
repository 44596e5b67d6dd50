"""Reading a secret kept in a file of its own (the cluster key, the audit key): mode 0600,
its bytes with surrounding whitespace stripped, at least ``MIN_KEY`` of them."""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import ConvergentError

MIN_KEY = 16


def read_key(path: Path, what: str, error: type[ConvergentError]) -> bytes:
    """The key at ``path``; ``error`` with one line naming the file and ``what`` if it is
    unreadable, readable by others, or too short."""
    try:
        if path.stat().st_mode & 0o077:
            raise error(f"{path}: {what} is readable by group or others (chmod 600)")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY:
        raise error(f"{path}: {what} has {len(key)} bytes, needs at least {MIN_KEY}")
    return key
