"""Audit errors: readable one-liners the CLI prints as they are."""

from __future__ import annotations

from orchestrator.errors import ConvergentError


class AuditError(ConvergentError):
    """A record that does not fit the schema, or a log that cannot be read or written."""
