"""Prometheus /metrics of a real agent, scraped inside its namespace before, during and
after a lab migration to it: the numbers an operator watches move."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from tests.conftest import lab_with_precopy_over
from tests.functional.test_migration import established_pair, received_within

pytestmark = pytest.mark.root
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # precopy over the replicator: the migration moves the replicator's counters too
    yield from lab_with_precopy_over("replicator", "mx", tmp_path_factory.mktemp("mx"), nodes=2)


def scrape(lab: Lab, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``node``'s /metrics, keyed by name and labels."""
    host, port = lab.topology().agent.metrics_listen()  # type: ignore[misc]
    text = subprocess.run(["ip", "netns", "exec", lab.names.node(node), sys.executable, "-c",
                           SCRAPE, f"http://{host}:{port}/metrics"], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def intake_events(samples: dict) -> float:
    return sum(v for (n, _), v in samples.items() if n == "convergent_intake_events_total")


def scrape_until(lab: Lab, node: str, done: Callable[[dict], bool],
                 timeout: float = 20.0) -> dict:
    """``node``'s samples once ``done`` holds of them, or as they are after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(lab, node)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_metrics_move_during_a_migration(lab: Lab) -> None:
    before, src_before = scrape(lab, "n2"), scrape(lab, "n1")
    assert value(before, "convergent_agent_info", node="n2", version=next(
        v for (n, lbl), _ in before.items() if n == "convergent_agent_info"
        for k, v in lbl if k == "version")) == 1
    assert value(before, "convergent_replicator_enabled") == 1
    cli, conn = established_pair(lab, 7201)  # a flow for the handover to carry
    during: dict = {}

    async def scrape_mid_flight() -> None:
        during.update(await asyncio.to_thread(scrape, lab, "n2"))

    asyncio.run(migrate(lab, "guest1", "n2", before_move=scrape_mid_flight))
    cli.sendall(b"after")
    assert received_within(conn, 5) == b"after"  # the flow lived
    # what comes after the move's last step (a reconcile pass, the replicator catching
    # up, the hooks' intake): scraped until it shows, then every assertion on that scrape
    taken_before = intake_events(before)

    def settled(s: dict) -> bool:
        return (value(s, "convergent_reconcile_runs_total")
                > value(before, "convergent_reconcile_runs_total")
                and value(s, "convergent_replicator_peer_lag", peer="n1") == 0
                and value(s, "convergent_hook_spool_depth") == 0
                and intake_events(s) >= taken_before + 2)
    after = scrape_until(lab, "n2", settled)
    src_after = scrape(lab, "n1")

    assert value(during, "convergent_migrations_in_flight", phase="precopy") == 1
    assert value(during, "convergent_migrations_total", phase="precopy", outcome="ok") \
        == value(before, "convergent_migrations_total", phase="precopy", outcome="ok") + 1
    assert value(after, "convergent_migrations_in_flight", phase="precopy") == 0
    assert value(after, "convergent_migrations_total", phase="cutover", outcome="ok") == \
        value(before, "convergent_migrations_total", phase="cutover", outcome="ok") + 1
    for phase in ("precopy", "cutover"):
        count = "convergent_migration_phase_duration_seconds_count"
        assert value(after, count, phase=phase) == value(before, count, phase=phase) + 1
        assert value(after, "convergent_migration_phase_duration_seconds_sum", phase=phase) > 0
    assert value(after, "convergent_handover_entries_total") >= \
        value(before, "convergent_handover_entries_total") + 1
    assert value(after, "convergent_owned_addresses") == 1
    assert value(after, "convergent_audit_records_total", action="migration.cutover",
                 outcome="ok") >= 1
    # the store's calls were timed, the reconciler ran, the API answered
    store_calls = "convergent_store_operation_duration_seconds_count"
    assert value(after, store_calls, op="claim_all") > value(before, store_calls, op="claim_all")
    assert value(after, "convergent_reconcile_runs_total") > \
        value(before, "convergent_reconcile_runs_total")
    assert value(after, "convergent_api_requests_total") > \
        value(before, "convergent_api_requests_total")
    # the precopy stream: S sent datagrams, D received and applied the flow's record
    sent = "convergent_replicator_datagrams_sent_total"
    assert value(src_after, sent) > value(src_before, sent)
    for moved in ("convergent_replicator_datagrams_received_total",
                  "convergent_replicator_records_applied_total"):
        assert value(after, moved) > value(before, moved), moved
    assert value(after, "convergent_replicator_events_total", part="service",
                 event="precopy_followed") == 1
    assert value(after, "convergent_replicator_peer_lag", peer="n1") == 0
    assert value(after, "convergent_hook_spool_depth") == 0
    # the lab's hypervisor ran its hooks into n2's intake (incoming, resumed)
    assert intake_events(after) >= taken_before + 2
    cli.close()
    conn.close()
