"""``python -m bench.replicator`` at a small N: it runs both replicators, converges, and its
JSON has the documented shape (the figures themselves are the bench's business)."""

from __future__ import annotations

import shutil

import pytest

from bench.replicator import run

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_bench_replicator_small_run() -> None:
    # 20 %: over the ~80 datagrams of 2000 entries, 5 % loss hits none about 2 % of the time
    out = run(2000, [0.2], deadline=30, lossy_deadline=5)
    assert out["entries"] == 2000
    kernel = out["kernel"]
    assert kernel["events_heard"] >= 2000 and kernel["ceiling_per_s"] > 0
    assert kernel["push_with_listener_s"] > 0 and out["of_ceiling"]["convergent"] > 0
    mine = out["convergent"]
    assert out["convergent_per_s"] == mine["per_s"] > 0
    assert mine["cpu_s"]["a"] > 0 and mine["rss_mib"]["b"] > 0
    assert mine["datagrams"] >= 2000 // 26
    assert mine["lag_s"] == pytest.approx(mine["converged_s"] - mine["push_s"], abs=0.002)
    join = out["join"]
    assert join["convergent"]["per_s"] > 0 and join["convergent"]["resyncs"] >= 1
    assert join["convergent_unpaced"]["converged_s"] < 30
    lossy = out["loss"]["0.2"]
    assert lossy["converged_s"] < 30 and lossy["nacks"] > 0 and lossy["resent"] > 0
    if shutil.which("conntrackd"):
        assert out["conntrackd_per_s"] > 0 and out["conntrackd"]["cpu_s"]["b"] >= 0
        assert join["conntrackd"]["per_s"] > 0
        theirs = out["loss_conntrackd"]["0.2"]  # converged, or says what it missed
        assert theirs["converged_s"] is not None or theirs["missing"] > 0
    else:
        assert out["conntrackd_per_s"] is None
