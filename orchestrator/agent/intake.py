"""The agent's intake of guest events: hook calls, the spool, the hypervisor's stream.

A hook forwards its raw call (``orchestrator.hooks.hookclient``); here the node's adapter
reads it (``parse_hook``), the store gives the guest's facts, and the pure table
(``events.decide``) says what to run. Every outcome is counted; what the table reports
(an unknown guest, a conflict) and every call that cannot be read (unknown hook
arguments, a malformed call, a spool file that is truncated or not JSON) is also kept in
``status`` and written to the audit log (one record per kind per ``AUDIT_EVERY_S``, with
the count of those in between), and never stops the agent or blocks the hypervisor.

The spool: a hook that found the agent absent, hung or unwilling wrote its call there.
The agent replays it in name (time) order at start and on each reconcile pass, deletes
what it took, keeps (and reports once) what failed, and renames an unreadable file to
``*.bad``. A replayed call is judged against the ownership the store had *before* the
replay (``since``), so a replay never undoes what other nodes did meanwhile, and never
mistakes what its own earlier calls just did for newer news.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from orchestrator.agent.events import (
    Decision,
    GuestFacts,
    MigrationFacts,
    Op,
    Outcome,
    decide,
    reported_at,
)
from orchestrator.agent.guests import GuestBook, UnknownGuest
from orchestrator.audit.log import AuditLog
from orchestrator.config.schema import Guest
from orchestrator.errors import ConvergentError, StoreError
from orchestrator.hypervisor import EventKind, GuestEvent, HookCall, Hypervisor
from orchestrator.store.base import Ownership, Store

log = structlog.get_logger("convergent.intake")
SPOOL_SUFFIX = ".call.json"  # as orchestrator.hooks.hookclient writes them
SEEN_CALLS = 4096  # call ids remembered: a call both spooled and answered late is taken once
AUDIT_EVERY_S = 10.0
PROBLEMS_KEPT = 20
# problem kind -> audit action
REJECTED = ("malformed", "unreadable", "bad-spool-file", "events")

Execute = Callable[[Op, GuestEvent], Awaitable[Any]]


class Intake:
    def __init__(self, node: str, hypervisor: Hypervisor, guests: GuestBook, store: Store,
                 audit: AuditLog, execute: Execute, spool_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.node, self.hypervisor, self.guests, self.store = node, hypervisor, guests, store
        self.audit, self.execute, self.spool_dir, self.clock = audit, execute, spool_dir, clock
        self.counts: Counter[str] = Counter()
        self.problems: deque[dict[str, Any]] = deque(maxlen=PROBLEMS_KEPT)
        self.seen_at: dict[str, float] = {}  # guest -> the newest event taken for it
        self.seen_calls: OrderedDict[str, None] = OrderedDict()
        self.kept: Counter[str] = Counter()  # spool file -> failed replays
        self._locks: dict[str, asyncio.Lock] = {}
        self._baseline: dict[str, float] | None = None  # during a replay: since per guest
        self._replay_lock = asyncio.Lock()
        self._audited: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._reporting: set[asyncio.Task[None]] = set()

    # hook calls -------------------------------------------------------------------------
    async def deliver(self, call: Any = None) -> dict[str, Any]:
        """The ``hook.deliver`` operation: one raw hook call, answered with a verdict."""
        try:
            if not isinstance(call, Mapping):
                raise ValueError(f"'call' must be an object, got {type(call).__name__}")
            hc = HookCall.from_dict(call)
        except ValueError as exc:
            await self.problem("malformed", f"hook call: {exc}")
            return _verdict("allow", f"malformed call: {exc}", "rejected")
        return await self.take_call(hc)

    async def take_call(self, call: HookCall, replay: bool = False) -> dict[str, Any]:
        if call.id and call.id in self.seen_calls:
            self.counts["duplicate"] += 1
            return _verdict("allow", f"call {call.id} was already taken", "ignore")
        try:
            event = self.hypervisor.parse_hook(call)
        except Exception as exc:  # ValueError by contract; an adapter's bug counts the same
            self._remember(call)
            await self.problem("unreadable", f"{call.hook} {' '.join(call.argv)}: {exc}")
            return _verdict("allow", f"unreadable call: {exc}", "rejected")
        if event is None:
            self._remember(call)
            self.counts["nothing"] += 1
            return _verdict("allow", "nothing to do for this call", "ignore")
        result = await self.take(event, replay=replay)
        self._remember(call)
        return result

    def _remember(self, call: HookCall) -> None:
        if call.id:
            self.seen_calls[call.id] = None
            while len(self.seen_calls) > SEEN_CALLS:
                self.seen_calls.popitem(last=False)

    # events -----------------------------------------------------------------------------
    async def take(self, event: GuestEvent, replay: bool = False) -> dict[str, Any]:
        """Judge one event and run what the table says. A refusal by an operation is an
        answer (``deny`` for a hypervisor waiting on it); any other failure raises, so a
        hook spools the call and a replay keeps its file for the next pass."""
        lock = self._locks.setdefault(event.guest, asyncio.Lock())
        async with lock:
            try:
                facts, unknown = await self.facts(event, replay)
            except StoreError as exc:
                if not event.wants_verdict:
                    raise  # the hook spools it; the replay judges it once the store answers
                # a hypervisor waiting on us: a store that cannot answer is a refusal
                # (the destination cannot take ownership), not an "allow" by silence
                self.counts["refused"] += 1
                await self.problem("refused", f"{event.kind}: {exc}", event.guest)
                return self._answer(event, Decision(Outcome.REPORT, "store unavailable"),
                                    "refused", str(exc))
            d = decide(event, facts)
            self.counts[d.outcome.value] += 1
            if d.outcome == Outcome.REPORT:
                self._saw(event)
                if unknown:
                    d = replace(d, reason=unknown)
                await self.problem("reported", f"{event.kind} from {event.origin}: {d.reason}",
                                   event.guest)
                return self._answer(event, d, "report")
            if d.outcome == Outcome.IGNORE:
                self._saw(event)
                return self._answer(event, d, "ignore")
            results = []
            for op in d.ops:
                try:
                    results.append(await self.execute(op, event))
                except ConvergentError as exc:
                    self._saw(event)
                    self.counts["refused"] += 1
                    await self.problem("refused", f"{event.kind}: {op.name}: {exc}",
                                       event.guest)
                    return self._answer(event, d, "refused", str(exc), results)
            self._saw(event)
            return self._answer(event, d, "apply", results=results)

    def _saw(self, event: GuestEvent) -> None:
        self.seen_at[event.guest] = max(self.seen_at.get(event.guest, 0.0), event.at)

    def _answer(self, event: GuestEvent, d: Decision, outcome: str, refusal: str = "",
                results: list[Any] | None = None) -> dict[str, Any]:
        deny = event.wants_verdict and (d.veto or outcome == "refused")
        reason = f"{d.reason}: refused: {refusal}" if refusal else d.reason
        log.info("event.taken", guest=event.guest, kind=str(event.kind), origin=event.origin,
                 outcome=outcome, ops=list(d.names), reason=reason)
        out = _verdict("deny" if deny else "allow", reason, outcome)
        out.update(event=str(event.kind), guest=event.guest, ops=list(d.names),
                   results=results or [])
        return out

    async def facts(self, event: GuestEvent, replay: bool) -> tuple[GuestFacts, str]:
        """The table's view of the guest, and why it is unknown (if it is)."""
        try:
            g = await self.guests.resolve(event.guest, event)
        except UnknownGuest as exc:
            return GuestFacts(self.node, known=False), str(exc)
        owners = [await self.store.get_ownership(a) for a in g.addresses]
        nodes = sorted({o.node for o in owners if o is not None and o.node is not None})
        migs = await self.store.list_migrations(active=False, guest=g.name)
        active = next((m for m in migs if m.active), None)
        done = [m for m in migs if not m.active]
        latest = max(done, key=lambda m: m.updated) if done else None
        known = [self.seen_at.get(g.name, 0.0)]
        known += [reported_at(m) for m in (active, latest) if m is not None]
        if replay:
            known.append(self._since_before_replay(g, owners))
        return GuestFacts(
            self.node, owner=nodes[0] if len(nodes) == 1 else None,
            split=tuple(nodes) if len(nodes) > 1 else (),
            active=MigrationFacts.of(active) if active else None,
            latest=MigrationFacts.of(latest) if latest else None, known_at=max(known)), ""

    def _since_before_replay(self, g: Guest, owners: list[Ownership | None]) -> float:
        if self._baseline is None:
            return 0.0
        if g.name not in self._baseline:
            self._baseline[g.name] = max((o.since for o in owners if o is not None),
                                         default=0.0)
        return self._baseline[g.name]

    async def follow(self) -> None:
        """The hypervisor's own event stream, for as long as the agent runs."""
        while True:
            stream: AsyncIterator[GuestEvent] = self.hypervisor.events()
            try:
                async for event in stream:
                    try:
                        await self.take(event)
                    except Exception as exc:
                        log.exception("event.failed", guest=event.guest)
                        await self.problem("events", f"{event.kind} of {event.guest}: "
                                           f"{type(exc).__name__}: {exc}", event.guest)
                return  # the stream ended: this adapter reports through hooks only
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.problem("events", f"event stream: {type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    async def truth(self) -> int:
        """The hypervisor's truth beats the store's: a guest running here that the store
        gives to another node, with no migration in flight, is taken as a fresh resume
        here (an event lost for good, or delivered against causality). Only presence
        here is acted on: absence cannot tell a stop from a migration."""
        taken = 0
        try:
            here = await self.hypervisor.running()
        except ConvergentError as exc:
            await self.problem("events", f"running(): {exc}")
            return 0
        for info in here:
            if not info.running or info.node not in (None, self.node):
                continue
            event = GuestEvent(EventKind.RESUMED, info.name, self.node, "truth", self.clock(),
                               macs=info.macs, addresses=info.addresses, uuid=info.uuid)
            try:
                g = await self.guests.resolve(info.name, event)
            except UnknownGuest:
                continue  # not ours to place (its events report it)
            owners = [await self.store.get_ownership(a) for a in g.addresses]
            if all(o is not None and o.node == self.node for o in owners):
                continue
            if await self.store.list_migrations(active=True, guest=info.name):
                continue
            result = await self.take(event)
            taken += result["outcome"] == "apply"
        return taken

    # the spool --------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        try:
            return sorted(self.spool_dir.glob("*" + SPOOL_SUFFIX))
        except OSError:
            return []

    async def replay(self) -> dict[str, int]:
        """Take every spooled call, oldest first."""
        out: Counter[str] = Counter()
        async with self._replay_lock:
            self._baseline = {}
            try:
                for path in self.pending():
                    out[await self._replay_one(path)] += 1
            finally:
                self._baseline = None
        if out["taken"]:
            try:
                await self.audit.arecord("hook.spooled", entries=out["taken"],
                                         detail=f"replayed {out['taken']} spooled calls "
                                                f"from {self.spool_dir}")
            except Exception as exc:
                log.error("audit.write_failed", action="hook.spooled", error=str(exc))
        self.counts.update({f"spool.{k}": v for k, v in out.items()})
        return dict(out)

    async def _replay_one(self, path: Path) -> str:
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            call = HookCall.from_dict(data)
        except FileNotFoundError:
            return "gone"
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSON errors included
            bad = path.with_name(path.name + ".bad")
            with contextlib.suppress(OSError):
                path.rename(bad)
            await self.problem("bad-spool-file", f"{path.name}: {exc} (kept as {bad.name})")
            return "bad"
        try:
            await self.take_call(call, replay=True)
        except Exception as exc:
            self.kept[path.name] += 1
            if self.kept[path.name] == 1:
                await self.problem("kept", f"{path.name}: {type(exc).__name__}: {exc} (kept "
                                   "for the next pass)", None)
            return "kept"
        path.unlink(missing_ok=True)
        self.kept.pop(path.name, None)
        return "taken"

    # problems ---------------------------------------------------------------------------
    async def problem(self, kind: str, detail: str, guest: str | None = None) -> None:
        self.counts[f"problem.{kind}"] += 1
        self.problems.append({"at": round(self.clock(), 3), "kind": kind, "guest": guest,
                              "detail": detail})
        log.warning("intake.problem", kind=kind, guest=guest, detail=detail)
        now = time.monotonic()
        if now - self._audited.get(kind, -AUDIT_EVERY_S) < AUDIT_EVERY_S:
            self._suppressed[kind] += 1  # a flood of junk must not become a flood of fsyncs
            return
        self._audited[kind] = now
        more = self._suppressed.pop(kind, 0)
        action = "hook.rejected" if kind in REJECTED else "hook.report"
        try:
            await self.audit.arecord(action, outcome="failed" if kind in REJECTED
                                     else "refused", guest=guest, detail=f"{kind}: {detail}"
                                     + (f" (and {more} more since the last record)"
                                        if more else ""))
        except Exception as exc:
            log.error("audit.write_failed", action=action, error=str(exc))

    def bad_request(self, error: str) -> None:
        """A line on the API socket that is not a request (from the API server)."""
        task = asyncio.get_running_loop().create_task(self.problem("malformed", f"API: {error}"))
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)

    def status(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "problems": list(self.problems),
                "spooled": len(self.pending()), "kept": dict(self.kept)}


def _verdict(verdict: str, reason: str, outcome: str) -> dict[str, Any]:
    return {"verdict": verdict, "reason": reason, "outcome": outcome}
