"""``convergent sync status|commit`` against a stand-in agent on a real Unix socket: the
requests they send and how they print the answers."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml"

STATUS = {
    "node": "node1", "tag": 1, "boot": 0x6500000012345678, "seq": 41, "entries": 3,
    "resyncing": False, "tracked": ["10.5.5.201"], "sender": {"data_sent": 42, "nack": 2},
    "peers": [{"node": "node2", "tag": 2, "boot": 0x6500000087654321, "expected_seq": 7,
               "lag": 0, "entries": 12, "drops": {"bad_hmac": 3, "old": 1}, "nacks": 4,
               "resyncs": 1}],
    "unattributed_drops": {"truncated": 2},
}
COMMIT = {"from_node": "node2", "to_node": "node1", "guests": ["guest1"], "cached": 12,
          "pushed": 10, "unchanged": 0, "skipped": 2, "deleted": 0, "no_guest": 0,
          "errors": 0, "first_error": None}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Path, list[dict]]]:
    seen: list[dict] = []
    answers = {"sync.status": STATUS, "sync.commit": COMMIT}

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            seen.append(req)
            reply = {"ok": True, "result": answers[req["op"]]}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    config = tmp_path / "c.toml"
    config.write_text(SEED.read_text() + f'\n[agent]\nrun_dir = "{tmp_path}"\n')
    server = socketserver.UnixStreamServer(str(tmp_path / "agent-node1.sock"), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield config, seen
    server.shutdown()
    server.server_close()


def test_status_asks_the_agent_and_prints_peers(agent):
    config, seen = agent
    out = CliRunner().invoke(cli, ["sync", "status", "--config", str(config), "--node", "node1"])
    assert out.exit_code == 0, out.output
    assert seen == [{"op": "sync.status", "args": {}}]
    assert "node node1 tag 1 boot 0x6500000012345678 seq 41 entries 3" in out.output
    peer = next(line for line in out.output.splitlines() if line.strip().startswith("node2"))
    assert peer.split()[:8] == ["node2", "2", "0x6500000087654321", "7", "0", "12", "4", "1"]
    assert "bad_hmac=3, old=1" in peer and "from strangers: truncated=2" in out.output


def test_status_json_is_the_agents_answer(agent):
    config, _ = agent
    out = CliRunner().invoke(cli, ["sync", "status", "--json", "--config", str(config),
                                   "--node", "node1"])
    assert out.exit_code == 0 and json.loads(out.output) == STATUS


def test_commit_sends_from_and_guest(agent):
    config, seen = agent
    out = CliRunner().invoke(cli, ["sync", "commit", "--from", "node2", "--guest", "guest1",
                                   "--config", str(config), "--node", "node1"])
    assert out.exit_code == 0, out.output
    assert seen == [{"op": "sync.commit", "args": {"from_node": "node2", "guest": "guest1"}}]
    assert "node2 -> node1 (guests: guest1): 12 cached, 10 written" in out.output


def test_no_agent_is_one_readable_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(SEED.read_text() + f'\n[agent]\nrun_dir = "{tmp_path}"\n')
    out = CliRunner().invoke(cli, ["sync", "status", "--config", str(config), "--node", "node1"])
    assert out.exit_code != 0 and "no agent on" in str(out.exception)
