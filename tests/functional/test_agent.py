"""The agent's API and its peer channel, against real agents in a lab."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.agent.client import AgentError
from orchestrator.agent.keys import load_key
from orchestrator.agent.peer import PeerError, PeerFeed
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.migration.feed import FeedLost
from orchestrator.netns import in_netns
from tests.conftest import unique
from tests.functional.test_migration import agent

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(unique("ag"))
    try:
        lab.up(3)
        yield lab
    finally:
        lab.down()


def test_status_reports_ownership_and_reconcile(lab):
    st = agent(lab, "n1", "status")
    assert st["node"] == "n1" and st["owned"]["10.5.5.201"]["guest"] == "guest1"
    assert st["reconcile"]["runs"] >= 1 and st["reconcile"]["errors"] == 0
    assert agent(lab, "n2", "status")["owned"] == {}


def test_bad_requests_get_one_line_errors(lab):
    with pytest.raises(AgentError, match="unknown op 'nope'"):
        agent(lab, "n1", "nope")
    with pytest.raises(AgentError, match="unknown guest 'ghost'"):
        agent(lab, "n1", "guest.started", guest="ghost")
    with pytest.raises(AgentError, match="unexpected keyword argument"):
        agent(lab, "n1", "status", verbose=True)
    with pytest.raises(AgentError, match="no migration of guest1 to n3 in flight"):
        agent(lab, "n3", "migration.abort", guest="guest1")


def test_reconcile_restores_a_removed_set_element(lab):
    ns.in_ns(lab.names.node("n1"), "nft", "flush", "set", "ip", "convergent", "local_guests")
    changes = agent(lab, "n1", "reconcile")["changes"]
    # the periodic pass may have got there first; either way it is back now
    assert changes in ({"local_guests": [["10.5.5.201"], []]}, {})
    assert "10.5.5.201" in ns.in_ns(lab.names.node("n1"), "nft", "list", "set", "ip",
                                    "convergent", "local_guests")


def test_sync_status_sees_every_peer(lab):
    peers = {p["node"] for p in agent(lab, "n1", "sync.status")["peers"]}
    assert peers == {"n2", "n3"}


def _open_feed_from(lab: Lab, node: str, key: bytes, request: dict[str, Any]) -> BaseException:
    """Open a peer feed to n1's agent from inside ``node``'s namespace; the error it got."""
    t = lab.topology()
    feed = PeerFeed(node, key, str(t.node("n1").peer_ip), t.agent.peer_port, request, 0.5)
    with pytest.raises((PeerError, FeedLost)) as refused:
        in_netns(lab.names.node(node), asyncio.run, feed.open())
    return refused.value


def test_peer_channel_refuses_a_wrong_key_and_a_request_without_migration(lab):
    bad = _open_feed_from(lab, "n2", b"not-the-cluster-key-at-all", {"guest": "guest1"})
    assert "cluster key" in str(bad)
    key = load_key(lab.topology().agent.key_file)
    refused = _open_feed_from(lab, "n2", key, {"migration": "x", "guest": "guest1"})
    assert isinstance(refused, PeerError) and "without an active migration" in str(refused)
    assert agent(lab, "n1", "status")["peer"]["refused"] >= 1


# --- one agent per node; no traceback reaches the user ------------------------------------

CLI = [sys.executable, "-m", "orchestrator"]


def cli_in(lab: Lab, node: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(ns.exec_argv(lab.names.node(node), [*CLI, *argv]), capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "CONVERGENT_LAB_DIR":
                                                           str(lab.dir.parent)})


def test_a_second_agent_for_a_node_is_refused_and_the_first_keeps_its_socket(lab):
    first = agent(lab, "n1", "ping")["pid"]
    second = cli_in(lab, "n1", "agent", "--config", str(lab.config_path), "--node", "n1")
    assert second.returncode == 1
    assert second.stderr == (f"convergent: another agent for node n1 is running (pid {first}; "
                             f"lock {lab.topology().agent.run_dir}/agent-n1.lock)\n")
    assert agent(lab, "n1", "ping")["pid"] == first  # its socket is still there, still its own
    # SIGKILL leaves no stale lock: the kernel drops it with the process
    lab.kill_agent("n1")
    lab.start_agent("n1")
    assert agent(lab, "n1", "ping")["pid"] not in (first, None)


def _listen_soon(netns: str, addr: tuple[str, int]) -> socket.socket:
    """Listen on ``addr``: the killed agent's socket goes a moment after the process."""
    deadline = time.monotonic() + 3
    while True:
        try:
            return in_netns(netns, socket.create_server, addr)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_busy_peer_port_is_one_line(lab):
    t = lab.topology()
    lab.kill_agent("n3")
    busy = _listen_soon(lab.names.node("n3"), (str(t.node("n3").peer_ip), t.agent.peer_port))
    try:
        got = cli_in(lab, "n3", "agent", "--config", str(lab.config_path), "--node", "n3")
    finally:
        busy.close()
        lab.start_agent("n3")
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert got.stderr.splitlines()[-1] == (f"convergent: peer channel: cannot listen on "
                                           f"{t.node('n3').peer_ip}:{t.agent.peer_port}: "
                                           "Address already in use")


def test_an_unknown_guest_is_one_line_and_debug_shows_the_traceback(lab):
    got = cli_in(lab, "n1", "lab", "migrate", "nosuch", "--to", "n2", "--name", lab.name)
    assert (got.returncode, got.stderr) == (1, "convergent: unknown guest 'nosuch' "
                                               "(known: guest1)\n")
    debug = cli_in(lab, "n1", "--debug", "lab", "migrate", "nosuch", "--to", "n2",
                   "--name", lab.name)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.endswith("convergent: unknown guest 'nosuch' (known: guest1)\n")


def _raw_api(lab: Lab, line: bytes) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(
            str(lab.topology().agent.socket("n2")), limit=1 << 24)
        writer.write(line + b"\n")
        await writer.drain()
        reply = await reader.readline()
        writer.close()
        return dict(json.loads(reply))
    return asyncio.run(go())


def test_malformed_api_requests_get_an_error_and_the_agent_carries_on(lab):
    for line, why in [(b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
                      (b'{"op": ["status"]}', "'op' must be a string"),
                      (b'"status"', "expected a JSON object, got str"),
                      (b"[]", "expected a JSON object, got list")]:
        assert _raw_api(lab, line) == {"ok": False, "error": f"bad request: {why}"}
    assert agent(lab, "n2", "ping")["node"] == "n2"
    log = (lab.dir / "logs" / "agent-n2.log").read_text()
    assert "Traceback" not in log
