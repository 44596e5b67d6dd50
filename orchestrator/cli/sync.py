"""``convergent sync status`` and ``convergent sync commit``: the replicator, through the agent.

The agent runs the ``SyncService``; these commands ask it over its Unix socket
(``sync.status``, ``sync.commit``) and print the answer, as ``conntrackd -s`` / ``-c`` do.
"""

from __future__ import annotations

from typing import Any

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.cli.rules import CONFIG, NODE, load_for_node
from orchestrator.errors import Degraded


def _call(config_path: str | None, node: str | None, op: str, **args: Any) -> Any:
    from orchestrator.agent.client import call

    topology, node = load_for_node(config_path, node)
    return call(topology.agent.socket(node), op, **args)


@click.group("sync")
def sync() -> None:
    """The conntrack replicator: peers, sequence numbers, drops; commit a peer's flows."""


@sync.command("status")
@CONFIG
@NODE
@JSON
def status(config_path: str | None, node: str | None, as_json: bool) -> None:
    """This node's sender and what it holds of every peer."""
    result = _call(config_path, node, "sync.status")
    if as_json:
        echo_json(result)
        return
    click.echo(render_status(result))


@sync.command("commit")
@CONFIG
@NODE
@click.option("--from", "from_node", required=True, metavar="NODE",
              help="The peer whose cached flows to take.")
@click.option("--guest", default=None, help="Only this guest's flows.")
@JSON
def commit(config_path: str | None, node: str | None, from_node: str, guest: str | None,
           as_json: bool) -> None:
    """Write a peer's cached entries into this node's kernel, translated as a handover.

    Exit status 3 when some entries were refused (the others are written)."""
    result = _call(config_path, node, "sync.commit", from_node=from_node, guest=guest)
    if as_json:
        echo_json(result)
    else:
        click.echo(render_commit(result))
    if result.get("errors"):
        raise Degraded(f"{result['errors']} entries refused, first: "
                       f"{result.get('first_error')}")


def render_status(s: dict[str, Any]) -> str:
    """The status as a few aligned lines (``conntrackd -s`` style)."""
    sender = s.get("sender", {})
    lines = [
        f"node {s.get('node')} tag {s.get('tag')} boot {s.get('boot'):#x} "
        f"seq {s.get('seq')} entries {s.get('entries')}"
        + (" resyncing" if s.get("resyncing") else ""),
        f"  sent {sender.get('data_sent', 0)} datagrams, {sender.get('records_sent', 0)} records; "
        f"nacks answered {sender.get('nack', 0)}, resent {sender.get('resent', 0)}, "
        f"resyncs {sender.get('resync_done', 0)}",
    ]
    if s.get("tracked"):
        lines.append(f"  tracking {', '.join(s['tracked'])}")
    header = f"  {'peer':<12} {'tag':>4} {'boot':>18} {'expected':>10} {'lag':>6} " \
             f"{'entries':>8} {'nacks':>6} {'resyncs':>7}  drops"  # fmt: skip
    lines.append(header)
    for p in s.get("peers", []):
        boot = f"{p['boot']:#x}" if p.get("boot") is not None else "-"
        drops = ", ".join(f"{k}={v}" for k, v in sorted(p.get("drops", {}).items())) or "-"
        lines.append(
            f"  {p['node']:<12} {p['tag']:>4} {boot:>18} {_dash(p.get('expected_seq')):>10} "
            f"{_dash(p.get('lag')):>6} {p.get('entries', 0):>8} {p.get('nacks', 0):>6} "
            f"{p.get('resyncs', 0):>7}  {drops}"
        )
    other = s.get("unattributed_drops") or {}
    if other:
        lines.append("  from strangers: " + ", ".join(f"{k}={v}" for k, v in sorted(other.items())))
    return "\n".join(lines)


def render_commit(r: dict[str, Any]) -> str:
    guests = ", ".join(r.get("guests", [])) or "none"
    return (
        f"committed {r.get('from_node')} -> {r.get('to_node')} (guests: {guests}): "
        f"{r.get('cached', 0)} cached, {r.get('pushed', 0)} written, "
        f"{r.get('unchanged', 0)} already there, {r.get('skipped', 0)} skipped, "
        f"{r.get('deleted', 0)} replaced, {r.get('no_guest', 0)} of no guest, "
        f"{r.get('errors', 0)} errors"
    )


def _dash(v: object) -> str:
    return "-" if v is None else str(v)
