"""``python -m bench.handover --json`` at a small size: the JSON's shape, and D got the
entries (the bench itself checks D's table by key after every run and fails otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.lab.netns import list_netns

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def test_bench_handover_small() -> None:
    before = set(list_netns())
    proc = subprocess.run(
        [sys.executable, "-m", "bench.handover", "--json", "--flows", "60", "--repeat", "1",
         "--churn", "20", "--settle", "0", "--real-per-node", "1", "--real-snat", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["target_cutover_ms"] == 100
    assert out["real_flows_alive_after_all_runs"] == "5/5"
    [run] = out["runs"]
    assert run["flows"] == 60
    assert run["real_flows"] == 5  # 3 nodes x 1 inbound + 2 guest-initiated
    for key in ("precopy_ms", "cutover_ms", "naive_cutover_ms"):
        assert isinstance(run[key], float) and run[key] > 0, key
    assert run["entries"] == run["naive_entries"] == run["dest_entries"] == 60
    assert run["verified"] is True
    assert {"final_delta", "other", "store.claim_all", "n2.arrive", "n1.host"} <= set(
        run["cutover_breakdown_ms"])
    assert set(run["naive_breakdown_ms"]) == {"dump", "plan", "push", "bookkeeping", "total"}
    churn = run["churn"]
    assert churn["created"] == 20 and churn["verified"] is True
    assert churn["dest_entries"] == 80
    assert not {n for n in set(list_netns()) - before if n.startswith("cvg-bh-")}
