"""The ``convergent`` command. Subcommands live in sibling modules and load lazily, so
``convergent render-rules`` does not import libvirt, the agent or the lab."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from orchestrator.errors import ConvergentError

# command name -> "module:attribute"
COMMANDS = {
    "render-rules": "orchestrator.cli.rules:render_rules",
    "apply": "orchestrator.cli.rules:apply",
    "lab": "orchestrator.cli.lab:lab",
    "audit": "orchestrator.cli.audit:audit",
    "sync": "orchestrator.cli.sync:sync",
    "agent": "orchestrator.cli.agent:agent",
    "status": "orchestrator.cli.agent:status",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        cmd: click.Command = getattr(importlib.import_module(module), attr)
        return cmd


@click.group(cls=LazyGroup)
@click.version_option(package_name="convergent")
def cli() -> None:
    """Keep established flows alive while guests live-migrate across a stateless-NAT cluster."""


def main(argv: list[str] | None = None) -> Any:
    """Entry point: every ConvergentError becomes one readable line and exit status 1."""
    try:
        return cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("convergent: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"convergent: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except ConvergentError as exc:
        for line in str(exc).splitlines() or ["error"]:
            click.echo(f"convergent: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
