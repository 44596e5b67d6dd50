"""The ``convergent`` command. Subcommands live in sibling modules and load lazily, so
``convergent render-rules`` does not import libvirt, the agent or the lab."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from orchestrator.errors import ConvergentError
from orchestrator.logs import FORMATS, LEVELS
from orchestrator.logs import configure as configure_logs

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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convergent")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True,
              envvar="CONVERGENT_LOG_LEVEL", help="Least severe log level written.")
@click.option("--log-format", type=click.Choice(FORMATS), default="auto", show_default=True,
              envvar="CONVERGENT_LOG_FORMAT",
              help="Logs on stderr: json lines, key=value text, or auto (json unless stderr "
                   "is a terminal, and always under systemd's journal).")
def cli(log_level: str, log_format: str) -> None:
    """Keep established flows alive while guests live-migrate across a stateless-NAT cluster."""
    configure_logs(log_level, log_format)


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
