"""``convergent install-hooks --KIND``: put a hypervisor's hook where it looks for it.

One flag per kind, from ``INSTALLERS``; each kind's installer is an entry point of group
``convergent.hook_installers`` (named like the flag), so the core never imports the
adapters. An installer takes a ``HookTarget`` and returns an ``InstallReport``: what it
did to each file, and how to turn the hook on. Installers never edit the operator's guest
configurations, and running one twice changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.rules import CONFIG, NODE, load_for_node
from orchestrator.errors import ConvergentError
from orchestrator.store import outwaits_refusal

# flag -> what it installs (the installer: entry point KIND of group convergent.hook_installers)
INSTALLERS = {
    "xen": "Xen's vif hotplug script (convergent-vif, wrapping vif-bridge)",
    "libvirt": "libvirt's qemu hook (qemu.d/convergent, after an operator's hooks/qemu)",
}
GROUP = "convergent.hook_installers"


@dataclass(frozen=True)
class HookTarget:
    root: Path  # "/" on a node; a directory for an image, a chroot or a lab node
    uninstall: bool
    node: str = ""
    socket: str = ""  # the node agent's API socket
    spool_dir: str = ""  # where the hooks spool while the agent is away
    timeout_s: float = 1.5
    # a hook that waits for a verdict (libvirt's migrate begin) must outwait the store's
    # refusal, or "no quorum" reaches it as a timeout: spooled, and the migration allowed
    verdict_timeout_s: float = 1.5
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific (--wrap)


@dataclass(frozen=True)
class InstallReport:
    done: list[str]  # one line per file: "installed PATH", "unchanged PATH", "removed PATH"
    advice: str  # what the operator does next (enabling it, or what removing it breaks)

    def as_dict(self) -> dict[str, Any]:
        return {"done": self.done, "advice": self.advice}


Installer = Callable[[HookTarget], InstallReport]


def installer(kind: str) -> Installer:
    for ep in entry_points(group=GROUP):
        if ep.name == kind:
            fn: Installer = ep.load()
            return fn
    raise ConvergentError(f"no installer for {kind!r} (entry point group {GROUP})")


def _kind_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    for kind, what in reversed(INSTALLERS.items()):
        f = click.option(f"--{kind}", kind, is_flag=True, help=f"Install {what}.")(f)
    return f


@click.command("install-hooks")
@_kind_flags
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Install under this directory (an image, a chroot, a lab node).")
@click.option("--uninstall", is_flag=True, help="Remove what an install put there.")
@click.option("--wrap", metavar="SCRIPT",
              help="Xen: the script convergent-vif runs first.  [default: vif-bridge, or what "
                   "an earlier install chose]")
@CONFIG
@NODE
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def install_hooks(root: str, uninstall: bool, wrap: str | None, config_path: str | None,
                  node: str | None, as_json: bool, **kinds: bool) -> None:
    """Install (or remove) the hooks through which a hypervisor tells this node's agent
    what happens to its guests; then print how to enable them."""
    chosen = [k for k in INSTALLERS if kinds.get(k)]
    if not chosen:
        raise click.UsageError("say which hooks: " + " ".join(f"--{k}" for k in INSTALLERS))
    target = HookTarget(Path(root), uninstall, options={"wrap": wrap} if wrap else {})
    if not uninstall:  # the hooks must know where the agent listens and where to spool
        topology, name = load_for_node(config_path, node)
        verdict_s = outwaits_refusal(topology.agent.store, HookTarget.timeout_s)
        target = HookTarget(Path(root), False, name, str(topology.agent.socket(name)),
                            str(topology.agent.spool(name)), verdict_timeout_s=verdict_s,
                            options=target.options)
    reports = {kind: installer(kind)(target) for kind in chosen}
    if as_json:
        click.echo(json.dumps({k: r.as_dict() for k, r in reports.items()}, indent=2))
        return
    for r in reports.values():
        for line in r.done:
            click.echo(line)
        click.echo(r.advice)
