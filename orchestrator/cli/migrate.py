"""``convergent migrate GUEST --to NODE``: live-migrate a guest through the hypervisor of
the node it runs on, the agents handing its flows over; ``--abort GUEST`` stops one.

The command asks the agent of this node (``--node``); that agent finds the guest's owner in
the store and, when it is another node, forwards the request to the owner's agent over the
peer channel (``agent/operator.py``). The owner moves the guest with its hypervisor
adapter; the agents learn each moment from hooks and events, as for any migration.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.cli.rules import CONFIG, NODE
from orchestrator.config.schema import Topology
from orchestrator.errors import ConfigError, ConvergentError

MIGRATE_TIMEOUT_S = 900.0  # the agent sends progress as it goes; this bounds a silent phase
ABORT_TIMEOUT_S = 90.0  # the agent's own wait for the store, and a forward, fit in this


@click.command("migrate")
@CONFIG
@NODE
@click.argument("guest")
@click.option("--to", "dst", metavar="NODE", help="The destination node.")
@click.option("--abort", is_flag=True, help="Abort GUEST's migration in flight instead.")
@JSON
def migrate(config_path: str | None, node: str | None, guest: str, dst: str | None,
            abort: bool, as_json: bool) -> None:
    """Live-migrate a guest to another node, its flows handed over.

    Run it on any node: this node's agent forwards the request to the agent of the node
    the guest runs on, which moves it with its hypervisor. Each phase is shown as it
    happens (one updating line on a terminal, a line per phase otherwise, on stderr);
    --json prints one object with the phases and their timings. Exit 1 with one line when
    the migration is refused or aborted, or the guest's node cannot be reached."""
    from orchestrator.agent.client import acall

    if not abort and dst is None:
        raise click.UsageError("give --to NODE (or --abort)")
    topology, here = _here(config_path, node, guest)
    sock = _socket(topology, here)
    if abort:
        result = asyncio.run(acall(sock, "migrate.abort", ABORT_TIMEOUT_S, guest=guest))
        if as_json:
            echo_json(result)
        else:
            click.echo(result["line"])
        return
    result = asyncio.run(acall(sock, "guest.migrate", MIGRATE_TIMEOUT_S,
                               on_progress=Progress(as_json), guest=guest, to=dst))
    if as_json:
        echo_json(result)
        return
    m = result.get("migration") or {}
    t = m.get("timings") or {}
    click.echo(f"{guest}: {result['from']} -> {result['to']} in {result['total_ms']:.0f} ms"
               + (f" (precopy {t.get('precopy', 0):.0f} ms, cutover {t.get('cutover', 0):.0f}"
                  f" ms, migration {m.get('id')})" if m else ""))


class Progress:
    """The agent's progress lines: one line rewritten in place on a terminal, else a line
    per phase (stderr, so stdout keeps the report)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, step: dict[str, Any]) -> None:
        if self.quiet:
            return
        frac = step.get("fraction")
        text = (f"{step['at_ms'] / 1000:6.2f} s  {step['phase']}"
                + (f" {frac:.0%}" if isinstance(frac, int | float) else "")
                + (f": {step['detail']}" if step.get("detail") else ""))
        if self.tty:
            click.echo(f"\r\033[K{text}", err=True, nl=step["phase"] in ("done", "aborted"))
        else:
            click.echo(text, err=True)


def _here(config_path: str | None, node: str | None, guest: str) -> tuple[Topology, str]:
    """The cluster and the node whose agent the command asks: ``--node``, else this host's
    node; on a host that is no node (a lab, from the root namespace), the guest's owner,
    whose socket must then be on this machine."""
    from orchestrator.cli.rules import load_for_node

    try:
        return load_for_node(config_path, node)
    except ConfigError:
        if node is not None:
            raise
        from orchestrator.config.defaults import config_path as resolve
        from orchestrator.config.loader import load

        topology = load(resolve(config_path))
        return topology, asyncio.run(_owner(topology, guest))


async def _owner(t: Topology, guest: str) -> str:
    """The node the store says runs ``guest`` (one line when none, or an unknown guest)."""
    from orchestrator.agent.forward import guest_owner
    from orchestrator.store import open_store

    store = await open_store(t.agent.store)
    try:
        owned = await store.list_ownership(guest=guest)
    finally:
        await store.close()
    return guest_owner(guest, (o.node for o in owned), (g.name for g in t.guests))


def _socket(t: Topology, node: str) -> Path:
    sock = t.agent.socket(node)
    if not sock.exists():
        raise ConvergentError(f"no agent of {node} on this machine ({sock}): start "
                              f"`convergent agent`, or pass --node")
    return sock
