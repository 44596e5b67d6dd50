"""Tamper-evident audit log: a fixed-schema, hash-chained JSON line per event.

``AuditLog`` writes (log.py -> writer.py), ``verify`` checks (chain.py), query.py
filters and merges for ``convergent audit``.
"""

from orchestrator.audit.chain import Finding, Report, verify
from orchestrator.audit.errors import AuditError
from orchestrator.audit.log import AuditLog
from orchestrator.audit.record import ACTIONS, ACTORS, OUTCOMES, AuditRecord

__all__ = [
    "ACTIONS",
    "ACTORS",
    "OUTCOMES",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "Finding",
    "Report",
    "verify",
]
