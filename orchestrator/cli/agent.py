"""``convergent agent`` (the node's daemon) and ``convergent status`` (ask it)."""

from __future__ import annotations

import asyncio

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
def status(config_path: str | None, node: str | None, as_json: bool) -> None:
    """What the node's agent owns, migrates and reconciles."""
    from orchestrator.agent.client import call

    topology, node = load_for_node(config_path, node)
    result = call(topology.agent.socket(node), "status", timeout=10)
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
