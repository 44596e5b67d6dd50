"""Defaults for the cluster file and this node: pure choices exhaustively, the address
test against the real kernel, and through the CLI."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.config import defaults
from orchestrator.config.defaults import config_path, is_local_address, pick_node
from orchestrator.config.loader import load
from orchestrator.errors import ConfigError

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml"
TOPOLOGY = load(SEED)
N1_PUB, N1_GUEST = IPv4Address("192.168.122.11"), IPv4Address("10.5.5.251")
N2_PUB = IPv4Address("192.168.122.12")


def local(*ips: IPv4Address):
    return lambda ip: ip in ips


@pytest.mark.parametrize(("locals_", "hostname", "expected"), [
    ((N1_PUB,), "whatever", "node1"),
    ((N1_GUEST,), "node2", "node1"),          # an address beats the hostname
    ((N2_PUB,), "node1.example.net", "node2"),
    ((), "node2", "node2"),
    ((), "node2.example.net", "node2"),       # the short hostname
    ((N1_PUB, N2_PUB), "node2", "node2"),     # both local (nonlocal_bind): the hostname picks
])
def test_pick_node(locals_, hostname, expected) -> None:
    assert pick_node(TOPOLOGY, local(*locals_), hostname) == expected


def test_pick_node_refuses_with_a_reason() -> None:
    with pytest.raises(ConfigError, match=r"no address of a node \(node1, node2\) is on this "
                                          r"host and the hostname 'box' is not a node; pass --node"):
        pick_node(TOPOLOGY, local(), "box")
    with pytest.raises(ConfigError, match="addresses of node1, node2 are all local"):
        pick_node(TOPOLOGY, local(N1_PUB, N2_PUB), "box")


def test_is_local_address_asks_the_kernel() -> None:
    assert is_local_address(IPv4Address("127.0.0.1"))
    assert not is_local_address(IPv4Address("192.0.2.77"))  # TEST-NET-1: never ours


def test_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_path("a.toml", {"CONVERGENT_CONFIG": "b.toml"}) == Path("a.toml")
    assert config_path(None, {"CONVERGENT_CONFIG": "b.toml"}) == Path("b.toml")
    missing = tmp_path / "etc" / "cluster.toml"
    monkeypatch.setattr(defaults, "DEFAULT_CONFIG", missing)
    with pytest.raises(ConfigError, match=f"no cluster config: {missing} does not exist "
                                          r"\(pass --config FILE or set CONVERGENT_CONFIG\)"):
        config_path(None, {})
    missing.parent.mkdir()
    missing.write_text("")
    assert config_path(None, {}) == missing


def test_cli_takes_the_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGENT_CONFIG", str(SEED))
    result = CliRunner().invoke(cli, ["render-rules", "--node", "node2"])
    assert result.exit_code == 0, result.output
    assert "192.168.122.12" in result.output


def test_cli_node_default_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults.socket, "gethostname", lambda: "not-a-node")
    result = CliRunner().invoke(cli, ["render-rules", "--config", str(SEED)])
    assert result.exit_code != 0
    assert "cannot tell which node this host is" in str(result.exception)
