"""``python -m bench.store --json`` at a small size: claims on both stores with one winner
per contended round, and the failover figure with every entry found in the kernel and
every lost address released (the full-size run is the README's figure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.lab.etcd import etcd_binary
from orchestrator.lab.netns import list_netns

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (etcd-server)")]
ROOT = Path(__file__).resolve().parents[2]


def test_bench_store_small() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.store", "--json", "--claims", "30",
                           "--rounds", "20"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for store in ("sqlite", "etcd"):
        r = out[store]
        assert r["claim"]["n"] == 30 and 0 < r["claim"]["p50_ms"] <= r["claim"]["p99_ms"]
        assert r["contended"]["every_round_one_winner"] is True
        f = r["failover"]
        assert f["in_kernel"] == f["entries"] == 10_000
        assert f["still_owned_by_dead_node"] == 0 and f["lost_addresses"] == 1000
        assert set(f["steps_ms"]) == {"plan", "adopt", "commit", "program", "release"}
    assert out["etcd"]["members"] == 3
    assert not [n for n in list_netns() if n.startswith("cvb-fo-")]  # its namespace is gone
