"""``convergent install-hooks --xen``: put convergent's vif script where libxl finds it.

Installs ``ROOT/etc/xen/scripts/convergent-vif`` (hooks/xen-vif) and its ``hook.json``
beside it (where the agent's socket and spool are, which node this is, which script it
wraps: ``vif-bridge`` unless ``--wrap`` says otherwise or an earlier install chose one),
then says how to turn it on. It never edits a guest's configuration nor ``xl.conf``: which
guests go through convergent is the operator's choice, and a vif line naming a missing
script makes libxl fail the guest's boot. Running it again changes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator.cli.install_hooks import HookTarget, InstallReport
from orchestrator.errors import ConvergentError

SCRIPT = "convergent-vif"
CONF = "hook.json"
SCRIPTS_DIR = Path("etc/xen/scripts")
HOOK_MARK = "convergent's vif hotplug script"


class InstallError(ConvergentError):
    pass


@dataclass(frozen=True)
class HookConf:
    socket: str
    spool_dir: str
    node: str
    timeout_s: float = 1.5
    wrap: str = "vif-bridge"

    def text(self) -> str:
        return json.dumps({"socket": self.socket, "spool_dir": self.spool_dir,
                           "timeout_s": self.timeout_s, "node": self.node,
                           "wrap": self.wrap}, indent=2) + "\n"


def hook_source() -> str:
    return (resources.files("orchestrator.hooks") / "xen-vif").read_text()


def install(root: Path, conf: HookConf, wrap_given: bool = True) -> list[str]:
    """What it did, one line per file (``installed``, ``updated``, ``unchanged``)."""
    scripts = root / SCRIPTS_DIR
    scripts.mkdir(parents=True, exist_ok=True)
    if not wrap_given:  # keep the operator's earlier choice of wrapped script
        conf = HookConf(conf.socket, conf.spool_dir, conf.node, conf.timeout_s,
                        _previous_wrap(scripts / CONF) or conf.wrap)
    wrapped = Path(conf.wrap) if conf.wrap.startswith("/") else scripts / conf.wrap
    if not os.access(wrapped, os.X_OK):
        raise InstallError(f"the script to wrap, {wrapped}, is not there or not executable "
                           "(install xen-utils-common, or name another with --wrap)")
    done = [_put(scripts / SCRIPT, hook_source(), 0o755),
            _put(scripts / CONF, conf.text(), 0o644)]
    return done


def uninstall(root: Path) -> list[str]:
    scripts = root / SCRIPTS_DIR
    done = []
    script = scripts / SCRIPT
    if script.exists():
        if HOOK_MARK not in script.read_text(errors="replace"):
            raise InstallError(f"{script} is not convergent's vif script: left alone")
        script.unlink()
        done.append(f"removed {script}")
    conf = scripts / CONF
    if conf.exists():
        conf.unlink()
        done.append(f"removed {conf}")
    return done or [f"nothing to remove in {scripts}"]


def how_to_enable(root: Path) -> str:
    return f"""\
To send a guest's vif through convergent, name the script in its vif line (the guest's
own config file, e.g. /etc/xen/GUEST.cfg):
    vif = [ 'mac=...,bridge=...,script={SCRIPT}' ]
or make it the default for every vif in {root / 'etc/xen/xl.conf'}:
    vif.default.script="{SCRIPT}"
libxl reads the script when it attaches the vif: a running guest picks it up at its next
boot, or when migrated with the new config (xl migrate -C GUEST.cfg GUEST HOST); a
migration otherwise carries the guest's old config to the destination. Install it on
every node before enabling it for any guest. Nothing was changed in any guest's config."""


def how_it_was_removed() -> str:
    return f"""\
Guests whose vif line names script={SCRIPT} (or xl.conf's vif.default.script) now fail to
attach their vifs: point them back at vif-bridge before they next boot or migrate."""


def _put(path: Path, text: str, mode: int) -> str:
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return f"unchanged {path}"
    verb = "updated" if path.exists() else "installed"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return f"{verb} {path}"


def _previous_wrap(conf: Path) -> str | None:
    try:
        wrap = json.loads(conf.read_text()).get("wrap")
    except (OSError, ValueError, AttributeError):
        return None
    return wrap if isinstance(wrap, str) and wrap else None


def run(target: HookTarget) -> InstallReport:
    """The ``install-hooks --xen`` installer (entry point ``xen`` of the hook installers)."""
    if target.uninstall:
        return InstallReport(uninstall(target.root), how_it_was_removed())
    wrap = target.options.get("wrap")
    conf = HookConf(target.socket, target.spool_dir, target.node, target.timeout_s,
                    wrap or "vif-bridge")
    return InstallReport(install(target.root, conf, wrap_given=bool(wrap)),
                         how_to_enable(target.root))
