"""``convergent render-rules`` and ``convergent apply``."""

from __future__ import annotations

import click

from orchestrator.config.loader import load
from orchestrator.errors import ConfigError
from orchestrator.model.cluster import Topology

CONFIG = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False),
    help="cluster TOML file",
)
NODE = click.option("--node", required=True, help="the node this ruleset is for")


def load_for_node(config_path: str, node: str) -> Topology:
    topology = load(config_path)
    if node not in {n.name for n in topology.nodes}:
        known = ", ".join(n.name for n in topology.nodes)
        raise ConfigError(f"{config_path}: nodes: no node named {node!r} (known: {known})")
    return topology


@click.command("render-rules")
@CONFIG
@NODE
@click.option("--check", is_flag=True, help="also have nft -c validate it")
def render_rules(config_path: str, node: str, check: bool) -> None:
    """Print the node's whole nftables ruleset."""
    from orchestrator.netfilter import nft
    from orchestrator.netfilter.render import render

    script = render(load_for_node(config_path, node), node).script()
    if check:
        nft.run(script, check_only=True)
    click.echo(script)


@click.command("apply")
@CONFIG
@NODE
@click.option("--netns", default=None, help="apply inside this network namespace")
def apply(config_path: str, node: str, netns: str | None) -> None:
    """Set the node's sysctls and replace its tables atomically (no-op when unchanged)."""
    from orchestrator.netfilter.apply import apply as do_apply

    result = do_apply(load_for_node(config_path, node), node, netns)
    click.echo(result.summary())
