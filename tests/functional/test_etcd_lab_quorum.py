"""Migrations on a lab whose store is its own 3-member etcd (one member per node): a member
killed during a run of migrations, they go on; a second one killed (no quorum), the next
migration is refused at prepare with one clear line and no address ever has two owners;
the members back, the cluster reconciles and migrates again.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from orchestrator.errors import ConvergentError
from orchestrator.lab import netns as ns
from orchestrator.lab.etcd import etcd_binary
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from tests.conftest import unique

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (etcd-server)")]
G, ADDR = "guest1", "10.5.5.201"


def hosts_of(lab: Lab) -> dict[str, bool]:
    """Which nodes' kernels say they host the guest's address (their local_guests set)."""
    out = {}
    for n in ("n1", "n2", "n3"):
        raw = ns.in_ns(lab.names.node(n), "nft", "-j", "list", "set", "ip", "convergent",
                       "local_guests")
        elems = [o["set"].get("elem", []) for o in json.loads(raw)["nftables"] if "set" in o]
        out[n] = ADDR in [e for es in elems for e in es]
    return out


def one_owner_where_it_runs(lab: Lab, timeout: float = 10) -> str:
    """Exactly one node hosts the address in its kernel, and it is where the guest runs."""
    deadline = time.monotonic() + timeout
    while True:
        where = lab.guest_node(lab.topology(), G)
        hosts = hosts_of(lab)
        if [n for n, h in hosts.items() if h] == [where]:
            return str(where)
        assert time.monotonic() < deadline, (where, hosts)
        time.sleep(0.2)


def test_migrations_ride_over_a_dead_member_and_stop_cleanly_without_quorum() -> None:
    lab = Lab(unique("eq"))
    lab.up(store="etcd")
    members = lab.etcd()
    try:
        tour = ["n2", "n3", "n1", "n2", "n3", "n1"]
        async def kill_n3() -> None:  # between precopy and the move: mid-migration
            await asyncio.to_thread(members.kill, "n3")

        for i, dst in enumerate(tour):
            # a member dies in the middle of the third: two of three keep the quorum
            asyncio.run(migrate(lab, G, dst, before_move=kill_n3 if i == 2 else None))
            assert one_owner_where_it_runs(lab) == dst
        assert members.running() == ["n1", "n2"]
        members.kill("n2")  # now only n1's member is left: no quorum
        start = time.monotonic()
        with pytest.raises(ConvergentError) as err:
            asyncio.run(migrate(lab, G, "n2"))
        msg = str(err.value)
        assert "\n" not in msg and "no etcd member answered" in msg and "quorum" in msg, msg
        assert time.monotonic() - start < 20
        assert lab.guest_node(lab.topology(), G) == "n1"  # refused at prepare: never moved
        assert one_owner_where_it_runs(lab) == "n1"
        members.start("n2", "n3")
        members.wait_ready(timeout=30)
        # quorum back: a refused create may have been committed late (Raft); whatever it
        # left is aborted by its destination, and the next migration goes through
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(migrate(lab, G, "n2"))
                break
            except ConvergentError as exc:
                assert time.monotonic() < deadline, str(exc)
                time.sleep(1.0)
        assert one_owner_where_it_runs(lab) == "n2"
    finally:
        lab.down()
