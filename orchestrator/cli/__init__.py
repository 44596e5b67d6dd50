"""The ``convergent`` command. Subcommands live in sibling modules and load lazily, so
``convergent render-rules`` imports neither the agent nor the lab (and the core never
imports a hypervisor adapter: they come through entry points)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
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
    "migrate": "orchestrator.cli.migrate:migrate",
    "install-hooks": "orchestrator.cli.install_hooks:install_hooks",
    "failover": "orchestrator.cli.failover:failover",
    "failback": "orchestrator.cli.failover:failback",
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


_debug = {"on": bool(os.environ.get("CONVERGENT_DEBUG"))}


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _debug["on"] = True


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="convergent")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True,
              envvar="CONVERGENT_LOG_LEVEL", help="Least severe log level written.")
@click.option("--log-format", type=click.Choice(FORMATS), default="auto", show_default=True,
              envvar="CONVERGENT_LOG_FORMAT",
              help="Logs on stderr: json lines, key=value text, or auto (json unless stderr "
                   "is a terminal, and always under systemd's journal).")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="On an error, print the traceback too (also CONVERGENT_DEBUG=1).")
def cli(log_level: str, log_format: str) -> None:
    """Keep established flows alive while guests live-migrate across a stateless-NAT cluster."""
    configure_logs(log_level, log_format)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: no traceback ever reaches the user unless asked for (``--debug``).
    A ConvergentError is its own message, one line per problem; anything else (a bug, or
    an OS error nobody wrapped) is one line naming its type; exit status non-zero."""
    try:
        return cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("convergent: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"convergent: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except ConvergentError as exc:
        _traceback()
        for line in str(exc).splitlines() or ["error"]:
            click.echo(f"convergent: {line}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a busy port, a missing file: say what and where
        _traceback()
        where = f"{exc.filename}: " if exc.filename else ""
        why = os.strerror(exc.errno) if exc.errno else one_line(str(exc))
        click.echo(f"convergent: {where}{why}", err=True)
        sys.exit(1)
    except Exception as exc:
        _traceback()
        hint = "" if _debug["on"] else " (--debug shows the traceback)"
        click.echo(f"convergent: internal error: {type(exc).__name__}: "
                   f"{one_line(str(exc))}{hint}", err=True)
        sys.exit(70)  # EX_SOFTWARE


def one_line(text: str) -> str:
    return " ".join(text.split()) or "no detail"


def _traceback() -> None:
    if _debug["on"]:
        traceback.print_exc(file=sys.stderr)
