"""Filtering and merging records for ``audit show/follow/export``.

A filter first rejects raw lines by substring (``"guest":"web1"`` must appear
somewhere in the line) and by the time slice at a known offset; only the survivors
are parsed as JSON and matched exactly. Several chains (nodes) merge by time.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.audit.chain import iter_blocks
from orchestrator.audit.errors import AuditError
from orchestrator.audit.files import Chain
from orchestrator.audit.record import TIME_FORMAT, TIME_LEN

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TIME_KEY = b'"time":"'


def parse_when(text: str, now: datetime | None = None) -> str:
    """An ISO 8601 time (naive means UTC) or an age like ``10m``/``2h``/``3d``, as the
    fixed-width UTC text the log uses, so comparing strings compares times."""
    now = now or datetime.now(UTC)
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        when = now - timedelta(**{_UNITS[match[2]]: float(match[1])})
    elif text == "now":
        when = now
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise AuditError(
                f"bad time {text!r}: use ISO 8601 (2024-05-01T03:12:00Z) or an age (10m, 2h, 3d)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime(TIME_FORMAT)


def parse_ip(text: str) -> IPNet:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AuditError(f"bad address {text!r}: use an IP or a prefix (10.5.5.0/24)") from None


def _needle(key: str, value: str) -> bytes:
    return f'"{key}":'.encode() + json.dumps(value).encode()


@dataclass(frozen=True)
class Filter:
    """All given criteria must hold. ``actions`` are prefixes on dot boundaries:
    ``migration`` matches ``migration.cutover``; ``ip`` matches an address or a prefix."""

    guest: str | None = None
    ip: IPNet | None = None
    node: str | None = None
    actions: tuple[str, ...] = ()
    since: str | None = None
    until: str | None = None
    migration: str | None = None
    needles: tuple[bytes, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(a.rstrip(".*") for a in self.actions if a))
        object.__setattr__(self, "needles", tuple(self._needles()))

    def _needles(self) -> Iterator[bytes]:
        for key in ("guest", "node", "migration"):
            value = getattr(self, key)
            if value is not None:
                yield _needle(key, value)
        if len(self.actions) == 1:
            yield b'"action":"' + self.actions[0].encode()
        if self.ip is not None:
            single = self.ip.num_addresses == 1
            yield f'"{self.ip.network_address}"'.encode() if single else b'"addresses":'

    def match_raw(self, line: bytes) -> bool:
        """Cheap rejection before JSON: may pass a line that ``match`` refuses."""
        for needle in self.needles:
            if needle not in line:
                return False
        if self.since or self.until:
            at = line.find(_TIME_KEY) + len(_TIME_KEY)
            stamp = line[at : at + TIME_LEN].decode("ascii", "replace")
            if (self.since and stamp < self.since) or (self.until and stamp > self.until):
                return False
        return True

    def match(self, record: dict[str, Any]) -> bool:
        for key in ("guest", "node", "migration"):
            wanted = getattr(self, key)
            if wanted is not None and record.get(key) != wanted:
                return False
        if self.actions and not any(_has_prefix(record.get("action", ""), a) for a in self.actions):
            return False
        if self.ip is not None and not _has_address(record.get("addresses") or (), self.ip):
            return False
        stamp = record.get("time", "")
        return not ((self.since and stamp < self.since) or (self.until and stamp > self.until))


def _has_prefix(action: str, prefix: str) -> bool:
    return action == prefix or action.startswith(prefix + ".")


def _has_address(addresses: Iterable[str], net: IPNet) -> bool:
    for text in addresses:
        try:
            if ipaddress.ip_address(text) in net:
                return True
        except ValueError:
            continue
    return False


class Row(NamedTuple):
    """One matching record; ``raw`` is the line as stored (for --json and export)."""

    time: str
    node: str
    seq: int
    record: dict[str, Any]
    raw: bytes
    where: tuple[Path, int]


@dataclass
class Scanner:
    """Reads chains through a filter; counts lines it could not read instead of
    failing (``verify`` is the place that judges them)."""

    flt: Filter
    unreadable: int = 0

    def chain(self, chain: Chain) -> Iterator[Row]:
        for path in self._files_in_range(chain.files):
            for first, block, complete in iter_blocks(path):
                if complete:  # a cut-short last line is verify's business
                    yield from self._block(path, first, block)

    def _block(self, path: Path, first: int, block: list[bytes]) -> Iterator[Row]:
        match_raw, match = self.flt.match_raw, self.flt.match
        for offset, raw in enumerate(block):
            if match_raw(raw):
                row = self.parse(raw, (path, first + offset))
                if row is not None and match(row.record):
                    yield row

    def lines(self, path: Path, lines: Iterable[tuple[int, bytes, bool]]) -> Iterator[Row]:
        flt = self.flt
        for lineno, raw, complete in lines:
            if not complete or not flt.match_raw(raw):
                continue
            row = self.parse(raw, (path, lineno))
            if row is not None and flt.match(row.record):
                yield row

    def parse(self, raw: bytes, where: tuple[Path, int]) -> Row | None:
        try:
            record = json.loads(raw)
            return Row(record["time"], record["node"], record["seq"], record, raw, where)
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            return None

    def _files_in_range(self, files: list[Path]) -> Iterator[Path]:
        """Skip whole rotated files outside --since/--until by their first lines."""
        if not (self.flt.since or self.flt.until):
            yield from files
            return
        starts = [first_time(path) for path in files]
        for index, path in enumerate(files):
            start = starts[index]
            if self.flt.until and start and start > self.flt.until:
                return
            later = next((s for s in starts[index + 1 :] if s), None)
            if self.flt.since and later and later < self.flt.since:
                continue
            yield path

    def merged(self, chains: Iterable[Chain]) -> Iterator[Row]:
        """One time-ordered stream over several nodes (each chain is in seq order)."""
        streams = [self.chain(chain) for chain in chains]
        if len(streams) == 1:
            return streams[0]
        return heapq.merge(*streams, key=lambda row: (row.time, row.node, row.seq))


def first_time(path: Path) -> str | None:
    with open(path, "rb") as fh:
        line = fh.readline(1 << 16)
    at = line.find(_TIME_KEY)
    if at < 0:
        return None
    at += len(_TIME_KEY)
    return line[at : at + TIME_LEN].decode("ascii", "replace")
