"""``convergent install-hooks --libvirt``: put convergent's qemu hook where libvirt runs it.

Files, under ``ROOT/etc/libvirt/hooks/``:

- ``convergent/`` holds the hook (hooks/libvirt-qemu), the stdlib client it imports
  (hookclient.py) and its ``hook.json`` (the agent's socket, the spool, the node);
- libvirt >= 6.5: ``qemu.d/convergent``, a link to it. libvirt runs an operator's own
  ``hooks/qemu`` first and then every ``qemu.d/*``, each seeing the XML of the one
  before; convergent prints nothing, so it changes nothing for the others;
- older libvirt knows only ``hooks/qemu``: the link goes there, and an operator's hook
  found there moves to ``convergent/qemu.chained``, which convergent's hook runs first
  (its stdout and a failing exit status stay libvirt's answer). Uninstalling puts it back.

Nothing of the operator's is overwritten: a foreign file where convergent's would go stops
the install with one line. Running it again changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from orchestrator.cli.install_hooks import HookTarget, InstallReport
from orchestrator.errors import ConvergentError

HOOKS_DIR = Path("etc/libvirt/hooks")
OWN_DIR = "convergent"
HOOK = "libvirt-qemu"
CLIENT = "hookclient.py"
CONF = "hook.json"
LINK = "convergent"  # in qemu.d/
CHAINED = "qemu.chained"
HOOK_MARK = "convergent's libvirt qemu hook"
QEMU_D_SINCE = (6, 5)


class InstallError(ConvergentError):
    pass


@dataclass(frozen=True)
class HookConf:
    socket: str
    spool_dir: str
    node: str
    timeout_s: float = 1.5
    chain: str | None = None
    verdict_timeout_s: float = 1.5  # migrate begin: outwaits the store's refusal

    def text(self) -> str:
        d: dict[str, object] = {"socket": self.socket, "spool_dir": self.spool_dir,
                                "timeout_s": self.timeout_s, "node": self.node,
                                "verdict_timeout_s": max(self.timeout_s, self.verdict_timeout_s)}
        if self.chain:
            d["chain"] = self.chain
        return json.dumps(d, indent=2) + "\n"


def parse_version(text: str) -> tuple[int, int] | None:
    """``libvirtd (libvirt) 9.0.0`` -> (9, 0)."""
    m = re.search(r"(\d+)\.(\d+)(?:\.\d+)?", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def libvirt_version() -> tuple[int, int] | None:
    try:
        out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(out)


def uses_qemu_d(version: tuple[int, int] | None) -> bool:
    return version is None or version >= QEMU_D_SINCE  # unknown: a current libvirt


def source(name: str) -> str:
    return (resources.files("orchestrator.hooks") / name).read_text()


# install ---------------------------------------------------------------------------
def install(root: Path, conf: HookConf, version: tuple[int, int] | None) -> list[str]:
    hooks = root / HOOKS_DIR
    own = hooks / OWN_DIR
    own.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    target = f"../{OWN_DIR}/{HOOK}" if uses_qemu_d(version) else f"{OWN_DIR}/{HOOK}"
    if uses_qemu_d(version):
        link = hooks / "qemu.d" / LINK
        _refuse_foreign(link, target)
        link.parent.mkdir(exist_ok=True)
    else:
        link = hooks / "qemu"
        done += _chain_operator_hook(link, own, target)
        conf = replace(conf, chain=str(Path("/") / HOOKS_DIR / OWN_DIR / CHAINED)
                       if (own / CHAINED).exists() else None)
    done += [_put(own / HOOK, source(HOOK), 0o755), _put(own / CLIENT, source(CLIENT), 0o644),
             _put(own / CONF, conf.text(), 0o644), _link(link, target)]
    operator = hooks / "qemu"
    if uses_qemu_d(version) and (operator.exists() or operator.is_symlink()):
        done.append(f"kept {operator} (libvirt runs it before qemu.d/{LINK})")
    return done


def _refuse_foreign(path: Path, ours: str) -> None:
    if path.is_symlink() and os.readlink(path) == ours:
        return
    if path.exists() or path.is_symlink():
        raise InstallError(f"{path} exists and is not convergent's: left alone "
                           "(remove or rename it, then install again)")


def _chain_operator_hook(link: Path, own: Path, ours: str) -> list[str]:
    """libvirt < 6.5: the operator's hooks/qemu moves aside, to be run first."""
    if link.is_symlink() and os.readlink(link) == ours:
        return []
    if not (link.exists() or link.is_symlink()):
        return []
    if HOOK_MARK in link.read_text(errors="replace"):
        raise InstallError(f"{link} is a copy of convergent's hook: remove it first")
    chained = own / CHAINED
    if chained.exists():
        raise InstallError(f"{link} is an operator's hook, and {chained} holds another: "
                           "left both alone")
    os.replace(link, chained)
    return [f"moved {link} to {chained} (convergent's hook runs it first)"]


def _put(path: Path, text: str, mode: int) -> str:
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return f"unchanged {path}"
    verb = "updated" if path.exists() else "installed"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return f"{verb} {path}"


def _link(path: Path, target: str) -> str:
    if path.is_symlink() and os.readlink(path) == target:
        return f"unchanged {path}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(path)
    return f"installed {path} -> {target}"


# uninstall -------------------------------------------------------------------------
def uninstall(root: Path) -> list[str]:
    hooks = root / HOOKS_DIR
    own = hooks / OWN_DIR
    hook = own / HOOK
    if hook.exists() and HOOK_MARK not in hook.read_text(errors="replace"):
        raise InstallError(f"{hook} is not convergent's hook: left alone")
    done: list[str] = []
    for link, target in ((hooks / "qemu.d" / LINK, f"../{OWN_DIR}/{HOOK}"),
                         (hooks / "qemu", f"{OWN_DIR}/{HOOK}")):
        if link.is_symlink() and os.readlink(link) == target:
            link.unlink()
            done.append(f"removed {link}")
    chained = own / CHAINED
    if chained.exists():
        if (hooks / "qemu").exists() or (hooks / "qemu").is_symlink():
            raise InstallError(f"{hooks / 'qemu'} exists again: {chained} (the operator's "
                               "hook) left where it is")
        os.replace(chained, hooks / "qemu")
        done.append(f"restored {hooks / 'qemu'} (the operator's hook)")
    for name in (HOOK, CLIENT, CONF):
        if (own / name).exists():
            (own / name).unlink()
            done.append(f"removed {own / name}")
    if own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    return done or [f"nothing to remove in {hooks}"]


def how_to_enable(root: Path, version: tuple[int, int] | None) -> str:
    where = "qemu.d/" + LINK if uses_qemu_d(version) else "qemu"
    return (f"libvirt runs {root / HOOKS_DIR / where} for every guest from now on (a libvirtd "
            "that had no hook at all when it started finds it at its next start: restart it "
            "then). Install it on every node: a destination without it cannot refuse a guest "
            "unknown to the cluster.")


def how_it_was_removed() -> str:
    return ("libvirt no longer tells this node's agent about its guests: migrations to and "
            "from here now lose their guest-initiated flows.")


def run(target: HookTarget) -> InstallReport:
    """The ``install-hooks --libvirt`` installer (entry point ``libvirt`` of the hook
    installers)."""
    if target.uninstall:
        return InstallReport(uninstall(target.root), how_it_was_removed())
    version = target.options.get("libvirt_version") or libvirt_version()
    conf = HookConf(target.socket, target.spool_dir, target.node, target.timeout_s,
                    verdict_timeout_s=target.verdict_timeout_s)
    return InstallReport(install(target.root, conf, version), how_to_enable(target.root, version))
