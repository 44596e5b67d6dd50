"""The reconciler: the pure ``desired_sets`` and ``changes`` (exhaustively, with
hypothesis), and passes over ``FakeNodeOps`` (held to nft by its contract suite) and a real
SQLite store."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.agent.reconcile import GATED_PHASES, Reconciler, changes, desired_sets
from orchestrator.config.loader import parse
from orchestrator.errors import RulesetError
from orchestrator.lab.plan import default_config
from orchestrator.migration.nodeops import FakeNodeOps, NodeSets
from orchestrator.store import open_store
from orchestrator.store.base import MigrationRecord, Ownership, Phase, Snapshot

T = parse(default_config(3, "u"))
NODES = ["n1", "n2", "n3"]
ADDRS = [IPv4Address(f"10.5.5.{i}") for i in range(201, 205)]
GUESTS = ["g1", "g2"]


def own(ip: IPv4Address, node: str | None) -> Ownership:
    return Ownership(ip, node, GUESTS[int(ip) % 2], 1, 0.0)


def mig(guest: str, dst: str, phase: Phase, addrs: list[IPv4Address]) -> MigrationRecord:
    return MigrationRecord(f"m-{guest}-{dst}", guest, tuple(addrs), "n1", dst, phase, 0.0, 0.0)


snapshots = st.builds(
    lambda owners, migs: Snapshot(1, tuple(owners), (), tuple(migs)),
    st.lists(st.builds(own, st.sampled_from(ADDRS), st.sampled_from([*NODES, None])),
             max_size=4, unique_by=lambda o: o.ip),
    st.lists(st.builds(mig, st.sampled_from(GUESTS), st.sampled_from(NODES),
                       st.sampled_from(list(Phase)),
                       st.lists(st.sampled_from(ADDRS), min_size=1, max_size=3, unique=True)),
             max_size=3),
)


@given(snapshots, st.sampled_from(NODES), st.sets(st.sampled_from(GUESTS)))
def test_desired_sets_follow_the_store(snap: Snapshot, node: str, ungated: set[str]) -> None:
    want = desired_sets(snap, node, ungated)
    owned = {str(o.ip) for o in snap.ownership if o.node == node}
    assert want.local_guests == owned
    for a in ADDRS:
        arriving = any(m.dst == node and m.phase in GATED_PHASES and m.guest not in ungated
                       and a in m.addresses for m in snap.migrations)
        # the gate holds exactly the arriving addresses this node does not own yet
        assert (str(a) in want.race_gate) == (arriving and str(a) not in owned)


def test_the_gate_closes_only_before_the_flip() -> None:
    a = ADDRS[0]
    gated = {p for p in Phase
             if desired_sets(Snapshot(1, (), (), (mig("g1", "n2", p, [a]),)), "n2").race_gate}
    assert gated == {Phase.PREPARE, Phase.PRECOPY, Phase.CUTOVER}
    flipped = Snapshot(1, (own(a, "n2"),), (), (mig("g1", "n2", Phase.CUTOVER, [a]),))
    assert desired_sets(flipped, "n2") == NodeSets(local_guests=frozenset({str(a)}))
    assert desired_sets(flipped, "n1") == NodeSets()
    control = Snapshot(1, (), (), (mig("g1", "n2", Phase.PRECOPY, [a]),))
    assert desired_sets(control, "n2", ungated={"g1"}) == NodeSets()


sets_ = st.builds(NodeSets, st.frozensets(st.sampled_from([str(a) for a in ADDRS])),
                  st.frozensets(st.sampled_from([str(a) for a in ADDRS])))


@given(sets_, sets_)
def test_changes_turn_current_into_desired(current: NodeSets, desired: NodeSets) -> None:
    todo = changes(current, desired)
    after = {}
    for name, have in current.by_set().items():
        add, remove = todo.get(name, ([], []))
        assert not set(add) & set(remove) and set(add).isdisjoint(have)
        after[name] = (have - set(remove)) | set(add)
    assert after == desired.by_set()
    assert (todo == {}) == (current == desired)


# --- passes ---------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_pass_writes_the_difference_once_and_repairs_lost_rules(tmp_path: Path) -> None:
    async def scenario() -> None:
        g = T.guest("guest1").addresses[0]
        async with await open_store(f"sqlite://{tmp_path / 's.db'}") as store:
            await store.claim_all({g: 0}, "n1", "guest1")
            ops = FakeNodeOps("n1")
            r = Reconciler(T, "n1", store, ops)
            assert await r.run() == {"local_guests": ([str(g)], [])}
            writes = ops.writes
            assert await r.run() == {} and ops.writes == writes  # nothing to do: no write
            ops.drop_rules()  # someone flushed our tables
            assert await r.run(ruleset=True) == {"local_guests": ([str(g)], [])}
            assert ops.applied == 1 and await ops.sets() == NodeSets(frozenset({str(g)}))
            # a migration to n2 closes n2's gate; n2's own pass sees it
            m = await store.create_migration("guest1", [g], "n1", "n2")
            r2 = Reconciler(T, "n2", store, ops2 := FakeNodeOps("n2"))
            assert await r2.run() == {"race_gate": ([str(g)], [])}
            await store.abort_migration(m.id, "test")
            await store.finish_migration(m.id)
            assert await r2.run() == {"race_gate": ([], [str(g)])}
            assert await ops2.sets() == NodeSets()
            assert (r.stats.runs, r.stats.changed, r.stats.errors) == (3, 2, 0)

    run(scenario())


def test_a_failed_pass_is_counted_and_raised(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with await open_store(f"sqlite://{tmp_path / 's.db'}") as store:
            await store.claim_all({T.guest("guest1").addresses[0]: 0}, "n1", "guest1")
            ops = FakeNodeOps("n1")
            ops.drop_rules()
            r = Reconciler(T, "n1", store, ops)
            with pytest.raises(RulesetError):
                await r.run()
            assert r.stats.errors == 1 and "no table" in (r.stats.last_error or "")

    run(scenario())
