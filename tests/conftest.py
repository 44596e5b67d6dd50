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
from orchestrator.lab.netns import del_netns

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


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


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
