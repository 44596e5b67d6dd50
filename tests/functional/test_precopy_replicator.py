"""A handover's precopy carried by the replicator (``[sync] precopy = "replicator"``) between
real agents, with every other precopy datagram into the destination dropped."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from tests.conftest import lab_with_precopy_over
from tests.functional.test_agent_faults import assert_completed
from tests.functional.test_migration import agent, established_pair

pytestmark = pytest.mark.root


@pytest.fixture
def lab(tmp_path) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    yield from lab_with_precopy_over("replicator", "pr", tmp_path)


def drop_every_other_precopy_datagram(lab: Lab, node: str) -> None:
    """Deterministic loss on ``node``'s sync link (this kernel has no netem): of the
    datagrams of precopy streams (wire header: stream, u16 at payload byte 8, is not 0)
    the 1st, 3rd, 5th... are dropped (numgen inc yields 1 first), so the first dump
    arrives only through a NACK."""
    t = lab.topology()
    netns = lab.names.node(node)
    ns.in_ns(netns, "nft", "add", "table", "netdev", "cvloss")
    ns.in_ns(netns, "nft", "add", "chain", "netdev", "cvloss", "rx", "{", "type", "filter",
             "hook", "ingress", "device", t.sync.interface, "priority", "0", ";", "}")
    ns.in_ns(netns, "nft", "add", "rule", "netdev", "cvloss", "rx", "udp", "dport",
             str(t.sync.port), "@th,128,16", "!=", "0", "numgen", "inc", "mod", "2", "==", "1",
             "counter", "drop")


def dropped(lab: Lab, node: str) -> int:
    out = ns.in_ns(lab.names.node(node), "nft", "list", "table", "netdev", "cvloss")
    return int(re.search(r"counter packets (\d+)", out).group(1))  # type: ignore[union-attr]


def test_precopy_rides_the_replicator_through_loss(lab):
    drop_every_other_precopy_datagram(lab, "n2")
    cli, conn = established_pair(lab, 7300)
    during: dict[str, Any] = {}

    async def look() -> None:  # precopy is synced: D follows n1's stream for the guest
        during["n2"] = (await asyncio.to_thread(agent, lab, "n2", "sync.status"))["precopy"]
        during["n1"] = (await asyncio.to_thread(agent, lab, "n1", "sync.status"))["precopy"]

    r = asyncio.run(migrate(lab, "guest1", "n2", before_move=look))
    assert (r.src, r.dst) == ("n1", "n2")
    following, sending = during["n2"]["following"], during["n1"]["sending"]
    assert [(f["from"], f["lag"]) for f in following] == [("n1", 0)]
    assert following[0]["entries"] >= 1  # the guest's SNAT flow
    assert following[0]["nacks"] >= 1  # the first dump was lost and NACKed
    assert [(s["to"], s["stream"]) for s in sending] == [("n2", following[0]["stream"])]
    assert agent(lab, "n1", "status")["peer"]["streams"] == 1
    assert_completed(lab, cli, conn)  # the SNAT flow dies without its entry on n2
    assert dropped(lab, "n2") > 0
    after = [agent(lab, n, "sync.status")["precopy"] for n in ("n1", "n2")]
    assert after == [{"sending": [], "following": []}] * 2  # both ends closed the stream
    cli.close()
    conn.close()
