"""bench.hook_xen runs (a few rounds) and reports what it says it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_wrapper_beside_vif_bridge() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.hook_xen", "--calls", "4", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["rounds"] == 4 and len(r["load"]) == 3
    for key in ("vif-bridge online", "vif-bridge offline", "convergent-vif online, agent up",
                "convergent-vif offline, spooled", "/bin/true"):
        assert r["times"][key]["calls"] in (2, 4) and r["times"][key]["p50_ms"] > 0
    assert set(r["added_by_wrapper"]) == {"online, agent up", "online, spooled",
                                          "offline, agent up", "offline, spooled"}
    # every call of the wrapper reached the agent while it listened, the rest spooled
    assert r["delivered_while_up"] == 2 * 3 and r["spooled_files"] == 2 * 3
    assert r["wrapper_own_cost"]["agent up"]["calls"] == 2
