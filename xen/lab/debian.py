"""Debian's real Xen hotplug scripts (``/etc/xen/scripts``), unpacked from the package.

``xen-utils-common`` holds vif-bridge, vif-common.sh, xen-hotplug-common.sh and friends.
Installing it would pull in udev and systemd-sysv (LIBVIRT-XEN.md §5), so we only
``apt-get download`` the .deb and ``dpkg-deb -x`` it into a cache, once per version.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from orchestrator.errors import ConvergentError

PACKAGE = "xen-utils-common"
CACHE = Path(os.environ.get("CONVERGENT_XEN_CACHE", "/var/cache/convergent/debian-xen"))
SCRIPTS = Path("etc/xen/scripts")
NEEDED = ("vif-bridge", "vif-common.sh", "xen-hotplug-common.sh", "xen-network-common.sh",
          "xen-script-common.sh", "logging.sh", "locking.sh", "hotplugpath.sh")


class DebianScriptsError(ConvergentError):
    pass


def scripts_dir(cache: Path = CACHE) -> Path:
    """The unpacked ``etc/xen/scripts`` of Debian's package, fetching it on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tests and labs may ask at once
        current = cache / "current"
        if _complete(current / SCRIPTS):
            return (current / SCRIPTS).resolve()
        version_dir = _fetch(cache)
        tmp_link = cache / ".current.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(version_dir.name)
        os.replace(tmp_link, current)
        return (current / SCRIPTS).resolve()


def version(cache: Path = CACHE) -> str:
    """The Debian version of the unpacked scripts (``4.17.7+13-…``)."""
    return (cache / "current").resolve().name


def _complete(scripts: Path) -> bool:
    return all((scripts / name).is_file() for name in NEEDED)


def _fetch(cache: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        deb = _download(Path(tmp))
        ver = deb.name.split("_")[1]
        target = cache / ver
        if not _complete(target / SCRIPTS):
            shutil.rmtree(target, ignore_errors=True)
            unpack = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(deb), str(unpack)])
            if not _complete(unpack / SCRIPTS):
                raise DebianScriptsError(f"{deb.name} has no {SCRIPTS}/vif-bridge")
            os.replace(unpack, target)
        return target


def _download(where: Path) -> Path:
    argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", PACKAGE]
    proc = subprocess.run(argv, cwd=where, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:  # an image without package lists: fetch them once, retry
        _run(["apt-get", "update", "-qq"], timeout=300)
        _run(argv, cwd=where, timeout=300)
    debs = sorted(where.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise DebianScriptsError(f"apt-get download {PACKAGE} left no .deb in {where}")
    return debs[-1]


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 120) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DebianScriptsError(f"{' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise DebianScriptsError(f"{' '.join(argv)}: {lines[-1] if lines else 'failed'}")


if __name__ == "__main__":  # scripts/setup.sh fetches them ahead of the tests
    print(f"debian xen scripts: {scripts_dir()} ({version()})")
