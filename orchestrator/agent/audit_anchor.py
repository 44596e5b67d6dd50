"""Anchoring the audit chain's head in the store, so a deleted tail or a chain rewritten
with recomputed hashes shows: ``convergent audit verify`` checks the log against it.

Once a second at most, off the writer's path: the writer's cached head is read (no lock,
no I/O) and put only when it moved. Anchoring is best effort (a store that is down is
retried next tick): it must never slow or fail an audit write.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from orchestrator.audit.writer import ChainWriter
from orchestrator.store.base import AuditAnchor, Store

INTERVAL_S = 1.0
log = structlog.get_logger("convergent.agent.audit_anchor")


class AuditAnchoring:
    def __init__(self, node: str, writer: ChainWriter, store: Store,
                 interval: float = INTERVAL_S) -> None:
        self.node, self.writer, self.store, self.interval = node, writer, store, interval
        self.path = str(writer.path.resolve())
        self.sent: tuple[int, str] | None = None
        self.anchored = 0  # puts done (status / tests)
        self._warned = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("audit.anchor_failed", error=f"{type(exc).__name__}: {exc}")

    async def flush(self) -> None:
        """Put the writer's head if it moved since the last put."""
        head = self.writer.head
        if head is None or head == self.sent:
            return
        ours = AuditAnchor(self.node, self.path, head[0], head[1], time.time())
        held = await self.store.anchor_audit(ours)
        self.sent, self.anchored = head, self.anchored + 1
        if (held.path, held.seq, held.hash) != (ours.path, *head) and not self._warned:
            self._warned = True  # once: it stays so until an operator acts
            log.warning("audit.anchor_ahead", path=self.path, log_seq=head[0],
                        anchored_seq=held.seq,
                        hint="the log lost lines or was rewritten: convergent audit verify")
