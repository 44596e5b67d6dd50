"""The failback (orchestrator/failover/back.py, handback.py): the pure planning of what the
home takes back and in which form, refusals, the releasing state of the adoption, the
applier writing bindings with their binding; then both nodes' steps over the fakes (a real
SQLite store, the in-memory conntrack table held to the kernel by its contract suite, an
adoption recording what each node's uplink and maps would carry; the holder called in
process, the same calls the peer channel carries in the lab test): their order, one audit
record per step, a second run with nothing to do, the control switch, a dry run, and a home
that goes away after the holder released."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.audit.log import AuditLog
from orchestrator.cli.failover import render_failback
from orchestrator.errors import ConvergentError
from orchestrator.failover.adopt import Changes, desired_adoption
from orchestrator.failover.back import (
    FailbackRefused,
    FailbackStart,
    plan_failback,
    plan_handback,
    retired,
    select_handback,
)
from orchestrator.failover.handback import Failback, LocalHolder
from orchestrator.failover.plan import plan_failover
from orchestrator.handover.applier import apply_plan
from orchestrator.handover.planner import DestKind, plan_handover
from orchestrator.handover.rules import Rule
from orchestrator.model.conntrack import Entry, Status, TcpFlag
from orchestrator.netfilter.conntrack.fake import FakeConntrack
from orchestrator.store import Store, open_store
from orchestrator.store.base import Liveness
from tests.unit.test_failover_plan import CACHE, N1_DEAD, SNAP, pub
from tests.unit.test_planner import CLIENT, PUB, G, T, flow, snat

ALIVE = {n: Liveness(n, True, 10, 8) for n in ("n1", "n2", "n3")}
# what n3 holds once it failed n1 over: n1's binding of G's stream, committed
(BOUND,) = plan_failover(T, SNAP, N1_DEAD, "n1", "n3", CACHE).commit
# the stateless DNAT of n1's address on n3: client -> G, tagged n1, never a reply seen
INBOUND = flow(CLIENT, 50000, G, 22, mark=1, status=Status.ASSURED | Status.CONFIRMED)
OWN_SNAT = snat(40010, node=3)  # n3's own SNAT flow of G: n3's, not n1's
UNNATED = flow(G, 40020, "198.51.100.9", 443, mark=1)  # n3 hosts it, n1 binds it
FULLNAT = replace(snat(40030, node=1), status=snat().status | Status.DST_NAT)
HOLDER_TABLE = [BOUND, INBOUND, OWN_SNAT, UNNATED, FULLNAT]
START = FailbackStart("n1", "n3", PUB[1], 1, 2)  # type: ignore[arg-type]


# --- pure ------------------------------------------------------------------------------


def test_refusals_and_nothing_to_do() -> None:
    assert plan_failback(T, pub("n1", "n1", 3), ALIVE, "n1") is None  # holds it already
    start = plan_failback(T, pub("n1", "n3", 2), ALIVE, "n1")
    assert start is not None and (start.holder, start.epoch, str(start.pub_ip)) == (
        "n3", 2, PUB[1])
    cases = [
        (pub("n1", "n3", 2), N1_DEAD, "n1", "n1 is not alive"),
        (pub("n1", "n3", 2), {**ALIVE, "n3": Liveness("n3", False, 10, 0)}, "n1",
         "n3 holds n1's address 192.168.122.11 but is not alive itself"),
        (None, ALIVE, "n1", "no public-address record"),
        (replace(pub("n1", "n3"), ip=pub("n2", "n2").ip), ALIVE, "n1", "the store says"),
        (pub("n1", "n3"), ALIVE, "n9", "unknown node 'n9'"),
    ]
    for record, live, home, why in cases:
        with pytest.raises(FailbackRefused, match=why):
            plan_failback(T, record, live, home)


def test_selection_keeps_what_the_address_owns() -> None:
    h = select_handback(HOLDER_TABLE, T, "n1")
    assert [e.tuple_orig for e in h.entries] == [BOUND.tuple_orig, INBOUND.tuple_orig]
    # the binding untouched but for the replication bit the holder's bridge_state dropped
    assert h.entries[0] == replace(BOUND, mark=BOUND.mark | T.sync.mark_bit)
    # the entry node never saw a reply: handed back as the live flow it is
    assert h.entries[1].status & Status.SEEN_REPLY and not INBOUND.status & Status.SEEN_REPLY
    assert h.skipped == {"not tagged n1": 1, "FULL-NAT (its binding was the dead node's "
                         "alone)": 1, "not a flow of the address (the holder's own state for "
                         "the guest)": 1}


def test_plan_gives_the_binding_back_whole_and_copies_the_inbound_entry() -> None:
    h = select_handback(HOLDER_TABLE, T, "n1")
    plan = plan_handback(START, h, T, existing=[], offered=len(HOLDER_TABLE))
    (p,) = plan.plans
    kinds = {a.origin.tuple_orig: (a.kind, a.rules) for a in p.dest}
    assert kinds[BOUND.tuple_orig] == (DestKind.PUSH, (Rule.SNAT_HOME_BINDING, Rule.D_ABSENT))
    assert kinds[INBOUND.tuple_orig] == (DestKind.PUSH, (Rule.INBOUND_COPY, Rule.D_ABSENT))
    bound = next(a.entry for a in p.dest if a.origin.tuple_orig == BOUND.tuple_orig)
    assert bound is not None and bound.tuple_reply == BOUND.tuple_reply  # reply to n1's address
    assert bound.is_src_nat and bound.mark == BOUND.mark | T.sync.mark_bit
    assert bound.tcp is not None and bound.tcp.flags_orig & TcpFlag.BE_LIBERAL
    inbound = next(a.entry for a in p.dest if a.origin.tuple_orig == INBOUND.tuple_orig)
    assert inbound is not None and inbound.mark == 1 and not inbound.is_src_nat
    s = plan.summary()
    assert (s["from"], s["to"], s["entries"], s["bindings"], s["offered"]) == (
        "n3", "n1", 2, 1, 5)
    assert s["flows_by_guest"] == {"g1": 2}
    # a second plan against what the first wrote: nothing left to write
    written = [a.entry for a in p.dest if a.entry is not None]
    again = plan_handback(START, h, T, existing=written)
    assert again.writes == 0 and again.summary()["unchanged"] == 2


def test_plan_meets_what_the_home_still_holds() -> None:
    """A home that was only cut off kept its binding (homecoming: kept); one holding the
    flow un-NATed gets it replaced by the binding."""
    h = select_handback([BOUND], T, "n1")
    (kept,) = plan_handback(START, h, T, existing=[BOUND]).plans
    assert kept.dest[0].rules[-1] is Rule.D_HOMECOMING
    unnated = Entry(BOUND.tuple_orig, BOUND.tuple_orig.reversed(), status=BOUND.status
                    & ~(Status.SRC_NAT | Status.SRC_NAT_DONE), mark=1)
    (clash,) = plan_handback(START, h, T, existing=[unnated]).plans
    assert clash.dest[0].kind is DestKind.REPLACE and clash.dest[0].delete == (unnated,)


def test_migration_planner_gives_d_its_own_binding() -> None:
    """The same rule in a migration: S (which answered for D's address) holds D's binding."""
    p = plan_handover([snat(node=2)], T, "g1", "n1", "n2")
    (a,) = p.dest
    assert a.rules == (Rule.SNAT_HOME_BINDING, Rule.D_ABSENT) and a.entry is not None
    assert a.entry.tuple_reply.dst == snat(node=2).tuple_reply.dst and a.entry.is_src_nat


def test_retired_are_the_bindings_only() -> None:
    assert retired(HOLDER_TABLE, T.node("n1")) == [BOUND]


def test_releasing_keeps_the_maps_and_drops_the_address() -> None:
    held = [pub("n1", "n3", 2), pub("n3", "n3")]
    assert desired_adoption(held, T, "n3").addresses(PUB[3]) == {PUB[1], PUB[3]}
    releasing = desired_adoption(held, T, "n3", {"n1"})
    assert releasing.addresses(PUB[3]) == {PUB[3]} and releasing.entry == {(PUB[1], 1)}
    # claimed back meanwhile: still answered here until the holder retires
    back = [pub("n1", "n1", 3), pub("n3", "n3")]
    assert desired_adoption(back, T, "n3", {"n1"}).entry == {(PUB[1], 1)}
    assert desired_adoption(back, T, "n3").entry == frozenset()


def test_applier_creates_bindings_with_their_binding() -> None:
    h = select_handback(HOLDER_TABLE, T, "n1")
    (p,) = plan_handback(START, h, T, existing=[]).plans
    table = FakeConntrack()
    done = asyncio.run(apply_plan(table, p))
    assert done.written == 2 and not done.errors
    assert sorted(table.calls) == ["push", "push_snat"]
    got = table.get(BOUND)
    assert got is not None and got.is_src_nat and got.tuple_reply == BOUND.tuple_reply


# --- both nodes' steps over the fakes -----------------------------------------------------


class Uplink:
    """Stands for AdoptionOps: what the node's uplink and maps carry after each pass."""

    def __init__(self, node: str, log: list[str]) -> None:
        self.node, self.log = node, log
        self.releasing: set[str] = set()
        self.want = desired_adoption([], T, node)

    async def follow(self, records: Any) -> Changes:
        before = self.want.addresses(str(T.node(self.node).pub_ip))
        self.want = desired_adoption(await records(), T, self.node, self.releasing)
        after = self.want.addresses(str(T.node(self.node).pub_ip))
        self.log.append(f"{self.node} uplink={sorted(after)} maps={sorted(self.want.entry)}")
        return Changes(sorted(after - before), sorted(before - after), True)


@dataclass
class World:
    store: Store
    home: Failback
    holder: Failback
    tables: dict[str, FakeConntrack]
    log: list[str]
    audits: dict[str, Path]


async def world(tmp: Path) -> World:
    store = await open_store(f"sqlite://{tmp}/s.db")
    for n in T.nodes:
        await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
        await store.claim_public(n.name, n.pub_ip, n.name, 0)
        await store.grant_lease(n.name, 30)
    await store.claim_public("n1", T.node("n1").pub_ip, "n3", 1)  # the failover
    log: list[str] = []
    tables = {"n1": FakeConntrack(), "n3": FakeConntrack()}
    tables["n3"].push_snat([BOUND])
    tables["n3"].push([INBOUND, OWN_SNAT, UNNATED])
    audits = {n: tmp / f"audit-{n}.log" for n in tables}
    fbs: dict[str, Failback] = {}

    async def connect(node: str) -> LocalHolder:
        return LocalHolder(fbs[node], "n1")

    async def rules() -> None:
        log.append(f"n1 ruleset entries={tables['n1'].count()}")

    for n in tables:
        fbs[n] = Failback(T, n, store, tables[n], Uplink(n, log),
                          AuditLog(str(audits[n]), node=n, actor="agent"), connect, rules)
    # as the failover left them: n3 answers for n1, n1 is back but fenced
    for fb in fbs.values():
        await fb.adoption.follow(store.list_public)
    log.clear()
    return World(store, fbs["n1"], fbs["n3"], tables, log, audits)


def actions(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["action"], r["outcome"]) for r in recs]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_failback_steps_in_order_each_audited(tmp_path: Path) -> None:
    async def main() -> None:
        w = await world(tmp_path)
        report = await w.home.run()
        n1, n3 = w.tables["n1"], w.tables["n3"]
        # n1 took the flows before n3 let go of the address, n3 kept its maps until n1
        # held the address
        assert w.log == [
            "n1 ruleset entries=0",
            f"n3 uplink={[PUB[3]]} maps={[(PUB[1], 1)]}",
            f"n1 uplink={[PUB[1]]} maps=[]",
            f"n3 uplink={[PUB[3]]} maps=[]",
        ]
        got = n1.get(BOUND)
        assert got is not None and got.is_src_nat and got.tuple_reply == BOUND.tuple_reply
        assert n1.get(INBOUND) is not None and n1.count() == 2
        assert n3.get(BOUND) is None  # retired
        assert {e.tuple_orig for e in n3.dump()} == {
            x.tuple_orig for x in (INBOUND, OWN_SNAT, UNNATED)}
        assert (await w.store.get_public("n1")).holder == "n1"  # type: ignore[union-attr]
        assert report["committed"] == 2 and report["bindings"] == 1
        assert report["released"] == [PUB[1]] and report["adopted"] == [PUB[1]]
        assert report["retired"] == 1 and report["epoch"] == 3
        assert list(report["steps_ms"]) == ["plan", "commit", "release", "adopt", "retire"]
        assert actions(w.audits["n1"]) == [(a, "ok") for a in (
            "failback.begin", "failback.commit", "failback.release", "failback.adopt",
            "failback.retire", "failback.end")]
        assert actions(w.audits["n3"]) == [("failover.back", "ok")]
        lines = render_failback(report)
        assert lines[0] == "failed back: n3 -> n1"
        assert lines[1] == "  handed back 2 entries (1 SNAT bindings) from n3: g1 2"
        assert f"n3 released {PUB[1]}; n1 adopted {PUB[1]} (epoch 3); n3 deleted 1" in lines[-2]
        assert lines[-1].startswith("  took ")
        again = await w.home.run()  # a second run: n1 holds it, nothing moves
        assert again["nothing_to_do"] and n1.count() == 2
        assert render_failback(again) == [f"nothing to do: n1 holds its address {PUB[1]}"]
        assert len(actions(w.audits["n1"])) == 6
        await w.store.close()

    run(main())


def test_control_run_moves_the_address_alone(tmp_path: Path) -> None:
    async def main() -> None:
        w = await world(tmp_path)
        report = await w.home.run(skip=frozenset({"entries"}))
        assert w.tables["n1"].count() == 0 and report["skipped_parts"] == ["entries"]
        assert (await w.store.get_public("n1")).holder == "n1"  # type: ignore[union-attr]
        assert "control run: without entries" in w.audits["n1"].read_text()
        with pytest.raises(ConvergentError, match="cannot skip"):
            await w.home.run(skip=frozenset({"address"}))
        await w.store.close()

    run(main())


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        w = await world(tmp_path)
        plan = await w.home.run(dry_run=True)
        assert plan["dry_run"] and plan["entries"] == 2 and plan["from"] == "n3"
        assert w.tables["n1"].count() == 0 and w.tables["n3"].get(BOUND) is not None
        assert (await w.store.get_public("n1")).holder == "n3"  # type: ignore[union-attr]
        assert w.log == [] and actions(w.audits["n1"]) == []
        await w.store.close()

    run(main())


def test_refused_when_the_home_is_not_alive_and_the_holder_checks_too(tmp_path: Path) -> None:
    async def main() -> None:
        w = await world(tmp_path)
        await w.store.revoke_lease("n1")
        with pytest.raises(FailbackRefused, match="n1 is not alive"):
            await w.home.run()
        assert actions(w.audits["n1"]) == [("failback.begin", "refused")]
        with pytest.raises(FailbackRefused, match="without a live lease"):
            await w.holder.offer("n1")
        with pytest.raises(FailbackRefused, match="n3 does not hold it"):
            await w.holder.offer("n2")
        assert w.tables["n1"].count() == 0 and w.log == []
        await w.store.close()

    run(main())


def test_home_gone_after_the_release_gives_the_address_back_to_the_holder(
        tmp_path: Path) -> None:
    async def main() -> None:
        w = await world(tmp_path)
        real_release = w.holder.release

        async def release_then_lose_the_race(home: str) -> list[str]:
            out = await real_release(home)
            await w.store.claim_public("n1", T.node("n1").pub_ip, "n3", 2)  # someone else
            return out

        w.holder.release = release_then_lose_the_race  # type: ignore[method-assign]
        with pytest.raises(FailbackRefused, match="changed hands meanwhile"):
            await w.home.run()
        # n3 follows the store again: the address is back on its uplink, maps kept
        assert w.log[-1] == f"n3 uplink={sorted([PUB[1], PUB[3]])} maps={[(PUB[1], 1)]}"
        assert not w.holder.adoption.releasing  # type: ignore[attr-defined]
        assert (await w.store.get_public("n1")).holder == "n3"  # type: ignore[union-attr]
        await w.store.close()

    run(main())
