"""Shared fixtures. Namespaces get unique names and are removed even when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.lab.etcd import EtcdCluster, etcd_binary
from orchestrator.lab.lab import Lab
from orchestrator.lab.netns import del_netns, list_netns
from orchestrator.lab.plan import default_config

ROOT = Path(__file__).resolve().parent.parent


def _needs_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run the README's test command, which installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _needs_root()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


# where an installed convergent keeps its state (cluster.toml's defaults, a hook without a
# hook.json): a test or bench that lands there uses the host's real agent's files
SYSTEM_DIRS = tuple(map(Path, ("/var/spool/convergent", "/var/lib/convergent",
                               "/var/log/convergent", "/etc/convergent")))


def _system_entries() -> set[str]:
    found = set()
    for d in SYSTEM_DIRS:
        if d.is_dir():
            found.add(str(d))
            found.update(str(d / name) for name in os.listdir(d))
    return found


@pytest.fixture(autouse=True)
def _stays_out_of_the_systems_dirs() -> Iterator[None]:
    """Fails the test that wrote into the system's convergent directories (tests keep to
    their temporary directories and namespaces)."""
    before = _system_entries()
    yield
    new = sorted(_system_entries() - before)
    assert not new, f"the test wrote outside its temporary directories: {new[:5]}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def running_lab(prefix: str, nodes: int = 3, config: Callable[[Lab], str] | None = None,
                config_dir: Path | None = None, agents: bool = True) -> Iterator[Lab]:
    """For a lab fixture (``yield from running_lab("m")``): a lab of its own
    (``cvg-<prefix>-<id>-*``) with ``nodes`` nodes, or built from the cluster file
    ``config(lab)`` returns (written in ``config_dir``); always taken down, and none of its
    namespaces may outlive it."""
    lab = Lab(unique(prefix))
    path = None
    if config is not None:
        assert config_dir is not None, "a config needs a directory to live in"
        path = config_dir / f"{lab.name}.toml"
        path.write_text(config(lab))
    try:
        lab.up(nodes, config=path, agents=agents)
        yield lab
    finally:
        lab.down()
    assert not [n for n in list_netns() if n.startswith(lab.names.prefix)]


def lab_with_precopy_over(carrier: str, prefix: str, tmp_path: Path,
                          nodes: int = 3) -> Iterator[Lab]:
    """For a fixture: a lab with agents whose precopy rides ``carrier`` (``[sync] precopy``:
    "peer" or "replicator")."""
    def config(lab: Lab) -> str:
        return default_config(nodes, lab.name, lab.dir) + f'\n[sync]\nprecopy = "{carrier}"\n'

    yield from running_lab(prefix, nodes, config, tmp_path)


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory: ``netns("ct")`` creates a uniquely named namespace with lo up; all are
    deleted (with their processes killed) at teardown."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = unique(f"cvt-{prefix}")
        made.append(name)  # first: a signal right after the add must not leak it
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in made:
        del_netns(name)


@pytest.fixture(scope="session")
def etcd_url() -> Iterator[str]:
    """A real etcd for the session: ``CONVERGENT_TEST_ETCD`` if set, else one member of
    Debian's etcd-server started here on Unix sockets only (no network, no root)."""
    given = os.environ.get("CONVERGENT_TEST_ETCD")
    if given:
        yield given.rstrip("/")
        return
    if etcd_binary() is None:
        pytest.skip("needs etcd (Debian package etcd-server; scripts/setup.sh installs it)")
    with EtcdCluster.create(["solo"]) as cluster:
        cluster.start()
        cluster.wait_ready()
        yield cluster.url(prefix="")
