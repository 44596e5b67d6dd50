"""The fixed schema of one audit record and its exact encoding on disk.

A record is one JSON object on one line. The key order is fixed and ``seq`` and
``prev`` always come first, so readers can check the chain with byte comparisons
instead of parsing JSON (see ``chain.py``). Optional fields are omitted when empty:
the set of keys and their types is fixed, a missing key means null.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable
from typing import Any, TypedDict

from orchestrator.audit.errors import AuditError

ACTIONS = frozenset(
    {
        "guest.start",
        "guest.stop",
        "migration.prepare",
        "migration.precopy",
        "migration.cutover",
        "migration.finalize",
        "migration.abort",
        "migration.leave",
        "ownership.claim",
        "ownership.release",
        "failover.begin",
        "failover.adopt",
        "failover.commit",
        "failover.program",
        "failover.release",
        "failover.end",
        "failover.back",
        "failover.fenced",
        "failback.begin",
        "failback.commit",
        "failback.release",
        "failback.adopt",
        "failback.retire",
        "failback.end",
        "ruleset.apply",
        "sync.resync",
        "sync.commit",
        "agent.start",
        "agent.stop",
        "agent.reload",
        "agent.recover",
        "hook.veto",
        "hook.spooled",
        "hook.report",
        "hook.rejected",
        "forward.send",
        "forward.serve",
        "error",
    }
)
ACTORS = frozenset({"hook", "agent", "cli", "user"})
# degraded: done, but without part of the handover (e.g. the source agent was unreachable)
OUTCOMES = frozenset({"ok", "failed", "refused", "degraded"})
# Actions whose natural outcome is not "ok".
DEFAULT_OUTCOME = {"hook.veto": "refused", "error": "failed"}

# The on-disk key order. ``seq``/``prev`` are added by the writer, the rest by log.py.
CHAIN_FIELDS = ("seq", "prev")
EVENT_FIELDS = (
    "time",
    "node",
    "actor",
    "action",
    "outcome",
    "guest",
    "addresses",
    "from_node",
    "to_node",
    "epoch",
    "entries",
    "duration_ms",
    "migration",
    "detail",
)
# a keyed chain's lines end with ``mac``: HMAC-SHA256/128 under the audit key of the line
# as it would read without that field (``seal``), so no one without the key can forge one
MAC_FIELD = "mac"
FIELDS = (*CHAIN_FIELDS, *EVENT_FIELDS, MAC_FIELD)
REQUIRED = ("seq", "prev", "time", "node", "actor", "action", "outcome")

# ``prev`` of the first line of a chain.
GENESIS = "genesis"
# Time format: fixed width, so string order is time order.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
TIME_LEN = len("2024-01-01T00:00:00.000000Z")


class AuditRecord(TypedDict, total=False):
    seq: int
    prev: str
    time: str
    node: str
    actor: str
    action: str
    outcome: str
    guest: str
    addresses: list[str]
    from_node: str
    to_node: str
    epoch: int
    entries: int
    duration_ms: float
    migration: str
    detail: str


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def encode(record: dict[str, Any]) -> bytes:
    """The exact bytes of a line, without the newline. Compact and ASCII-only, so a
    line never contains a raw newline and its hash does not depend on a locale."""
    return _ENCODER.encode(record).encode("ascii")


_MAC_AT = b',"mac":"'
_MAC_HEX = 32


def seal(line: bytes, key: bytes | None) -> bytes:
    """The line with its ``mac`` appended (unchanged without a key)."""
    if key is None:
        return line
    mac = hmac.digest(key, line, "sha256")[:16].hex().encode()
    return line[:-1] + _MAC_AT + mac + b'"}'


def mac_ok(line: bytes, key: bytes) -> bool | None:
    """None: the line carries no mac; else whether it checks out under ``key``. The field
    is found from the end: inside a JSON string a quote is escaped, so ``,"mac":"`` occurs
    literally only as the key itself."""
    at = len(line) - len(_MAC_AT) - _MAC_HEX - 2
    if at < 0 or line[at : at + len(_MAC_AT)] != _MAC_AT or not line.endswith(b'"}'):
        return None
    want = hmac.digest(key, line[:at] + b"}", "sha256")[:16].hex().encode()
    return hmac.compare_digest(line[at + len(_MAC_AT) : -2], want)


def line_hash(line: bytes) -> str:
    """What the next line stores in ``prev``: sha256 over this line's bytes, newline
    excluded."""
    return hashlib.sha256(line).hexdigest()


def check_choice(name: str, value: Any, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise AuditError(f"audit: {name} {value!r} is not one of {', '.join(sorted(allowed))}")
    return str(value)


def normalize_addresses(value: str | Iterable[str] | None) -> list[str] | None:
    """IP addresses in canonical text form, so ``--ip`` matches however they were
    written (``10.5.5.201``, ``::ffff:1`` ...)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    try:
        return [_canonical_ip(str(item)) for item in items]
    except ValueError as exc:
        raise AuditError(f"audit: bad address in {items!r}: {exc}") from exc


@functools.lru_cache(maxsize=4096)  # a node logs the same few hundred addresses
def _canonical_ip(text: str) -> str:
    return str(ipaddress.ip_address(text.split("/")[0]))


def normalize_event(fields: dict[str, Any]) -> dict[str, Any]:
    """Validated event fields in on-disk order, with empty ones dropped."""
    unknown = set(fields) - set(EVENT_FIELDS)
    if unknown:
        raise AuditError(f"audit: unknown field(s) {', '.join(sorted(unknown))}")
    out = dict(fields)
    out["addresses"] = normalize_addresses(out.get("addresses"))
    for key in ("epoch", "entries"):
        if out.get(key) is not None:
            out[key] = int(out[key])
    if out.get("duration_ms") is not None:
        out["duration_ms"] = round(float(out["duration_ms"]), 3)
    for key in ("guest", "from_node", "to_node", "migration", "detail", "node"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return {key: out[key] for key in EVENT_FIELDS if out.get(key) is not None}


def validate(record: dict[str, Any]) -> str | None:
    """Why a parsed record does not fit the schema, or None. Used for the one line a
    hash chain cannot vouch for: the last one."""
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    unknown = set(record) - set(FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(sorted(unknown))}"
    if record["action"] not in ACTIONS:
        return f"unknown action {record['action']!r}"
    if record["actor"] not in ACTORS:
        return f"unknown actor {record['actor']!r}"
    if record["outcome"] not in OUTCOMES:
        return f"unknown outcome {record['outcome']!r}"
    if not isinstance(record["time"], str) or len(record["time"]) != TIME_LEN:
        return f"bad time {record['time']!r}"
    return None
