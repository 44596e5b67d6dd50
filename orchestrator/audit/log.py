"""``AuditLog``: what the rest of the code calls to write an audit record.

structlog does the event side: ``bind`` carries context (node, actor, and e.g. a
migration's guest and id across its phases), the processor chain checks the action,
stamps the time and shapes the fixed-schema dict, and the final "logger" is the
``ChainWriter``, which links and appends the line. Usage::

    audit = AuditLog("/var/log/convergent/audit.log", node="n1", actor="agent")
    mig = audit.bind(migration="m-42", guest="web1", from_node="n1", to_node="n2")
    mig.record("migration.prepare", epoch=7)
    with mig.timed("migration.cutover") as extra:   # duration_ms, ok/failed + detail
        extra["entries"] = handover()
    await mig.arecord("migration.finalize")         # fsync off the event loop
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

from structlog import BoundLoggerBase
from structlog.processors import TimeStamper
from structlog.typing import EventDict, Processor, WrappedLogger

from orchestrator.audit.errors import AuditError
from orchestrator.audit.files import default_path
from orchestrator.audit.record import (
    ACTIONS,
    ACTORS,
    DEFAULT_OUTCOME,
    EVENT_FIELDS,
    OUTCOMES,
    TIME_FORMAT,
    AuditRecord,
    check_choice,
    normalize_event,
)
from orchestrator.audit.writer import DEFAULT_MAX_BYTES, ChainWriter


def _action(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """structlog's ``event`` is our ``action``; check the closed sets, fill the outcome."""
    action = check_choice("action", event.pop("event"), ACTIONS)
    event["action"] = action
    event["actor"] = check_choice("actor", event.get("actor"), ACTORS)
    event["outcome"] = check_choice(
        "outcome", event.get("outcome") or DEFAULT_OUTCOME.get(action, "ok"), OUTCOMES
    )
    return event


def _schema(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    return normalize_event(dict(event))


PROCESSORS: list[Processor] = [
    _action,
    TimeStamper(fmt=TIME_FORMAT, utc=True, key="time"),  # fixed width: sorts as text
    _schema,
]


class _Bound(BoundLoggerBase):
    """A structlog wrapper with one method, so nothing depends on global config."""

    def record(self, action: str, **fields: Any) -> Any:
        return self._proxy_to_logger("record", action, **fields)


class AuditLog:
    """Writes audit records for one node and actor; cheap to ``bind``, thread- and
    process-safe (see ``ChainWriter``)."""

    def __init__(
        self,
        path: Path | str | None = None,
        node: str | None = None,
        actor: str = "agent",
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: bool = True,
        writer: ChainWriter | None = None,
        key: bytes | None = None,
    ) -> None:
        """``key``: the audit key; every line then carries a mac only its holder can make."""
        self.writer = writer or ChainWriter(
            Path(path) if path else default_path(), max_bytes=max_bytes, fsync=fsync, key=key
        )
        actor = check_choice("actor", actor, ACTORS)
        context = {"node": node or socket.gethostname(), "actor": actor}
        self._log = _Bound(self.writer, PROCESSORS, context)
        self._listeners: list[Callable[[AuditRecord], None]] = []

    def subscribe(self, listener: Callable[[AuditRecord], None]) -> None:
        """Call ``listener`` with every record written through this log or its binds, after
        it is on disk (metrics count them). A listener must be quick and must not raise."""
        self._listeners.append(listener)

    @property
    def path(self) -> Path:
        return self.writer.path

    def bind(self, **fields: Any) -> AuditLog:
        """The same log with more context, e.g. a migration's id, guest and nodes."""
        unknown = set(fields) - set(EVENT_FIELDS)
        if unknown:
            raise AuditError(f"audit: unknown field(s) {', '.join(sorted(unknown))}")
        bound = object.__new__(AuditLog)
        bound.writer = self.writer
        bound._log = self._log.bind(**fields)
        bound._listeners = self._listeners
        return bound

    def record(
        self,
        action: str,
        *,
        outcome: str | None = None,
        guest: str | None = None,
        addresses: str | Iterable[str] | None = None,
        from_node: str | None = None,
        to_node: str | None = None,
        epoch: int | None = None,
        entries: int | None = None,
        duration_ms: float | None = None,
        migration: str | None = None,
        detail: str | None = None,
    ) -> AuditRecord:
        """Append one record (fsync'd unless in ``batch()``) and return it as written."""
        given = {
            "outcome": outcome,
            "guest": guest,
            "addresses": addresses,
            "from_node": from_node,
            "to_node": to_node,
            "epoch": epoch,
            "entries": entries,
            "duration_ms": duration_ms,
            "migration": migration,
            "detail": detail,
        }
        # None means "not given here", so bound context is not overwritten by it.
        fields = {key: value for key, value in given.items() if value is not None}
        written = cast(AuditRecord, self._log.record(action, **fields))
        for listener in self._listeners:
            listener(written)
        return written

    async def arecord(self, action: str, **fields: Any) -> AuditRecord:
        """``record`` in a worker thread: the event loop never waits on the lock or fsync."""
        return await asyncio.to_thread(self.record, action, **fields)

    @contextmanager
    def timed(self, action: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Record ``action`` when the block ends, with its duration; an exception makes
        it ``failed`` with the exception as detail (and is re-raised). Fields added to
        the yielded dict go into the record."""
        extra: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            yield extra
        except BaseException as exc:
            elapsed = (time.perf_counter() - start) * 1000
            failure = {"outcome": "failed", "detail": f"{type(exc).__name__}: {exc}"}
            self.record(action, **{**fields, **extra, **failure, "duration_ms": elapsed})
            raise
        elapsed = (time.perf_counter() - start) * 1000
        self.record(action, **{**fields, **extra, "duration_ms": elapsed})

    def batch(self) -> AbstractContextManager[None]:
        """Group commit: records inside share one lock hold and one fsync."""
        return self.writer.batch()

    def close(self) -> None:
        self.writer.close()
