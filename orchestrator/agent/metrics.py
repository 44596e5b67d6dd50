"""Prometheus ``/metrics`` for one agent, from the counters it already keeps.

Three sources, each read where it lives:

- the audit log (``AuditLog.subscribe``): every record counts in
  ``convergent_audit_records_total{action,outcome}``; migration phases also feed the
  per-phase duration histograms and the entries handed over;
- the store (``timed_store``): each call's latency by operation;
- a scrape-time snapshot taken on the agent's event loop (``status`` and the replicator's
  ``status``: reconcile, API, peer channel, migrations in flight, replicator datagrams,
  NACKs, resends, resyncs, drops by reason and lag per peer) and the hook spool's depth.

The HTTP side is prometheus-client's own server (a thread); the snapshot is handed to the
loop with ``run_coroutine_threadsafe`` so it never reads the agent's state mid-change.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Coroutine, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from orchestrator.audit.record import AuditRecord
from orchestrator.errors import ConvergentError
from orchestrator.store.base import Store

log = structlog.get_logger("convergent.metrics")

# migrations take milliseconds to seconds; the store's calls microseconds to a second
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                 60, 300)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1, 2.5)
MIGRATION_PHASES = ("prepare", "precopy", "cutover", "finalize", "abort")
SNAPSHOT_TIMEOUT_S = 5.0
Snapshot = Callable[[], Coroutine[Any, Any, dict[str, Any]]]


class AgentMetrics:
    """The registry of one agent and the instruments fed as things happen."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.audit_records = Counter(
            "convergent_audit_records", "Audit records written, by action and outcome.",
            ["action", "outcome"], registry=r)
        self.migrations = Counter(
            "convergent_migrations", "Migration phases completed here (the destination), by "
            "phase and outcome (ok, degraded, failed).", ["phase", "outcome"], registry=r)
        self.phase_seconds = Histogram(
            "convergent_migration_phase_duration_seconds",
            "How long each migration phase took (precopy, cutover, finalize, abort).",
            ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.entries = Counter(
            "convergent_handover_entries", "Conntrack entries handed over to this node by "
            "migrations that reached cutover.", registry=r)
        self.store_seconds = Histogram(
            "convergent_store_operation_duration_seconds",
            "Latency of the ownership store's calls, by operation.", ["op"],
            buckets=STORE_BUCKETS, registry=r)
        self.store_errors = Counter(
            "convergent_store_operation_errors", "Store calls that raised, by operation.",
            ["op"], registry=r)
        self.server: Any = None
        self.thread: Any = None

    # sources ---------------------------------------------------------------------------
    def on_audit(self, record: AuditRecord) -> None:
        action, outcome = record.get("action", "?"), record.get("outcome", "ok")
        self.audit_records.labels(action, outcome).inc()
        kind, _, phase = action.partition(".")
        if kind != "migration" or phase not in MIGRATION_PHASES:
            return
        self.migrations.labels(phase, outcome).inc()
        if "duration_ms" in record and phase != "prepare":
            self.phase_seconds.labels(phase).observe(record["duration_ms"] / 1000)
        if phase == "cutover":
            self.entries.inc(record.get("entries", 0))

    def observe_store(self, op: str, seconds: float, failed: bool) -> None:
        self.store_seconds.labels(op).observe(seconds)
        if failed:
            self.store_errors.labels(op).inc()

    def watch_state(self, snapshot: Snapshot, loop: asyncio.AbstractEventLoop,
                    spool_dir: Path) -> None:
        self.registry.register(_StateCollector(self.node, snapshot, loop, spool_dir))

    # serving ---------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConvergentError(f"metrics: cannot listen on {host}:{port}: "
                                  f"{exc.strerror or exc}") from None
        log.info("metrics.listening", address=f"{host}:{port}")

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def timed_store(store: Store, metrics: AgentMetrics) -> Store:
    """``store`` with every coroutine method timed into ``metrics`` (``watch`` and other
    non-coroutine attributes pass through)."""
    return cast(Store, _TimedStore(store, metrics))


class _TimedStore:
    def __init__(self, inner: Store, metrics: AgentMetrics) -> None:
        self._inner, self._metrics = inner, metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            start, failed = time.perf_counter(), True
            try:
                result = await attr(*args, **kwargs)
                failed = False
                return result
            finally:
                self._metrics.observe_store(name, time.perf_counter() - start, failed)

        return timed


class _StateCollector(Collector):
    """Turns one snapshot of the agent (taken on its loop) into metric families."""

    def __init__(self, node: str, snapshot: Snapshot, loop: asyncio.AbstractEventLoop,
                 spool_dir: Path) -> None:
        self.node, self.snapshot, self.loop, self.spool_dir = node, snapshot, loop, spool_dir

    def collect(self) -> Iterator[Metric]:
        try:
            future = asyncio.run_coroutine_threadsafe(self.snapshot(), self.loop)
            state = future.result(SNAPSHOT_TIMEOUT_S)
        except Exception as exc:  # a scrape must answer even while the agent struggles
            log.warning("metrics.snapshot_failed", error=f"{type(exc).__name__}: {exc}")
            state = {}
        yield from agent_families(self.node, state.get("status") or {})
        yield from sync_families(state.get("sync"))
        yield _gauge("convergent_hook_spool_depth",
                     "Hook calls spooled while the agent was unreachable, not yet taken in.",
                     spool_depth(self.spool_dir))


def agent_families(node: str, status: dict[str, Any]) -> Iterator[Metric]:
    """Pure: metric families from the agent's ``status`` answer."""
    info = InfoMetricFamily("convergent_agent", "This agent: node and version.")
    info.add_metric([], {"node": node, "version": _version()})
    yield info
    if not status:
        return
    r = status.get("reconcile", {})
    yield _counter("convergent_reconcile_runs", "Reconcile passes.", r.get("runs", 0))
    yield _counter("convergent_reconcile_changed", "Reconcile passes that changed a set.",
                   r.get("changed", 0))
    yield _counter("convergent_reconcile_errors", "Reconcile passes that failed.",
                   r.get("errors", 0))
    summary = SummaryMetricFamily("convergent_reconcile_duration_seconds",
                                  "Time spent in reconcile passes.")
    summary.add_metric([], count_value=r.get("runs", 0), sum_value=r.get("total_ms", 0) / 1000)
    yield summary
    yield _gauge("convergent_reconcile_last_duration_seconds", "The last pass's duration.",
                 r.get("last_ms", 0) / 1000)
    api, peer = status.get("api", {}), status.get("peer", {})
    yield _counter("convergent_api_requests", "API requests answered.", api.get("requests", 0))
    yield _counter("convergent_api_errors", "API requests refused or failed.",
                   api.get("errors", 0))
    yield _counter("convergent_peer_streams", "Peer-channel streams served to destinations.",
                   peer.get("streams", 0))
    yield _counter("convergent_peer_refused", "Peer-channel requests refused.",
                   peer.get("refused", 0))
    yield _gauge("convergent_owned_addresses", "Guest addresses this node owns.",
                 len(status.get("owned", {})))
    in_flight = GaugeMetricFamily("convergent_migrations_in_flight",
                                  "Migrations to this node not yet finished, by phase.",
                                  labels=["phase"])
    by_phase: dict[str, int] = dict.fromkeys(("prepare", "precopy", "cutover", "finalize"), 0)
    for m in status.get("migrations", []):
        by_phase[m.get("phase", "?")] = by_phase.get(m.get("phase", "?"), 0) + 1
    for phase, n in sorted(by_phase.items()):
        in_flight.add_metric([phase], n)
    yield in_flight
    intake = status.get("intake")
    if intake is not None:  # hook calls, spool replays, hypervisor events
        events = CounterMetricFamily(
            "convergent_intake_events", "Guest events taken in (hook calls, spool replays, "
            "hypervisor events), by what became of them.", labels=["result"])
        for result, n in sorted((intake.get("counts") or {}).items()):
            events.add_metric([result], n)
        yield events


NAMED = {  # (part of the replicator's status, counter) -> (metric, help)
    ("channel", "sent"): ("convergent_replicator_datagrams_sent", "Datagrams sent (all kinds)."),
    ("channel", "received"): ("convergent_replicator_datagrams_received",
                              "Datagrams received (all kinds)."),
    ("sender", "data_sent"): ("convergent_replicator_data_datagrams_sent",
                              "Data datagrams sent on the node's own stream."),
    ("sender", "records_sent"): ("convergent_replicator_records_sent", "Entry records sent."),
    ("sender", "nack"): ("convergent_replicator_nacks_received", "NACKs peers sent us."),
    ("sender", "resent"): ("convergent_replicator_resent", "Datagrams resent for a NACK."),
    ("sender", "resync_started"): ("convergent_replicator_resyncs_started",
                                   "Full resyncs this node sent."),
    ("receiver", "applied"): ("convergent_replicator_records_applied",
                              "Records from peers applied here."),
}
PARTS = ("sender", "receiver", "channel", "feed", "service")


def sync_families(sync: dict[str, Any] | None) -> Iterator[Metric]:
    """Pure: metric families from the replicator's ``status`` (None: replication off)."""
    yield _gauge("convergent_replicator_enabled", "1 when this node replicates conntrack.",
                 int(sync is not None))
    if sync is None:
        return
    for (part, key), (name, doc) in NAMED.items():
        yield _counter(name, doc, (sync.get(part) or {}).get(key, 0))
    every = CounterMetricFamily("convergent_replicator_events",
                                "Every counter of the replicator's parts, as sync status "
                                "shows them.", labels=["part", "event"])
    for part in PARTS:
        for event, n in sorted((sync.get(part) or {}).items()):
            every.add_metric([part, event], n)
    yield every
    yield _gauge("convergent_replicator_entries", "Entries this node replicates.",
                 sync.get("entries", 0))
    lag = GaugeMetricFamily("convergent_replicator_peer_lag",
                            "Datagrams a peer's stream is behind (holes waiting for a resend).",
                            labels=["peer"])
    held = GaugeMetricFamily("convergent_replicator_peer_entries",
                             "Entries of a peer held here.", labels=["peer"])
    nacks = CounterMetricFamily("convergent_replicator_peer_nacks_sent",
                                "NACKs sent to a peer.", labels=["peer"])
    resyncs = CounterMetricFamily("convergent_replicator_peer_resyncs",
                                  "Full resyncs received from a peer.", labels=["peer"])
    drops = CounterMetricFamily("convergent_replicator_drops",
                                "Datagrams dropped, by peer and reason.",
                                labels=["peer", "reason"])
    for p in sync.get("peers", []):
        peer = str(p.get("node"))
        lag.add_metric([peer], p.get("lag") or 0)
        held.add_metric([peer], p.get("entries", 0))
        nacks.add_metric([peer], p.get("nacks", 0))
        resyncs.add_metric([peer], p.get("resyncs", 0))
        for reason, n in sorted(p.get("drops", {}).items()):
            drops.add_metric([peer, reason], n)
    for reason, n in sorted((sync.get("unattributed_drops") or {}).items()):
        drops.add_metric(["?", reason], n)
    yield from (lag, held, nacks, resyncs, drops)


SPOOL_SUFFIX = ".call.json"  # hookclient.SPOOL_SUFFIX (the core does not import hooks/)


def spool_depth(spool_dir: Path) -> int:
    try:
        return sum(1 for p in spool_dir.iterdir() if p.name.endswith(SPOOL_SUFFIX))
    except OSError:
        return 0


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


@functools.cache
def _version() -> str:
    try:
        return metadata.version("convergent")
    except metadata.PackageNotFoundError:
        return "unknown"
