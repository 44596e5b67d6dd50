"""``convergent agent`` (the node's daemon) and ``convergent status`` (ask it)."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.cli.rules import CONFIG, NODE, load_for_node


@click.command("agent")
@CONFIG
@NODE
def agent(config_path: str | None, node: str | None) -> None:
    """Run this node's agent until SIGTERM or SIGINT; SIGHUP re-reads the cluster file.

    Under systemd (Type=notify) it reports readiness, reloads and stopping."""
    from orchestrator.agent.daemon import Agent
    from orchestrator.agent.lifecycle import serve
    from orchestrator.agent.lock import agent_lock
    from orchestrator.config.defaults import config_path as resolve

    topology, node = load_for_node(config_path, node)
    with agent_lock(topology.agent.run_dir, node):  # before anything is touched
        asyncio.run(serve(Agent(topology, node), resolve(config_path)))


@click.command("status")
@CONFIG
@NODE
@JSON
@click.option("--cluster", "cluster_only", is_flag=True,
              help="Only the cluster view, read from the store (works with every agent down).")
def status(config_path: str | None, node: str | None, as_json: bool,
           cluster_only: bool) -> None:
    """What the node's agent owns, migrates and reconciles, then the cluster: nodes alive
    or dead (leases), who holds which public address, guests and owners, migrations in
    flight, replicator peers."""
    from orchestrator.agent.client import call
    from orchestrator.store.view import render_view

    if cluster_only:
        view = asyncio.run(_store_view(config_path))
        if as_json:
            echo_json(view)
        else:
            click.echo("\n".join(render_view(view)))
        return
    topology, node = load_for_node(config_path, node)
    result = call(topology.agent.socket(node), "status", timeout=10)
    result["cluster"] = call(topology.agent.socket(node), "cluster.status", timeout=10)
    if as_json:
        echo_json(result)
        return
    click.echo(f"node {result['node']} (pid {result['pid']}, up {result['uptime_s']} s)")
    for ip, own in sorted(result["owned"].items()):
        click.echo(f"  owns {ip:<15} {own['guest']} epoch {own['epoch']}")
    for m in result["migrations"]:
        click.echo(f"  migration {m['id']} {m['guest']} {m['from']} -> {m['to']} {m['phase']}")
    r = result["reconcile"]
    click.echo(f"  reconcile: {r['runs']} runs, {r['changed']} changed, {r['errors']} errors, "
               f"last {r['last_ms']} ms" + (f", last error: {r['last_error']}"
                                            if r["last_error"] else ""))
    intake = result.get("intake")
    if intake:
        c = intake["counts"]
        click.echo(f"  intake ({result.get('hypervisor', '?')}): {c.get('apply', 0)} applied, "
                   f"{c.get('ignore', 0)} ignored, {c.get('report', 0)} reported, "
                   f"{intake['spooled']} spooled")
        for p in intake["problems"][-5:]:
            click.echo(f"    {p['kind']}: {p['detail']}")
    click.echo("\n".join(render_view(result["cluster"])))


async def _store_view(config_path: str | None) -> dict[str, Any]:
    from orchestrator.config.defaults import config_path as config_path_default
    from orchestrator.config.loader import load
    from orchestrator.store import open_store
    from orchestrator.store.view import cluster_view

    topology = load(config_path_default(config_path))
    async with await open_store(topology.agent.store) as store:
        return await cluster_view(store)
