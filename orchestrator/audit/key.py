"""The audit key: its own secret (not the cluster key, which every agent and the replicator
hold on the wire), so a keyed chain's lines can be checked by whoever is given this file
and forged by no one else. 32 random bytes as hex, mode 0600, created once: concurrent
first starts (a lab's agents) agree on one key because it is linked into place, never
overwritten."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from orchestrator.audit.errors import AuditError
from orchestrator.keyfile import read_key


def load_audit_key(path: Path) -> bytes:
    return read_key(path, "audit key", AuditError)


def audit_key(path: Path) -> bytes:
    """The key at ``path``, made first if there is none."""
    if not path.exists():
        _create(path)
    return load_audit_key(path)


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first: keep theirs
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except OSError as exc:
        raise AuditError(f"{path}: cannot create the audit key: {exc.strerror or exc}") from None
