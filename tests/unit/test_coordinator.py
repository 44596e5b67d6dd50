"""The migration coordinator over the fakes (``FakeConntrack``, ``FakeNodeOps``, held to the
kernel by their contract suites) and a real SQLite store: every phase, the follower, the
final delta, abort, replay, the control run, a lost source. No root, no namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.loader import parse
from orchestrator.config.schema import Topology
from orchestrator.errors import MigrationError
from orchestrator.handover.planner import dest_key
from orchestrator.lab.plan import default_config
from orchestrator.migration.coordinator import Coordinator, MigrationState, NodeHandle
from orchestrator.migration.feed import FeedLost, LocalFeed, SourceFeed, SourceSide
from orchestrator.migration.nodeops import FakeNodeOps, NodeSets
from orchestrator.model.conntrack import Entry, Key, Status, TcpFlag, Tuple
from orchestrator.netfilter.conntrack.fake import FakeConntrack
from orchestrator.store import open_store
from orchestrator.store.base import MigrationRecord, Phase, Store
from tests.entries import PUSHED, tcp, udp

T: Topology = parse(default_config(3, "u"))
GUEST, G = "guest1", "10.5.5.201"
BIT = T.cluster.handover_bit
WS_ = "192.168.122.1"  # a client on the uplink
SNAT = Status.SRC_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE


def inbound(sport: int, via: int) -> Entry:
    """client -> guest:80, entered through node ``via`` (its tag in the mark)."""
    return tcp(WS_, G, sport, 80, mark=via)


def snatted(sport: int) -> Entry:
    """guest -> workstation, SNATed by n1 to its public address."""
    reply = Tuple.of(WS_, "192.168.122.11", 6, 7300, sport)
    return replace(tcp(G, WS_, sport, 7300), tuple_reply=reply, status=PUSHED | SNAT, mark=1)


@dataclass
class Cluster:
    store: Store
    tables: dict[str, FakeConntrack]
    ops: dict[str, FakeNodeOps]

    def coordinator(self, **kw: Any) -> Coordinator:
        nodes = {n: NodeHandle(n, self.tables[n], self.ops[n]) for n in self.tables}
        return Coordinator(T, self.store, nodes, **kw)

    def keys_on(self, node: str) -> set[Key]:
        return {e.key for e in self.tables[node].dump()}

    def expected_on_dst(self) -> set[Key]:
        keys = {dest_key(e, T, GUEST, "n1", "n2") for e in self.tables["n1"].dump()}
        return {k for k in keys if k is not None}

    async def owner(self) -> str | None:
        [own] = await self.store.list_ownership(guest=GUEST)
        return own.node


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    async def make() -> Cluster:
        store = await open_store(f"sqlite://{tmp_path / 'store.db'}")
        for n in T.nodes:
            await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
        await store.claim_all({G: 0}, "n1", GUEST)
        return Cluster(store, {n.name: FakeConntrack() for n in T.nodes},
                       {n.name: FakeNodeOps(n.name) for n in T.nodes})

    c = asyncio.run(make())
    c.ops["n1"].elements["local_guests"].add(G)
    c.tables["n1"].track([inbound(40000 + i, via=1 + i % 3) for i in range(6)]
                         + [snatted(41000 + i) for i in range(3)]
                         + [udp(WS_, G, 5000, 123, mark=2)])
    yield c
    asyncio.run(c.store.close())


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def moved(c: Cluster, coord: Coordinator,
                during: Callable[[], Awaitable[None]] | None = None) -> MigrationState:  # fmt: skip
    async def move(resumed: Callable[[], Awaitable[None]]) -> None:
        if during is not None:
            await during()
        await resumed()

    return await coord.run(GUEST, "n1", "n2", move)


# --- a whole migration ---------------------------------------------------------------------


def test_a_migration_hands_every_flow_over_and_flips_ownership(cluster: Cluster) -> None:
    c = cluster
    h = run(moved(c, c.coordinator()))
    assert h.record.phase == Phase.DONE and h.entries_pushed == 10
    assert c.keys_on("n2") == c.expected_on_dst() and len(c.expected_on_dst()) == 10
    d = c.tables["n2"].dump()
    assert not [e for e in d if e.mark & BIT]  # finalize made them D's own
    snat_on_d = [e for e in d if e.tuple_orig.dport == 7300]
    assert {e.tuple_reply for e in snat_on_d} == {e.tuple_orig.reversed() for e in snat_on_d}
    assert {e.mark for e in snat_on_d} == {1}  # un-NATed, S's tag
    assert run(c.owner()) == "n2"
    assert run(c.ops["n2"].sets()) == NodeSets(local_guests=frozenset({G}))
    assert run(c.ops["n1"].sets()) == NodeSets()
    assert c.ops["n2"].announced == [("guestbr0", T.cluster.gateway)]
    # S stays on the return path: its TCP entries are liberal now, its bindings kept
    s = c.tables["n1"].dump()
    assert all(e.tcp.flags_orig & TcpFlag.BE_LIBERAL for e in s if e.tcp is not None)
    assert len([e for e in s if e.status & Status.SRC_NAT]) == 3


def test_precopy_leaves_the_gate_closed_and_marks_what_it_pushed(cluster: Cluster) -> None:
    c = cluster

    async def scenario() -> tuple[NodeSets, list[Entry]]:
        coord = c.coordinator()
        h = await coord.prepare(GUEST, "n1", "n2")
        await coord.precopy(h)
        try:
            return await c.ops["n2"].sets(), c.tables["n2"].dump()
        finally:
            await coord.abort(h, "test over")

    gate, pushed = run(scenario())
    assert gate == NodeSets(race_gate=frozenset({G}))
    assert len(pushed) == 10 and all(e.mark & BIT for e in pushed)


def test_the_follower_carries_s_changes_until_cutover(cluster: Cluster) -> None:
    c = cluster
    late, gone = inbound(42000, via=3), c.tables["n1"].dump()[0]

    async def during() -> None:
        c.tables["n1"].push([late])
        c.tables["n1"].delete([gone])
        await until(lambda: late.key in c.keys_on("n2") and gone.key not in c.keys_on("n2"))

    run(moved(c, c.coordinator(), during))
    assert c.keys_on("n2") == c.expected_on_dst()


class _OnlyAtTheBarrier(LocalFeed):
    """S's changes reach D only through the cutover's drain (the follower never wakes), as
    when they happen right before the pause."""

    async def wait(self) -> None:
        await asyncio.Event().wait()


def test_the_final_delta_reaches_d_before_the_gate_opens(cluster: Cluster) -> None:
    c = cluster
    last = [inbound(43000 + i, via=2) for i in range(3)]
    seen: list[set[Key]] = []
    arrive = c.ops["n2"].arrive

    async def check_then_arrive(addresses: Any, open_gate: bool) -> None:
        seen.append(c.keys_on("n2"))
        await arrive(addresses, open_gate)

    c.ops["n2"].arrive = check_then_arrive  # type: ignore[method-assign]

    def feed(r: MigrationRecord) -> SourceFeed:
        return _OnlyAtTheBarrier(SourceSide(c.tables[r.src], T, r.guest, r.src, r.dst,
                                            r.addresses))  # fmt: skip

    async def during() -> None:
        c.tables["n1"].push(last)
        await asyncio.sleep(0.05)
        assert not {e.key for e in last} & c.keys_on("n2")

    run(moved(c, c.coordinator(feed_factory=feed), during))
    assert {e.key for e in last} <= seen[0]
    assert c.keys_on("n2") == c.expected_on_dst()


def test_an_overrun_on_s_resyncs_from_a_dump(cluster: Cluster) -> None:
    c = cluster
    lost = inbound(44000, via=1)

    async def during() -> None:
        c.tables["n1"].track([lost], reported=False)
        c.tables["n1"].inject_overrun()
        await until(lambda: lost.key in c.keys_on("n2"))

    run(moved(c, c.coordinator(), during))
    assert c.keys_on("n2") == c.expected_on_dst()


# --- abort, replay, control, lost source ---------------------------------------------------


def test_abort_takes_back_exactly_what_was_pushed(cluster: Cluster) -> None:
    c = cluster
    own = tcp("198.51.100.9", "10.5.5.77", 1)  # D's own entry, not the guest's
    c.tables["n2"].push([own])

    async def failing(resumed: Callable[[], Awaitable[None]]) -> None:
        raise MigrationError("the hypervisor gave up")

    with pytest.raises(MigrationError, match="gave up"):
        run(c.coordinator().run(GUEST, "n1", "n2", failing))
    assert c.keys_on("n2") == {own.key}
    assert run(c.ops["n2"].sets()) == NodeSets()
    assert run(c.owner()) == "n1"
    [m] = run(c.store.list_migrations(active=False, guest=GUEST))
    assert m.phase == Phase.ABORTED and "gave up" in (m.error or "")


def test_a_restarted_coordinator_replays_precopy_and_abort_by_the_bit(cluster: Cluster) -> None:
    """A new agent remembers nothing: re-planning pushes nothing twice, and the abort
    finds what was pushed by the handover bit alone."""
    c = cluster

    async def scenario() -> tuple[list[str], int]:
        first = c.coordinator()
        h = await first.prepare(GUEST, "n1", "n2")
        await first.precopy(h)
        assert h.follower is not None and h.feed is not None
        h.follower.cancel()  # the old agent dies
        await h.feed.close()
        again = c.coordinator()
        record = await c.store.get_migration(h.record.id)
        assert record is not None
        h2 = MigrationState(record)
        before = list(c.tables["n2"].calls)
        await again.precopy(h2)
        pushes = c.tables["n2"].calls[len(before):]
        await again.abort(MigrationState(h2.record), "restarted and aborted")
        return pushes, c.tables["n2"].count()

    pushes, left = run(scenario())
    assert "push" not in pushes  # D already held everything as planned
    assert left == 0


def test_the_control_run_hands_nothing_over(cluster: Cluster) -> None:
    c = cluster
    h = run(moved(c, c.coordinator(handover=False)))
    assert h.record.phase == Phase.DONE and h.entries_pushed == 0
    assert c.tables["n2"].count() == 0 and run(c.owner()) == "n2"
    assert c.ops["n2"].announced == []
    assert run(c.ops["n2"].sets()) == NodeSets(local_guests=frozenset({G}))


class _Gone(SourceFeed):
    async def open(self) -> list[Entry]:
        raise FeedLost("source agent unreachable")

    async def wait(self) -> None:
        raise FeedLost("gone")

    async def take(self) -> list[Any]:
        return []

    async def drain(self) -> list[Any]:
        return []

    async def close(self, released: bool = False) -> None:
        return None


def test_a_lost_source_costs_the_handover_never_the_migration(cluster: Cluster) -> None:
    c = cluster

    def factory(record: MigrationRecord) -> SourceFeed:
        return _Gone()

    h = run(moved(c, c.coordinator(feed_factory=factory)))
    assert h.source_lost and h.record.phase == Phase.DONE
    assert run(c.owner()) == "n2" and c.tables["n2"].count() == 0
    assert run(c.ops["n2"].sets()) == NodeSets(local_guests=frozenset({G}))


def test_refusals_name_what_is_wrong(cluster: Cluster) -> None:
    coord = cluster.coordinator()
    for args, text in ((("ghost", "n1", "n2"), "unknown guest 'ghost'"),
                       ((GUEST, "n1", "n9"), "unknown node 'n9'"),
                       ((GUEST, "n1", "n1"), "already on n1")):
        with pytest.raises(MigrationError, match=text):
            run(coord.prepare(*args))
