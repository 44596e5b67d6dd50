"""Text forms of records: the ``show`` table, the migration timeline, CSV rows.

The table has fixed-width columns so it streams (1M rows need no width pass) and
follows; what varies per action goes into a trailing key=value column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from orchestrator.audit.record import FIELDS, TIME_FORMAT

HEADER = f"{'TIME (UTC)':<23}  {'NODE':<10} {'ACTOR':<5}  {'ACTION':<19} {'OUTCOME':<7}  DETAILS"


def short_time(stamp: str) -> str:
    """``2024-05-01T03:12:00.123456Z`` -> ``2024-05-01 03:12:00.123``."""
    return stamp[:23].replace("T", " ")


def ms(value: float) -> str:
    return f"{value / 1000:.3f}s" if value >= 1000 else f"{value:.1f}ms"


def details(record: dict[str, Any]) -> str:
    parts = []
    if "guest" in record:
        parts.append(f"guest={record['guest']}")
    if record.get("addresses"):
        parts.append("ip=" + ",".join(record["addresses"]))
    if "from_node" in record or "to_node" in record:
        parts.append(f"{record.get('from_node', '?')}->{record.get('to_node', '?')}")
    for key, label in (("epoch", "epoch"), ("entries", "entries"), ("migration", "mig")):
        if key in record:
            parts.append(f"{label}={record[key]}")
    if "duration_ms" in record:
        parts.append(f"took={ms(record['duration_ms'])}")
    if record.get("detail"):
        parts.append(repr(record["detail"]))
    return " ".join(parts)


def table_row(record: dict[str, Any]) -> str:
    return (
        f"{short_time(record.get('time', '?')):<23}  {record.get('node', '?'):<10} "
        f"{record.get('actor', '?'):<5}  {record.get('action', '?'):<19} "
        f"{record.get('outcome', '?'):<7}  {details(record)}"
    ).rstrip()


def timeline(migration: str, records: list[dict[str, Any]], width: int = 30) -> list[str]:
    """One migration's phases in time order: offset from the first, duration (as the
    phase reported it, else the gap to the next phase) and a proportional bar."""
    if not records:
        return [f"migration {migration}: no records"]
    records = sorted(records, key=lambda r: (r["time"], r["seq"]))
    starts = [_seconds(r["time"]) for r in records]
    spans = [
        r["duration_ms"] if "duration_ms" in r else (starts[i + 1] - starts[i]) * 1000
        for i, r in enumerate(records[:-1])
    ] + [records[-1].get("duration_ms", 0.0)]
    total = max((starts[-1] - starts[0]) * 1000, max(spans), 1e-9)
    lines = [_timeline_title(migration, records, total)]
    lines.append(
        f"  {'TIME (UTC)':<23}  {'+OFFSET':>9}  {'NODE':<10} {'PHASE':<20} "
        f"{'OUTCOME':<7}  {'DURATION':>9}  "
    )
    for record, start, span in zip(records, starts, spans, strict=True):
        bar = "#" * max(1, round(width * span / total)) if span > 0 else ""
        lines.append(
            f"  {short_time(record['time']):<23}  {f'+{start - starts[0]:.3f}s':>9}  "
            f"{record['node']:<10} {record['action']:<20} {record['outcome']:<7}  "
            f"{ms(span):>9}  {bar}" + (f"  {record['detail']!r}" if record.get("detail") else "")
        )
    return [line.rstrip() for line in lines]


def _timeline_title(migration: str, records: list[dict[str, Any]], total: float) -> str:
    guest = next((r["guest"] for r in records if "guest" in r), "?")
    src = next((r["from_node"] for r in records if "from_node" in r), "?")
    dst = next((r["to_node"] for r in records if "to_node" in r), "?")
    return (
        f"migration {migration}: guest {guest}, {src} -> {dst}, {len(records)} records, "
        f"{ms(total)}, {_verdict(records)}"
    )


def _verdict(records: list[dict[str, Any]]) -> str:
    if any(r["action"] == "migration.abort" for r in records):
        return "aborted"
    if any(r["outcome"] != "ok" for r in records):
        return "failed"
    if any(r["action"] == "migration.finalize" for r in records):
        return "completed"
    return "in progress"


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=UTC).timestamp()


def csv_header() -> str:
    return _csv_line(list(FIELDS))


def csv_row(record: dict[str, Any]) -> str:
    values = []
    for key in FIELDS:
        value = record.get(key)
        values.append(
            " ".join(value) if isinstance(value, list) else "" if value is None else value
        )
    return _csv_line(values)


def _csv_line(values: Iterable[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()
