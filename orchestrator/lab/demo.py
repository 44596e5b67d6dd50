"""``convergent lab demo``: live flows through every node while a guest tours the cluster.

The same coordinator as production hands the guest's flows over at each move; ``--control``
moves the guest the same way with the handover disabled, to show what breaks without it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.lab import netns as ns
from orchestrator.lab.flows import FlowResult, demo_config, plot_gaps, start_flows
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate

GUEST = "guest1"


def run_demo(name: str, nodes: int = 3, control: bool = False,
             tour: Sequence[str] | None = None, settle_s: float = 3.0,
             tcp_loose: int | None = None, plot: Path | None = None,
             keep: bool = False, warmup_s: float | None = None) -> dict[str, Any]:
    lab = Lab(name)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "demo.toml"
        cfg.write_text(demo_config(nodes, name, GUEST))
        t = lab.up(config=cfg)
    try:
        if tcp_loose is not None:
            for n in t.nodes:
                ns.in_ns(lab.names.node(n.name), "sysctl", "-q", "-w",
                         f"net.netfilter.nf_conntrack_tcp_loose={tcp_loose}")
        names = [n.name for n in t.nodes]
        tour = list(tour or [*names[1:], names[0]])
        flows = start_flows(lab, t, GUEST, names)
        time.sleep(settle_s if warmup_s is None else warmup_s)
        migrations: list[dict[str, Any]] = []
        marks: list[tuple[float, str]] = []
        for dst in tour:
            marks.append((time.time(), f"-> {dst}"))
            # control: a VM's ARP cache expires and it re-resolves the gateway, now the
            # destination (the veth move compresses that); with handover the gratuitous
            # ARP moves a guest that kept its cache
            report = asyncio.run(migrate(lab, GUEST, dst, handover=not control,
                                         keep_arp=not control))
            migrations.append(report.as_dict())
            time.sleep(settle_s)
        results = flows.stop()
        if plot is not None:
            plot_gaps(results, marks, plot)
        return {"control": control, "flows": [_flow(r) for r in results],
                "migrations": migrations}
    finally:
        if not keep:
            lab.down()


def _flow(r: FlowResult) -> dict[str, Any]:
    return {"name": r.name, "kind": r.kind, "entry_node": r.entry_node,
            "survived": r.survived, "max_gap_ms": r.max_gap_ms, "error": r.error}


def render_table(result: dict[str, Any]) -> str:
    lines = [f"{'flow':32} {'kind':16} {'entry':6} {'survived':9} {'max gap ms':>10}"]
    for f in result["flows"]:
        lines.append(f"{f['name']:32} {f['kind']:16} {f['entry_node']:6} "
                     f"{'yes' if f['survived'] else 'NO':9} {f['max_gap_ms']:>10.0f}")
    lines.append("")
    for m in result["migrations"]:
        lines.append(f"migration {m['from']} -> {m['to']}: precopy {m['precopy_ms']} ms, "
                     f"pause {m['pause_ms']} ms, cutover {m['cutover_ms']} ms, "
                     f"{m['entries']} entries")
    alive = sum(f["survived"] for f in result["flows"])
    mode = "control run (no handover)" if result["control"] else "with handover"
    lines.append(f"{alive}/{len(result['flows'])} flows survived ({mode})")
    return "\n".join(lines)
