"""The one logging configuration of every ``convergent`` process.

structlog renders; the standard library's ``logging`` records (asyncio's "Task exception
was never retrieved", libraries) go through the same processors, so a process writes one
format. Lines go to stderr: journald captures it under systemd, the terminal shows it.

- ``json``: one JSON object per line: ``timestamp`` (UTC, ISO 8601), ``level``,
  ``logger``, ``event`` and the event's fields as JSON values (addresses as strings).
- ``text``: the same keys as ``key=value`` (logfmt) for people at a terminal.
- ``auto``: json when stderr is not a terminal or when ``JOURNAL_STREAM`` is set (systemd
  connected us to the journal), else text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "text")
KEY_ORDER = ["timestamp", "level", "logger", "event"]


def choose_format(requested: str, isatty: bool, env: Mapping[str, str]) -> str:
    """``json`` or ``text`` for a requested ``auto``/``json``/``text``."""
    if requested not in FORMATS:
        raise ValueError(f"log format {requested!r} is not one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    return "json" if env.get("JOURNAL_STREAM") or not isatty else "text"


def _shared() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def _ordered(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """timestamp, level, logger, event first: a person reading ``journalctl -o cat`` finds
    them where they expect."""
    head = {k: event.pop(k) for k in KEY_ORDER if k in event}
    return {**head, **event}


def _json_values(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Structured values as JSON in text lines too, never Python reprs."""
    for k, v in event.items():
        if isinstance(v, dict | list | tuple | set | frozenset):
            event[k] = json.dumps(sorted(v) if isinstance(v, set | frozenset) else v,
                                  default=str, separators=(",", ":"))
    return event


def _renderers(fmt: str) -> list[Processor]:
    if fmt == "json":
        return [_ordered, structlog.processors.JSONRenderer(default=_jsonable)]
    return [_json_values,
            structlog.processors.LogfmtRenderer(key_order=KEY_ORDER, drop_missing=True)]


def _jsonable(v: Any) -> Any:
    return sorted(v, key=str) if isinstance(v, set | frozenset) else str(v)


def configure(level: str = "info", fmt: str = "auto", stream: IO[str] | None = None) -> str:
    """Set up structlog and ``logging`` for this process; returns the format chosen."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    chosen = choose_format(fmt, _isatty(out), os.environ)
    numeric = logging.getLevelNamesMapping()[level.upper()]

    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *_renderers(chosen)],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_shared(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # a later configure() (tests, reload) still applies
    )
    return chosen


def is_journal(stream: Any, env: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is systemd's journal stream (``$JOURNAL_STREAM`` is its
    ``device:inode``), so a plain line written there would sit among the JSON ones."""
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return env.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
