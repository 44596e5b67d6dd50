"""``convergent apply`` writes one ``ruleset.apply`` audit record per attempt, for real in
a namespace: changed, then unchanged, then a ruleset nft rejects; ``audit verify`` passes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.config.loader import load
from orchestrator.lab.plan import default_config
from orchestrator.netfilter import apply as apply_mod
from orchestrator.netfilter import nft
from orchestrator.netfilter.render import IP_TABLE, Ruleset, render

pytestmark = pytest.mark.root


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(default_config(3, "aud"))
    return path


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def as_node(ns: str, pub: str = "192.168.122.11", guest: str = "10.5.5.251") -> str:
    """Give a bare namespace a node's own addresses, as that node's host has them."""
    for addr in (pub, guest):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
    return ns


def run_apply(config: Path, ns: str, log: Path | str, node: str = "n1",
              *extra: str) -> tuple[int, str, str]:  # fmt: skip
    """The CLI in-process (so a test can break the renderer); errors as ``main`` says them."""
    out = CliRunner().invoke(cli, ["apply", "--config", str(config), "--node", node,
                                   "--netns", ns, "--audit-log", str(log), *extra])  # fmt: skip
    err = out.stderr + (str(out.exception) if out.exception else "")
    return out.exit_code, out.stdout, err


def test_each_apply_writes_one_record(netns: Callable[[str], str], config: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = as_node(netns("apply"))
    log = tmp_path / "audit" / "audit.log"
    digest = render(load(config), "n1").digest

    code, out, err = run_apply(config, ns, log)
    assert code == 0, err
    assert "ruleset replaced" in out
    [first] = records(log)
    assert first["action"] == "ruleset.apply"
    assert (first["node"], first["actor"], first["outcome"]) == ("n1", "cli", "ok")
    assert first["detail"].startswith(f"changed digest={digest} ruleset=replaced")
    assert first["duration_ms"] > 0
    assert nft.table_digest("ip", IP_TABLE, ns) == digest

    code, out, err = run_apply(config, ns, log)
    assert code == 0, err
    assert "ruleset unchanged" in out
    second = records(log)[1]
    assert len(records(log)) == 2
    assert (second["outcome"], second["detail"]) == ("ok", f"unchanged digest={digest}")
    assert second["duration_ms"] > 0

    # a ruleset nft refuses: the real nft in the namespace rejects it, nothing changes
    def broken(topology, node):  # type: ignore[no-untyped-def]
        good = render(topology, node)
        return Ruleset(good.node, good.text + "\ntable ip convergent { chain x { nonsense } }\n",
                       "0badbadbadbadbad")

    monkeypatch.setattr(apply_mod, "render", broken)
    code, _out, err = run_apply(config, ns, log)
    assert code == 1
    assert "nft rejected the ruleset" in err
    third = records(log)[2]
    assert len(records(log)) == 3
    assert third["outcome"] == "failed"
    assert third["detail"].startswith("failed digest=0badbadbadbadbad: RulesetError: nft rejected")
    assert nft.table_digest("ip", IP_TABLE, ns) == digest  # the old ruleset still runs

    verify = CliRunner().invoke(cli, ["audit", "verify", "--log", str(log)])
    assert verify.exit_code == 0, verify.output + verify.stderr


def test_an_unwritable_log_warns_and_still_applies(netns: Callable[[str], str], config: Path,
                                                   tmp_path: Path) -> None:
    ns = as_node(netns("apply"))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code, out, err = run_apply(config, ns, blocker / "audit.log")
    assert code == 0, err
    assert "ruleset replaced" in out
    assert "warning: cannot open the audit log" in err
    assert nft.table_digest("ip", IP_TABLE, ns) is not None



def test_apply_into_another_nodes_host_is_refused_unless_forced(
        netns: Callable[[str], str], config: Path, tmp_path: Path) -> None:  # fmt: skip
    ns = as_node(netns("apply"), "192.168.122.12", "10.5.5.252")  # this host is n2
    log = tmp_path / "audit.log"
    assert run_apply(config, ns, log, "n2")[0] == 0
    n2_digest = nft.table_digest("ip", IP_TABLE, ns)
    code, _out, err = run_apply(config, ns, log, "n1")
    assert code == 1
    assert err.strip() == ("n1's own addresses 192.168.122.11, 10.5.5.251 are not configured "
                           "here; it holds the addresses of n2: refusing to replace this "
                           "host's ruleset with another node's (--force to apply anyway)")
    assert nft.table_digest("ip", IP_TABLE, ns) == n2_digest  # n2's ruleset untouched
    assert run_apply(config, ns, log, "n1", "--force")[0] == 0
    assert nft.table_digest("ip", IP_TABLE, ns) == render(load(config), "n1").digest
