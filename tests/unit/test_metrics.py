"""The agent's metrics from their sources: audit records, a real SQLite store's calls, the
status answers (pure), and prometheus-client's server on a loopback port."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.agent.metrics import AgentMetrics, agent_families, sync_families, timed_store
from orchestrator.errors import ConvergentError, StoreError
from orchestrator.store import open_store
from orchestrator.store.base import Phase
from tests.unit.test_sync_cli import STATUS


def samples(families) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families for s in f.samples}


def test_audit_records_feed_migration_metrics() -> None:
    m = AgentMetrics("n2")
    for rec in ({"action": "migration.precopy", "outcome": "ok", "duration_ms": 40.0},
                {"action": "migration.cutover", "outcome": "degraded", "duration_ms": 12.0,
                 "entries": 7},
                {"action": "migration.abort", "outcome": "failed", "duration_ms": 3.0},
                {"action": "agent.reload", "outcome": "failed"}):
        m.on_audit(rec)  # type: ignore[arg-type]
    get = m.registry.get_sample_value
    assert get("convergent_migrations_total", {"phase": "cutover", "outcome": "degraded"}) == 1
    assert get("convergent_migrations_total", {"phase": "abort", "outcome": "failed"}) == 1
    assert get("convergent_migration_phase_duration_seconds_sum", {"phase": "precopy"}) == 0.04
    assert get("convergent_migration_phase_duration_seconds_bucket",
               {"phase": "cutover", "le": "0.025"}) == 1
    assert get("convergent_handover_entries_total") == 7
    assert get("convergent_audit_records_total",
               {"action": "agent.reload", "outcome": "failed"}) == 1


def test_store_calls_are_timed(tmp_path: Path) -> None:
    m = AgentMetrics("n1")

    async def run() -> None:
        store = timed_store(await open_store(f"sqlite://{tmp_path}/s.db"), m)
        await store.list_ownership(node="n1")
        with pytest.raises(StoreError):
            await store.advance_phase("no-such", Phase.PREPARE, Phase.PRECOPY)
        await store.close()

    asyncio.run(run())
    get = m.registry.get_sample_value
    assert get("convergent_store_operation_duration_seconds_count", {"op": "list_ownership"}) == 1
    assert get("convergent_store_operation_errors_total", {"op": "advance_phase"}) == 1
    assert get("convergent_store_operation_errors_total", {"op": "list_ownership"}) is None


def test_status_answers_become_families() -> None:
    status = {"reconcile": {"runs": 4, "changed": 1, "errors": 0, "last_ms": 2.0,
                            "total_ms": 10.0},
              "api": {"requests": 9, "errors": 1}, "peer": {"streams": 2, "refused": 0},
              "owned": {"10.5.5.201": {}}, "migrations": [{"phase": "precopy"}]}
    got = samples(agent_families("n1", status))
    assert got[("convergent_reconcile_runs_total", ())] == 4
    assert got[("convergent_reconcile_duration_seconds_sum", ())] == 0.01
    assert got[("convergent_migrations_in_flight", (("phase", "precopy"),))] == 1
    assert got[("convergent_migrations_in_flight", (("phase", "cutover"),))] == 0
    assert got[("convergent_owned_addresses", ())] == 1
    with_intake = samples(agent_families("n1", {**status, "intake": {
        "counts": {"act": 3, "duplicate": 1, "spool.taken": 2}, "problems": [], "spooled": 0}}))
    assert with_intake[("convergent_intake_events_total", (("result", "act"),))] == 3
    assert with_intake[("convergent_intake_events_total", (("result", "spool.taken"),))] == 2
    assert not [k for k in got if k[0] == "convergent_intake_events_total"]
    sync = samples(sync_families({**STATUS, "channel": {"sent": 50, "received": 60}}))
    assert sync[("convergent_replicator_datagrams_sent_total", ())] == 50
    assert sync[("convergent_replicator_nacks_received_total", ())] == 2
    assert sync[("convergent_replicator_drops_total",
                 (("peer", "node2"), ("reason", "bad_hmac")))] == 3
    assert sync[("convergent_replicator_drops_total", (("peer", "?"), ("reason", "truncated")))] \
        == 2
    assert sync[("convergent_replicator_peer_nacks_sent_total", (("peer", "node2"),))] == 4
    assert samples(sync_families(None)) == {("convergent_replicator_enabled", ()): 0}


def test_served_over_http_and_a_busy_port_is_one_line() -> None:
    m = AgentMetrics("n1")
    loop = asyncio.new_event_loop()

    async def snapshot() -> dict:
        return {"status": {"reconcile": {"runs": 3}}, "sync": None}

    m.watch_state(snapshot, loop, Path("/nonexistent"))
    m.serve("127.0.0.1", 0)
    try:
        port = m.server.server_port

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return r.read().decode()

        text = loop.run_until_complete(asyncio.to_thread(fetch))  # the loop answers the snapshot
        got = samples(text_string_to_metric_families(text))
        assert got[("convergent_reconcile_runs_total", ())] == 3
        assert got[("convergent_hook_spool_depth", ())] == 0
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            with pytest.raises(ConvergentError, match=r"^metrics: cannot listen on 127.0.0.1:\d+: "
                                                      "Address already in use$"):
                AgentMetrics("n1").serve("127.0.0.1", busy.getsockname()[1])
    finally:
        m.close()
        loop.close()


def test_the_dashboard_asks_only_for_metrics_that_exist() -> None:
    import json
    import re

    m = AgentMetrics("n1")
    m.on_audit({"action": "migration.cutover", "outcome": "ok", "duration_ms": 5.0,
                "entries": 1})  # type: ignore[arg-type]
    m.observe_store("claim_all", 0.001, failed=True)
    families = [*m.registry.collect(), *agent_families("n1", {"reconcile": {}, "intake": {"counts": {"act": 1}}}),
                *sync_families({**STATUS, "channel": {}})]
    exposed = {s.name for f in families for s in f.samples}
    exposed |= {"convergent_hook_spool_depth"}  # the live collector's own gauge
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" /
                            "grafana-migrations.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    asked = {name for e in exprs for name in re.findall(r"\bconvergent_[a-z_]+", e)}
    assert len(dashboard["panels"]) >= 10 and asked
    assert asked <= exposed, sorted(asked - exposed)
