"""``--node`` left out: the CLI finds this node by the addresses of the namespace it runs in,
else by the hostname (a UTS namespace of its own), else says why it cannot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed-2node.toml"
CONVERGENT = str(ROOT / ".venv/bin/convergent")

pytestmark = pytest.mark.root


def run_in(ns: str, *argv: str, hostname: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns]
    if hostname:  # a UTS namespace of its own: the machine's hostname is untouched
        cmd += ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]
    return subprocess.run([*cmd, CONVERGENT, *argv], capture_output=True, text=True,
                          timeout=60)


def test_node_from_a_local_address(netns) -> None:
    ns = netns("node")
    subprocess.run(["ip", "-n", ns, "link", "add", "up0", "type", "veth",
                    "peer", "name", "up1"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "192.168.122.12/24", "dev", "up0"],
                   check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "up0", "up"], check=True)
    proc = run_in(ns, "render-rules", "--config", str(SEED), hostname="node1")
    assert proc.returncode == 0, proc.stderr
    assert "192.168.122.12" in proc.stdout  # node2's rules, though the hostname says node1


def test_node_from_the_hostname_else_a_clear_error(netns) -> None:
    ns = netns("node")
    proc = run_in(ns, "render-rules", "--config", str(SEED), hostname="node1.example.net")
    assert proc.returncode == 0, proc.stderr
    assert "192.168.122.11" in proc.stdout
    proc = run_in(ns, "render-rules", "--config", str(SEED), hostname="elsewhere")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "convergent: cannot tell which node this host is: no address of a node (node1, node2) "
        "is on this host and the hostname 'elsewhere' is not a node; pass --node")
