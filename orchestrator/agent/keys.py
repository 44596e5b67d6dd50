"""The cluster key: what every agent proves it holds (peer channel, replicator HMAC)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from orchestrator.errors import ConfigError

MIN_KEY = 16


def load_key(path: Path) -> bytes:
    """The file's bytes (surrounding whitespace stripped) are the key."""
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path}: key file is readable by group or others (chmod 600)")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read cluster key: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY:
        raise ConfigError(f"{path}: cluster key has {len(key)} bytes, needs at least {MIN_KEY}")
    return key


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
