"""``convergent lab``: the cluster in network namespaces."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.errors import ConvergentError

LAB_NAME = click.option(
    "--name", default=lambda: os.environ.get("CONVERGENT_LAB", "lab"), metavar="LAB",
    help="Lab name; its namespaces are cvg-LAB-*.  [default: $CONVERGENT_LAB, else lab]",
)

# one definition for lab migrate and lab demo
CONTROL_HELP = ("The control run: the handover off (no entries handed over, no race gate, "
                "no gratuitous ARP), and the guest learns its gateway afresh (the rest of "
                "its neighbour table kept, as a VM keeps it).")


@click.group("lab")
def lab() -> None:
    """Build, check and tear down a cluster in network namespaces."""
    if importlib.util.find_spec("websockets") is None:  # the lab's flows are real websockets
        raise ConvergentError("the lab needs the 'lab' extra: pip install 'convergent[lab]'")


@lab.command("up")
@LAB_NAME
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 16),
              help="How many nodes.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              metavar="FILE", help="Cluster TOML.  [default: the seed cluster grown to --nodes]")
@click.option("--store", type=click.Choice(["sqlite", "etcd"]), default="sqlite",
              show_default=True,
              help="The ownership store: a SQLite file, or a 3-member etcd cluster (one "
                   "member per node, inside the lab's namespaces).")
@click.option("--hypervisor", default="lab", show_default=True, metavar="KIND",
              help="The nodes' hypervisor: lab (the lab moves a veth itself) or a real "
                   "hypervisor's calling convention (xl: Xen's, with Debian's hotplug "
                   "scripts and stand-ins for xl and xenstore).")
@JSON
def up(name: str, nodes: int, config_path: str | None, store: str, hypervisor: str,
       as_json: bool) -> None:
    """Build the lab (idempotent)."""
    from orchestrator.lab.lab import Lab

    t = Lab(name).up(nodes, Path(config_path) if config_path else None, store=store,
                     hypervisor=hypervisor)
    if as_json:
        echo_json({"lab": name, "nodes": [n.name for n in t.nodes],
                   "guests": [g.name for g in t.guests], "config": str(Lab(name).config_path)})
        return
    click.echo(f"lab {name} up: {len(t.nodes)} nodes, guests "
               f"{', '.join(g.name for g in t.guests)}; config {Lab(name).config_path}")


@lab.command("down")
@LAB_NAME
@JSON
def down(name: str, as_json: bool) -> None:
    """Remove every namespace, link and process of the lab (fine if there is none)."""
    from orchestrator.lab.lab import Lab

    removed = Lab(name).down()
    if as_json:
        echo_json({"lab": name, "removed": removed})
    else:
        click.echo(f"lab {name} down: removed {len(removed)} namespaces")


@lab.command("check")
@LAB_NAME
@JSON
def check(name: str, as_json: bool) -> None:
    """Run the seed acceptance inside the lab."""
    from orchestrator.lab.check import report, run_checks
    from orchestrator.lab.lab import Lab

    result = report(run_checks(Lab(name)))
    if as_json:
        click.echo(json.dumps(result))
    else:
        for c in result["checks"]:
            click.echo(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
        click.echo("all checks passed" if result["passed"] else "SOME CHECKS FAILED")
    if not result["passed"]:
        raise SystemExit(1)


@lab.command("status")
@LAB_NAME
@JSON
def status(name: str, as_json: bool) -> None:
    """Where each guest is and which namespaces exist."""
    from orchestrator.lab.lab import Lab

    state = Lab(name).status()
    if as_json:
        echo_json(state)
        return
    namespaces, guests = state["namespaces"], state["guests"]
    assert isinstance(namespaces, list) and isinstance(guests, dict)
    click.echo(f"lab {name}: {len(namespaces)} namespaces")
    for guest, node in sorted(guests.items()):
        click.echo(f"  {guest:<12} {'on ' + node if node else 'not running'}")


@lab.command("migrate")
@LAB_NAME
@click.argument("guest")
@click.option("--to", "dst", required=True, metavar="NODE", help="Destination node.")
@click.option("--control", is_flag=True, help=CONTROL_HELP)
@click.option("--in-process", is_flag=True,
              help="A lab without agents: coordinate the move in this process.")
@JSON
def migrate(name: str, guest: str, dst: str, control: bool, in_process: bool,
            as_json: bool) -> None:
    """Live-migrate a lab guest to another node, handing its flows over.

    The lab's hypervisor moves it and runs its hooks; the nodes' agents do the handover,
    as for any migration. Refused when an agent of the two nodes is not running."""
    import asyncio

    from orchestrator.lab.lab import Lab
    from orchestrator.lab.migrate import migrate as do_migrate
    from orchestrator.lab.plan import move_options

    report = asyncio.run(do_migrate(Lab(name), guest, dst, **move_options(control),
                                    in_process=in_process))
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        r = report.as_dict()
        click.echo(f"{guest}: {r['from']} -> {r['to']} precopy {r['precopy_ms']} ms, "
                   f"pause {r['pause_ms']} ms, cutover {r['cutover_ms']} ms, "
                   f"{r['entries']} entries handed over")


@lab.command("demo")
@LAB_NAME
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(2, 16),
              help="How many nodes the guest tours.")
@click.option("--control", is_flag=True, help=CONTROL_HELP)
@JSON
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Draw each flow's gaps and the migrations.")
@click.option("--tcp-loose", type=click.IntRange(0, 1),
              help="Set nf_conntrack_tcp_loose on every node.")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@click.option("--hypervisor", default="lab", show_default=True, metavar="KIND",
              help="As for lab up (xl: every move is an xl migrate; --control stops the "
                   "agents first).")
def demo(name: str, nodes: int, control: bool, as_json: bool, plot: str | None,
         tcp_loose: int | None, keep: bool, hypervisor: str) -> None:
    """Real SSH, websocket, HTTP, UDP and guest-initiated flows while the guest tours the
    cluster (n1 -> n2 -> n3 -> n1); reports which flows survived and their largest gap.

    Progress goes to stderr as it happens, the report to stdout. Exit status 1 when a run
    with the handover lost a flow (a control run is expected to lose some)."""
    from orchestrator.lab.demo import lost_flows, render_table, run_demo

    result = run_demo(name, nodes, control, tcp_loose=tcp_loose,
                      plot=Path(plot) if plot else None, keep=keep,
                      say=lambda line: click.echo(line, err=True), hypervisor=hypervisor)
    click.echo(json.dumps(result) if as_json else render_table(result))
    lost = lost_flows(result)
    if lost:
        raise ConvergentError(f"{len(lost)} of {len(result['flows'])} flows died with the "
                              f"handover: {', '.join(lost)}")
