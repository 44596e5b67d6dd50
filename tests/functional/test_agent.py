"""The agent's API and its peer channel, against real agents in a lab."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.agent.client import AgentError
from orchestrator.agent.keys import load_key
from orchestrator.agent.peer import PeerError, PeerFeed
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.migration.feed import FeedLost
from orchestrator.netfilter.conntrack import in_netns
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
