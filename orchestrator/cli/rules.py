"""``convergent render-rules`` and ``convergent apply``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.config.defaults import CONFIG_ENV, DEFAULT_CONFIG, this_node
from orchestrator.config.defaults import config_path as config_path_default
from orchestrator.config.loader import load
from orchestrator.config.schema import Topology
from orchestrator.errors import ConfigError, RulesetError

if TYPE_CHECKING:
    from orchestrator.audit.log import AuditLog

CONFIG = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
    help=f"Cluster TOML file.  [default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}]",
)
NODE = click.option(
    "--node", metavar="NAME",
    help="This node's name.  [default: the node with an address on this host, else the "
         "hostname]",
)


def load_for_node(config_path: str | None, node: str | None) -> tuple[Topology, str]:
    """The cluster and this node's name, from the options or their defaults."""
    path = config_path_default(config_path)
    topology = load(path)
    if node is None:
        return topology, this_node(topology)
    if node not in {n.name for n in topology.nodes}:
        known = ", ".join(n.name for n in topology.nodes)
        raise ConfigError(f"{path}: nodes: no node named {node!r} (known: {known})")
    return topology, node


@click.command("render-rules")
@CONFIG
@NODE
@click.option("--check", is_flag=True, help="Also have nft -c validate it.")
def render_rules(config_path: str | None, node: str | None, check: bool) -> None:
    """Print the node's whole nftables ruleset."""
    from orchestrator.netfilter import nft
    from orchestrator.netfilter.render import render

    topology, node = load_for_node(config_path, node)
    script = render(topology, node).script()
    if check:
        nft.run(script, check_only=True)
    click.echo(script)


@click.command("apply")
@CONFIG
@NODE
@click.option("--netns", default=None, metavar="NS", help="Apply inside this network namespace.")
@click.option(
    "--audit-log", "audit_log", default=None, type=click.Path(dir_okay=False), metavar="FILE",
    help="Audit log to record the attempt in.  [default: the config's [agent] audit_log]",
)
@click.option("--force", is_flag=True,
              help="Apply even if the node's own addresses are not configured here.")
@JSON
def apply(config_path: str | None, node: str | None, netns: str | None,
          audit_log: str | None, force: bool, as_json: bool) -> None:
    """Set the node's sysctls and replace its tables atomically (no-op when unchanged).

    Refused when the node's own public and guest-side addresses are not configured here
    (another node's ruleset would replace this one's), unless --force.
    Every attempt writes one ruleset.apply audit record (changed, unchanged or failed); a
    log that cannot be opened is a warning, never a reason not to apply."""
    from orchestrator.netfilter.apply import apply as do_apply
    from orchestrator.netfilter.apply import identity_problem, local_addresses

    topology, node = load_for_node(config_path, node)
    if not force:
        problem = identity_problem(topology, node, local_addresses(netns))
        if problem:
            raise RulesetError(problem)
    audit = _open_audit(Path(audit_log) if audit_log else topology.agent.audit_log, node,
                        topology.agent.audit_key_file)
    try:
        result = do_apply(topology, node, netns, audit, warn=_warn)
    finally:
        if audit is not None:
            audit.close()
    if as_json:
        echo_json({"node": result.node, "changed": result.changed, "digest": result.digest,
                   "ruleset_changed": result.ruleset_changed,
                   "sysctls_changed": result.sysctls_changed})
    else:
        click.echo(result.summary())


def _warn(message: str) -> None:
    click.echo(f"convergent: warning: {message}", err=True)


def _open_audit(path: Path, node: str, key_file: Path | None = None) -> AuditLog | None:
    """The audit log, opened for appending now so a bad path is a warning up front; keyed
    with the node's audit key when there is one (the agent makes it)."""
    from orchestrator.audit.errors import AuditError
    from orchestrator.audit.key import load_audit_key
    from orchestrator.audit.log import AuditLog

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with path.open("ab"):
            pass
        key = load_audit_key(key_file) if key_file is not None and key_file.exists() else None
        return AuditLog(path, node=node, actor="cli", key=key)
    except (AuditError, OSError) as exc:
        _warn(f"cannot open the audit log {path}: {exc}; applying without a record")
        return None
