"""``convergent failover`` and ``convergent failback``: a survivor takes a dead node's public
address and the flows anchored at it; later the node gets its address back.

Both ask this node's agent over its Unix socket. A failover runs on the survivor (``--to``,
default this node: it holds the replicator's cache of the dead node's entries and programs
its own kernel), a failback on the node taking its address back; when that is another
node, this node's agent forwards the request to that node's agent over the peer channel
(``agent/operator.py``).
"""

from __future__ import annotations

import time
from typing import Any

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.cli.rules import CONFIG, NODE, load_for_node
from orchestrator.config.schema import Topology
from orchestrator.errors import ConfigError, ConvergentError, Degraded


@click.command("failover")
@CONFIG
@NODE
@click.option("--from", "from_node", required=True, help="The dead node.")
@click.option("--to", "to_node", default=None,
              help="The survivor; another node's agent is asked through this node's.  "
                   "[default: this node]")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--force", is_flag=True,
              help="Even while the node's lease is alive (audited as forced).")
@click.option("--without", "skip", multiple=True, type=click.Choice(["entries", "address"]),
              help="Leave a part out on purpose (control runs, audited): the SNAT entries, "
                   "or the address adoption.")
@JSON
def failover(config_path: str | None, node: str | None, from_node: str, to_node: str | None,
             dry_run: bool, force: bool, skip: tuple[str, ...], as_json: bool) -> None:
    """Adopt a dead node's public address, DNAT rules and SNAT flows on a survivor; release
    the addresses of the guests that ran on it."""
    from orchestrator.agent.client import call

    topology, here = _here(config_path, node, to_node)
    survivor = to_node or here
    if not as_json:
        verb = "planning" if dry_run else "failing over"
        through = f" through {here}" if here != survivor else ""
        click.echo(f"{verb} {from_node} -> {survivor}{through} ...", err=True)
    start = time.monotonic()
    try:
        report = call(topology.agent.socket(here), "failover.run", timeout=60,
                      from_node=from_node, to_node=survivor, force=force, dry_run=dry_run,
                      skip=list(skip))
    except ConvergentError as exc:
        raise ConvergentError(f"failover {from_node} -> {survivor}: {exc}") from None
    report["wall_ms"] = round((time.monotonic() - start) * 1000, 1)
    if as_json:
        echo_json(report)
    else:
        click.echo("\n".join(render_report(report)))
    if report.get("commit_errors"):
        raise Degraded(f"failover {from_node} -> {survivor}: "
                       f"{len(report['commit_errors'])}+ entries refused by the kernel")


def _here(config_path: str | None, node: str | None,
          to_node: str | None) -> tuple[Topology, str]:
    """The node whose agent the command asks: ``--node``, else this host's node; on a host
    that is no node (a lab, from the root namespace), the survivor itself."""
    try:
        return load_for_node(config_path, node)
    except ConfigError:
        if node is not None or to_node is None:
            raise
        return load_for_node(config_path, to_node)


def render_report(r: dict[str, Any]) -> list[str]:
    head = "plan" if r.get("dry_run") else "failed over"
    lines = [f"{head}: {r['from']} -> {r['to']}"
             + (" (forced: its lease was alive)" if r.get("forced") else "")]
    if r.get("dry_run"):
        lines.append(f"  would adopt {r['public_address']} (tag {r['tag']})"
                     if r["adopt"] else f"  {r['to']} holds {r['public_address']} already")
    elif r.get("epoch") is None:
        lines.append(f"  did not adopt {r['public_address']} (control run)")
    else:
        lines.append(f"  adopted {r['public_address']} (epoch {r['epoch']}), "
                     f"services {', '.join(r['services']) or 'none'}, tagged {r['tag']}")
    flows = r.get("flows_by_guest", {})
    verb = "would commit" if r.get("dry_run") else "committed"
    lines.append(f"  {verb} {r.get('committed', r['entries'])} SNAT entries"
                 + (": " + ", ".join(f"{g} {n}" for g, n in sorted(flows.items()))
                    if flows else ""))
    if r.get("replaced"):
        lines.append(f"    {r['replaced']} of them replaced {r['to']}'s un-NATed copies "
                     f"(guests that moved {r['from']} -> {r['to']} earlier)")
    for why, n in sorted(r.get("skipped", {}).items()):
        lines.append(f"    left out {n}: {why}")
    for err in r.get("commit_errors", []):
        lines.append(f"    refused: {err}")
    lost = r.get("lost_guests", {})
    for g, addrs in sorted(lost.items()):
        lines.append(f"  lost {g} ({', '.join(addrs)}): it ran on {r['from']}")
    if not lost:
        lines.append("  no guest was lost")
    if "steps_ms" in r:
        steps = ", ".join(f"{k} {v} ms" for k, v in r["steps_ms"].items())
        lines.append(f"  took {r['total_ms']} ms ({steps})")
    return lines


@click.command("failback")
@CONFIG
@NODE
@click.argument("home")
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--without", "skip", multiple=True, type=click.Choice(["entries"]),
              help="Leave a part out on purpose (control runs, audited): the entries handed "
                   "back (the address alone moves, as before).")
@JSON
def failback(config_path: str | None, node: str | None, home: str, dry_run: bool,
             skip: tuple[str, ...], as_json: bool) -> None:
    """Give HOME its public address back, and the flows the holder carried for it: HOME
    takes the holder's entries first, then the holder releases the address, then HOME
    adopts it (HOME's agent must be up again; it runs the steps, asked through this node's
    agent)."""
    from orchestrator.agent.client import call

    topology, here = _here(config_path, node, home)
    if not as_json:
        verb = "planning the failback of" if dry_run else "failing back"
        through = f" through {here}" if here != home else ""
        click.echo(f"{verb} {home}{through} ...", err=True)
    start = time.monotonic()
    try:
        report = call(topology.agent.socket(here), "failover.back", timeout=60, node=home,
                      dry_run=dry_run, skip=list(skip))
    except ConvergentError as exc:
        raise ConvergentError(f"failback {home}: {exc}") from None
    report["wall_ms"] = round((time.monotonic() - start) * 1000, 1)
    if as_json:
        echo_json(report)
    else:
        click.echo("\n".join(render_failback(report)))
    if report.get("commit_errors"):
        raise Degraded(f"failback {home}: {len(report['commit_errors'])}+ entries refused "
                       "by the kernel")


def render_failback(r: dict[str, Any]) -> list[str]:
    if r.get("nothing_to_do"):
        return [f"nothing to do: {r['to']} holds its address {r['public_address']}"]
    dry = r.get("dry_run")
    lines = [f"{'plan' if dry else 'failed back'}: {r['from']} -> {r['to']}"]
    flows = r.get("flows_by_guest", {})
    verb = "would hand back" if dry else "handed back"
    lines.append(f"  {verb} {r.get('committed', r['entries'])} entries "
                 f"({r.get('bindings', 0)} SNAT bindings) from {r['from']}"
                 + (": " + ", ".join(f"{g} {n}" for g, n in sorted(flows.items()))
                    if flows else ""))
    if r.get("unchanged"):
        lines.append(f"    {r['unchanged']} already held by {r['to']}")
    for why, n in sorted(r.get("skipped", {}).items()):
        lines.append(f"    left out {n}: {why}")
    for err in r.get("commit_errors", []):
        lines.append(f"    refused: {err}")
    if dry:
        lines.append(f"  would move {r['public_address']} from {r['from']} to {r['to']}")
    else:
        if r.get("skipped_parts"):
            lines.append(f"  control run: without {', '.join(r['skipped_parts'])}")
        lines.append(f"  {r['from']} released {', '.join(r.get('released') or []) or 'nothing'}"
                     f"; {r['to']} adopted {r['public_address']} (epoch {r['epoch']}); "
                     f"{r['from']} deleted {r.get('retired', 0)} copies of its bindings")
    if "steps_ms" in r:
        steps = ", ".join(f"{k} {v} ms" for k, v in r["steps_ms"].items())
        lines.append(f"  took {r['total_ms']} ms ({steps})")
    return lines
