"""The agent's API and its peer channel, against real agents in a lab."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import handshake as hs
from orchestrator.agent.client import AgentError
from orchestrator.agent.keys import load_key
from orchestrator.agent.peer import PeerFeed
from orchestrator.agent.peer_channel import PeerError
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.migration.feed import FeedLost
from orchestrator.netns import in_netns
from tests.conftest import running_lab
from tests.functional.test_migration import agent

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from running_lab("ag")


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
    # a peer shows once its first datagram arrived: right after the lab's start, maybe not
    deadline = time.monotonic() + 20
    while True:
        peers = {p["node"] for p in agent(lab, "n1", "sync.status")["peers"]}
        if peers == {"n2", "n3"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
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


# --- the peer channel before and at authentication -----------------------------------------


class RawPeer:
    """A TCP connection to n1's peer port from inside ``node``'s namespace, speaking frames
    by hand (what an attacker on the segment, or a broken agent, would send)."""

    def __init__(self, lab: Lab, node: str = "n2") -> None:
        t = lab.topology()
        self.addr = (str(t.node("n1").peer_ip), t.agent.peer_port)
        self.sock = in_netns(lab.names.node(node), socket.create_connection, self.addr, 5)
        self.sock.settimeout(6)
        self.sent = b""

    def frame(self, kind: bytes, body: bytes, mac: bytes = b"\0" * 16) -> None:
        data = struct.pack("!I", 1 + len(body) + 16) + kind + body + mac
        self.sent += data
        self.sock.sendall(data)

    def hello(self, **fields: object) -> None:
        self.frame(b"H", json.dumps(fields).encode())

    def read(self) -> tuple[bytes, bytes]:
        head = self._exactly(4)
        frame = self._exactly(struct.unpack("!I", head)[0])
        return frame[:1], frame[1:-16]

    def reply(self) -> dict[str, Any]:
        kind, body = self.read()
        assert kind == b"H"
        return dict(json.loads(body))

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "closed"
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def refusals(lab: Lab) -> dict[str, int]:
    return dict(agent(lab, "n1", "status")["peer"]["refusals"])


def test_malformed_handshakes_get_an_error_frame_and_a_counter(lab):
    nonce = "00" * 16
    cases = [
        ({}, "bad_version"), ([], "bad_handshake"), ("s", "bad_handshake"),
        ({"v": hs.PROTOCOL, "node": "n2", "nonce": 12345}, "bad_handshake"),
        ({"v": hs.PROTOCOL, "node": "../n2", "nonce": nonce}, "bad_handshake"),
        ({"v": "convergent-peer/0", "node": "n2", "nonce": nonce}, "bad_version"),  # downgrade
        ({"v": hs.PROTOCOL, "node": "n3", "nonce": nonce}, "wrong_address"),  # n2 claims n3
    ]
    before = refusals(lab)
    for hello, _reason in cases:
        peer = RawPeer(lab)
        peer.frame(b"H", json.dumps(hello).encode())
        assert "error" in peer.reply() and peer.closed_by_peer(), hello
        peer.close()
    deep = RawPeer(lab)
    deep.frame(b"H", b"[" * 1000)
    assert "error" in deep.reply()
    deep.close()
    after = refusals(lab)
    for reason in {r for _, r in cases}:
        want = sum(1 for _, r in cases if r == reason) + (reason == "bad_handshake")
        assert after.get(reason, 0) - before.get(reason, 0) == want, (reason, after)
    assert "Traceback" not in (lab.dir / "logs" / "agent-n1.log").read_text()


def test_unauthenticated_peers_hold_little_and_are_capped(lab):
    pid = agent(lab, "n1", "ping")["pid"]
    rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])  # noqa: E731
    start = rss()
    before = refusals(lab)
    for _ in range(24):  # an 8 MiB frame announced before any authentication
        peer = RawPeer(lab)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            peer.sock.sendall(struct.pack("!I", 8 << 20) + b"H" + b"x" * (64 << 10))
        assert "error" in peer.reply()
        peer.close()
    assert refusals(lab)["frame_too_large"] - before.get("frame_too_large", 0) == 24
    assert rss() - start < 16 << 10, (start, rss())  # KiB: nothing near 24 x 8 MiB stayed
    idle = [RawPeer(lab) for _ in range(hs_per_source())]
    time.sleep(0.2)  # the agent has accepted them all
    try:
        extra = RawPeer(lab)
        started = time.monotonic()
        assert extra.closed_by_peer() and time.monotonic() - started < 1  # not the 5 s timeout
        extra.close()
        assert refusals(lab)["too_many_unauthenticated"] >= 1
        other = RawPeer(lab, "n3")  # another source still gets its own share
        other.hello(v=hs.PROTOCOL, node="n3", nonce="00" * 16)
        assert other.reply()["node"] == "n1"
        other.close()
    finally:
        for peer in idle:
            peer.close()


def hs_per_source() -> int:
    from orchestrator.agent.peer import UNAUTHENTICATED_PER_SOURCE

    return UNAUTHENTICATED_PER_SOURCE


def _genuine_handshake(peer: RawPeer, key: bytes) -> tuple[bytes, bytes]:
    """As n2's agent would: returns the session key and S's nonce."""
    nc = os.urandom(16)
    peer.hello(v=hs.PROTOCOL, node="n2", nonce=nc.hex())
    s_hello = peer.reply()
    ns = bytes.fromhex(s_hello["nonce"])
    assert bytes.fromhex(s_hello["proof"]) == hs.proof(key, b"S", nc, ns, "n2", "n1")
    peer.hello(v=hs.PROTOCOL, proof=hs.proof(key, b"C", nc, ns, "n2", "n1").hex())
    return hs.session_key(key, nc, ns, "n2", "n1"), ns


def _frame_mac(session: bytes, counter: int, kind: bytes, body: bytes) -> bytes:
    return hmac.new(session, b"C" + struct.pack("!Q", counter) + kind + body,
                    hashlib.sha256).digest()[:16]


def test_handshake_resists_reflection_replay_and_a_stolen_session_key(lab):
    key = load_key(lab.topology().agent.key_file)
    before = refusals(lab)
    # reflection: hand S its own proof back as ours
    peer = RawPeer(lab)
    peer.hello(v=hs.PROTOCOL, node="n2", nonce=os.urandom(16).hex())
    peer.hello(v=hs.PROTOCOL, proof=peer.reply()["proof"])
    assert "cluster key" in peer.reply()["error"]
    peer.close()
    # replay: a genuine client's bytes, recorded and sent again on a new connection
    genuine = RawPeer(lab)
    session, _ = _genuine_handshake(genuine, key)
    body = json.dumps({"op": "released"}).encode()
    genuine.frame(b"J", body, _frame_mac(session, 0, b"J", body))  # a frame it accepts
    replay = RawPeer(lab)
    replay.sock.sendall(genuine.sent)
    replay.reply()  # S's hello, with a fresh nonce ...
    assert "cluster key" in replay.reply()["error"]  # ... so the recorded proof fails
    replay.close()
    # a stolen session key: it proves nothing in a new handshake ...
    thief = RawPeer(lab)
    nc = os.urandom(16)
    thief.hello(v=hs.PROTOCOL, node="n2", nonce=nc.hex())
    ns = bytes.fromhex(thief.reply()["nonce"])
    thief.hello(v=hs.PROTOCOL, proof=hs.proof(session, b"C", nc, ns, "n2", "n1").hex())
    assert "cluster key" in thief.reply()["error"]
    thief.close()
    # ... and forges nothing on another session
    other = RawPeer(lab)
    _genuine_handshake(other, key)
    other.frame(b"J", body, _frame_mac(session, 0, b"J", body))
    kind, answer = other.read()
    assert kind == b"J" and b"fails its MAC" in answer and other.closed_by_peer()
    other.close()
    genuine.close()
    after = refusals(lab)
    assert after["auth_failed"] - before.get("auth_failed", 0) == 3
    assert after["refused"] - before.get("refused", 0) >= 1  # the frame failing its MAC
