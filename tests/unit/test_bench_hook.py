"""bench.hook runs, and measures what it claims: the hung agent's calls waited out their
timeout and spooled, the absent agent's spooled at once, the live agent took every call."""

from __future__ import annotations

from pathlib import Path

from bench.hook import run


def test_bench_hook_smoke(tmp_path: Path) -> None:
    r = run(calls=4, hung_timeout=0.1, work=tmp_path)
    t = r["times"]
    assert set(t) == {"/bin/true", "python3 -IS", "python3 -IS json", "agent up",
                      "agent hung", "agent absent", "libvirt hook, agent up"}
    assert all(v["calls"] == 4 for v in t.values())
    assert t["agent hung"]["p50_ms"] >= 100  # it waited for the timeout
    assert r["spooled"] == {"agent hung": 4, "agent absent": 4, "libvirt hook": 0}
    # the real qemu hook's calls were parsed by the libvirt adapter and answered
    assert r["libvirt_intake"]["ignore"] == 4, r["libvirt_intake"]
    assert r["agent_intake"]["ignore"] == 4  # the owner hearing "started": nothing to do
