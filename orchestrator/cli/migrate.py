"""``convergent migrate GUEST --to NODE``: live-migrate a guest through the hypervisor of
the node it runs on, the agents handing its flows over; ``--abort GUEST`` stops one.

The command asks the agent of the guest's node (from the ownership store), which moves the
guest with its hypervisor adapter: the agents learn each moment from hooks and events, as
for any migration. The agent's socket must be on this machine (run it on that node).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.options import JSON, echo_json
from orchestrator.cli.rules import CONFIG
from orchestrator.config.schema import Topology
from orchestrator.errors import ConvergentError, MigrationError

MIGRATE_TIMEOUT_S = 900.0  # the agent sends progress as it goes; this bounds a silent phase
ABORT_WAIT_S = 15.0


@click.command("migrate")
@CONFIG
@click.argument("guest")
@click.option("--to", "dst", metavar="NODE", help="The destination node.")
@click.option("--abort", is_flag=True, help="Abort GUEST's migration in flight instead.")
@JSON
def migrate(config_path: str | None, guest: str, dst: str | None, abort: bool,
            as_json: bool) -> None:
    """Live-migrate a guest to another node, its flows handed over.

    The agent of the node the guest runs on moves it with its hypervisor. Each phase is
    shown as it happens (one updating line on a terminal, a line per phase otherwise, on
    stderr); --json prints one object with the phases and their timings. Exit 1 with one
    line when the migration is refused or aborted."""
    from orchestrator.config.defaults import config_path as resolve
    from orchestrator.config.loader import load

    topology = load(resolve(config_path))
    if abort:
        result = asyncio.run(_abort(topology, guest))
        if as_json:
            echo_json(result)
        else:
            click.echo(result["line"])
        return
    if dst is None:
        raise click.UsageError("give --to NODE (or --abort)")
    result = asyncio.run(_migrate(topology, guest, dst, Progress(as_json)))
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


async def _migrate(t: Topology, guest: str, dst: str, progress: Progress) -> dict[str, Any]:
    from orchestrator.agent.client import acall

    src = await _owner(t, guest)
    names = [n.name for n in t.nodes]
    if dst not in names:
        raise MigrationError(f"unknown node {dst!r} (nodes: {', '.join(names)})")
    if dst == src:
        raise MigrationError(f"{guest} already runs on {dst}")
    result: dict[str, Any] = await acall(_socket(t, src), "guest.migrate", MIGRATE_TIMEOUT_S,
                                         on_progress=progress, guest=guest, to=dst)
    return result


async def _abort(t: Topology, guest: str) -> dict[str, Any]:
    """Cancel the source's move if its agent runs one; else the destination aborts its
    part. Then wait for the store to show the migration ended."""
    from orchestrator.agent.client import AgentError, acall
    from orchestrator.store import open_store

    store = await open_store(t.agent.store)
    try:
        active = await store.list_migrations(active=True, guest=guest)
        if not active:
            raise MigrationError(f"{guest} is not migrating")
        m = active[0]
        try:
            await acall(_socket(t, m.src), "guest.migrate_abort", 60, guest=guest)
        except AgentError:  # not moved by its agent (virsh migrate, xl migrate)
            await acall(_socket(t, m.dst), "migration.abort", 60, guest=guest,
                        reason="aborted by the operator (convergent migrate --abort)")
        deadline = time.monotonic() + ABORT_WAIT_S
        while (cur := await store.get_migration(m.id)) is not None and cur.active:
            if time.monotonic() > deadline:
                raise MigrationError(f"{guest}: migration {m.id} {m.src} -> {m.dst} is still "
                                     f"in phase {cur.phase} after {ABORT_WAIT_S:g} s")
            await asyncio.sleep(0.05)
        owners = sorted({str(o.node) for o in await store.list_ownership(guest=guest)})
    finally:
        await store.close()
    final = cur.phase.value if cur is not None else "gone"
    where = ", ".join(owners) or "no node"
    return {"guest": guest, "migration": m.id, "from": m.src, "to": m.dst, "phase": final,
            "owner": owners, "line": f"{guest}: migration {m.id} {m.src} -> {m.dst} "
                                     f"{final}; {guest} stays on {where}"}


async def _owner(t: Topology, guest: str) -> str:
    """The node the store says runs ``guest`` (one line when none, or an unknown guest)."""
    from orchestrator.store import open_store

    store = await open_store(t.agent.store)
    try:
        owners = {o.node for o in await store.list_ownership(guest=guest) if o.node}
    finally:
        await store.close()
    if not owners:
        if guest not in {g.name for g in t.guests}:
            known = ", ".join(g.name for g in t.guests) or "none"
            raise ConvergentError(f"unknown guest {guest!r} (known: {known})")
        raise MigrationError(f"{guest} runs nowhere the store knows (no node owns it)")
    if len(owners) > 1:
        raise MigrationError(f"{guest}'s addresses are owned by {', '.join(sorted(owners))}")
    return owners.pop()


def _socket(t: Topology, node: str) -> Path:
    sock = t.agent.socket(node)
    if not sock.exists():
        raise ConvergentError(f"no agent of {node} on this machine ({sock}): run convergent "
                              f"migrate on {node}")
    return sock
