"""bench.audit runs end to end on a small scale and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

from bench.audit import run, synthetic
from orchestrator.audit import verify
from orchestrator.audit.files import chain_files
from orchestrator.audit.record import normalize_event
from orchestrator.audit.writer import bulk_append


def test_bench_reports_all_figures(tmp_path: Path) -> None:
    figures = run(records=20, lines=3000, directory=tmp_path)
    assert figures["write_per_s"] > 0 and figures["write_batch_per_s"] > 0
    assert figures["verify_1m_s"] >= 0 and figures["show_filter_1m_s"] >= 0
    assert figures["show_filter_matches"] == 3  # g-0042 every 1000 lines, all migration.*
    json.dumps(figures)


def test_synthetic_events_fit_the_schema_and_chain(tmp_path: Path) -> None:
    events = list(synthetic(50))
    assert all(normalize_event(dict(e)) == e for e in events)
    assert events[1]["time"] == "2024-05-01T03:00:00.010000Z"
    bulk_append(tmp_path / "a.log", events)
    bulk_append(tmp_path / "a.log", events)  # appending continues the chain
    assert verify(chain_files(tmp_path / "a.log")).records == 100
