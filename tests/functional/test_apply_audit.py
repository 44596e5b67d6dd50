"""``convergent apply`` writes one ``ruleset.apply`` audit record per attempt, for real in
a namespace: changed, then unchanged, then a ruleset nft rejects; ``audit verify`` passes."""

from __future__ import annotations

import json
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


def run_apply(config: Path, ns: str, log: Path | str) -> tuple[int, str, str]:
    """The CLI in-process (so a test can break the renderer); errors as ``main`` says them."""
    out = CliRunner().invoke(cli, ["apply", "--config", str(config), "--node", "n1",
                                   "--netns", ns, "--audit-log", str(log)])  # fmt: skip
    err = out.stderr + (str(out.exception) if out.exception else "")
    return out.exit_code, out.stdout, err


def test_each_apply_writes_one_record(netns: Callable[[str], str], config: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = netns("apply")
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
    ns = netns("apply")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code, out, err = run_apply(config, ns, blocker / "audit.log")
    assert code == 0, err
    assert "ruleset replaced" in out
    assert "warning: cannot open the audit log" in err
    assert nft.table_digest("ip", IP_TABLE, ns) is not None

