"""``convergent lab demo``: live flows through every node while a guest tours the cluster.

The same coordinator as production hands the guest's flows over at each move; ``--control``
moves the guest the same way with the handover disabled, to show what breaks without it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.hypervisor import Progress, ProgressFn
from orchestrator.lab import netns as ns
from orchestrator.lab.flows import (
    INBOUND_KINDS,
    FlowResult,
    Migration,
    demo_config,
    plot_gaps,
    start_flows,
)
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from orchestrator.lab.plan import move_options

GUEST = "guest1"
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def run_demo(name: str, nodes: int = 3, control: bool = False,
             tour: Sequence[str] | None = None, settle_s: float = 3.0,
             tcp_loose: int | None = None, plot: Path | None = None,
             keep: bool = False, warmup_s: float | None = None,
             say: Say = _quiet, hypervisor: str = "lab") -> dict[str, Any]:
    """The demo; ``say`` gets one line per step as it happens (the CLI: stderr)."""
    lab = Lab(name)
    mode = "control run, no handover" if control else "with handover"
    say(f"demo ({mode}): building lab {name} with {nodes} nodes")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "demo.toml"
        cfg.write_text(demo_config(nodes, name, GUEST))
        t = lab.up(config=cfg, hypervisor=hypervisor)
    if control and lab.driver(t) is not None:  # convergent absent: nobody hears the hooks
        for n in t.nodes:
            lab.kill_agent(n.name)
    try:
        if tcp_loose is not None:
            for n in t.nodes:
                ns.in_ns(lab.names.node(n.name), "sysctl", "-q", "-w",
                         f"net.netfilter.nf_conntrack_tcp_loose={tcp_loose}")
        names = [n.name for n in t.nodes]
        tour = list(tour or [*names[1:], names[0]])
        flows = start_flows(lab, t, GUEST, names)
        say(f"flows: {len(INBOUND_KINDS) * len(names) + 1} open, a line every 50 ms each: "
            f"{', '.join(INBOUND_KINDS)} through each of {', '.join(names)}, and "
            f"guest-snat (guest-initiated)")
        time.sleep(settle_s if warmup_s is None else warmup_s)
        migrations: list[dict[str, Any]] = []
        marks: list[Migration] = []
        for i, dst in enumerate(tour, 1):
            src = lab.guest_node(lab.topology(), GUEST) or "?"
            say(f"migration {i}/{len(tour)}: {GUEST} {src} -> {dst}")
            started = time.time()
            report = asyncio.run(migrate(lab, GUEST, dst, **move_options(control),
                                         progress=_phases(say)))  # as `lab migrate` moves
            marks.append(Migration(started, time.time(), src, dst))
            m = report.as_dict()
            migrations.append(m)
            say(f"  done in {m['total_ms']:.0f} ms: precopy {m['precopy_ms']} ms, pause "
                f"{m['pause_ms']} ms, cutover {m['cutover_ms']} ms, {m['entries']} entries "
                f"handed over")
            time.sleep(settle_s)
        say("stopping the flows and judging each")
        results = flows.stop()
        result = {"control": control, "flows": [_flow(r) for r in results],
                  "migrations": migrations}
        if plot is not None:
            plot_gaps(results, marks, plot, title=title(result))
            say(f"plot: {plot}")
        return result
    finally:
        if not keep:
            lab.down()


PHASE_WORDS = {"memory": "memory copy", "paused": "paused, moving the guest",
               "resumed": "resumed", "aborted": "aborted"}


def _phases(say: Say) -> ProgressFn:
    """The hypervisor's steps of one move as indented progress lines (its start and end
    have lines of their own)."""
    def show(p: Progress) -> None:
        if p.phase not in ("starting", "done"):
            say(f"  {PHASE_WORDS.get(p.phase, p.phase)}" + (f": {p.detail}" if p.detail
                                                            else ""))
    return show


def title(result: dict[str, Any]) -> str:
    """The plot's title: what ran, and how many flows lived through it."""
    alive = sum(f["survived"] for f in result["flows"])
    mode = "control run (no handover)" if result["control"] else "with handover"
    tour = " -> ".join([result["migrations"][0]["from"]] + [m["to"] for m in
                                                             result["migrations"]]) \
        if result["migrations"] else "no migration"
    return f"convergent lab demo, {mode}: {alive}/{len(result['flows'])} flows survived " \
           f"({tour})"


def lost_flows(result: dict[str, Any]) -> list[str]:
    """Flows a handover run lost (a control run is expected to lose some: none count)."""
    if result["control"]:
        return []
    return [f["name"] for f in result["flows"] if not f["survived"]]


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
    mode = "control run, no handover" if result["control"] else "with handover"
    lines.append(f"{alive}/{len(result['flows'])} flows survived ({mode})")
    return "\n".join(lines)
