"""The cluster key: what every agent proves it holds (peer channel, replicator HMAC)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from orchestrator.errors import ConfigError
from orchestrator.keyfile import read_key


def load_key(path: Path) -> bytes:
    """The file's bytes (surrounding whitespace stripped) are the key."""
    return read_key(path, "cluster key", ConfigError)


def write_new_key(path: Path) -> bytes:
    """A fresh random key (hex text, 256 bits), written 0600 and atomically."""
    key = secrets.token_hex(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    tmp.rename(path)
    return key
