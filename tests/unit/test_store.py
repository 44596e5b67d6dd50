"""Contract suite for the ownership store (DESIGN §3).

Every test taking ``new_url`` runs against each backend: a fresh, isolated store per call
(SQLite: a new file; etcd: a new key prefix on a real etcd the session starts, or the one
at ``CONVERGENT_TEST_ETCD``). Revisions are compared, never assumed to count from 1: etcd's
are global to its cluster. Tests at the bottom poke one backend's internals (a SQLite writer
killed mid-transaction, etcd's transaction size limit) and run there only.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import StoreError
from orchestrator.store import (
    AuditAnchor,
    Change,
    Compacted,
    EpochConflict,
    Phase,
    PhaseConflict,
    PublicConflict,
    Store,
    open_store,
    sqlite_path,
)
from orchestrator.store.etcdurl import parse_etcd_url
from orchestrator.store.sqlite import SqliteCore

A, B, C = "10.5.5.10", "10.5.5.11", "10.5.5.12"
IPS = (A, B, C)
MP = multiprocessing.get_context("spawn")  # no SQLite state inherited across fork

Body = Callable[[Store], Awaitable[None]]


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "etcd"])
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """A factory of fresh store URLs for one backend."""
    if request.param == "etcd":
        base = request.getfixturevalue("etcd_url")
        return lambda: f"{base}/convergent-test-{uuid.uuid4().hex[:8]}"
    return lambda: f"sqlite://{tmp_path}/store-{uuid.uuid4().hex[:8]}.db"


def run(coro: Awaitable[Any], timeout: float = 15) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def opened(url: str, body: Body) -> None:
    async with await open_store(url) as store:
        await body(store)
    await store.close()  # closing twice is harmless


def contract(body: Body) -> Callable[[Callable[[], str]], None]:
    """Turn ``async def body(store)`` into a test run on a fresh store of each backend.
    Each test gets its own event loop, as an async client bound to a loop needs."""

    def test(new_url: Callable[[], str]) -> None:
        run(opened(new_url(), body))

    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


async def take(store: Store, after: int, n: int, timeout: float = 5) -> list[Change]:
    async def collect() -> list[Change]:
        out: list[Change] = []
        async with aclosing(store.watch(after)) as changes:
            async for change in changes:
                out.append(change)
                if len(out) == n:
                    break
        return out

    return await asyncio.wait_for(collect(), timeout)


async def three_nodes(store: Store) -> None:
    for i in (1, 2, 3):
        await store.upsert_node(f"n{i}", i, f"0{2 * i}:00", f"192.168.122.1{i}")


# --- ownership: compare-and-swap on the epoch -----------------------------------------


@contract
async def test_first_claim_starts_at_epoch_one(store: Store) -> None:
    assert await store.get_ownership(A) is None
    before = time.time()
    own = await store.claim(A, "n1", "web", 0)
    assert (own.ip, own.node, own.guest, own.epoch) == (IPv4Address(A), "n1", "web", 1)
    assert before <= own.since <= time.time()
    assert await store.get_ownership(IPv4Address(A)) == own


@contract
async def test_cas_advances_epoch_by_exactly_one(store: Store) -> None:
    for epoch in range(5):
        own = await store.claim(A, f"n{epoch % 2 + 1}", "web", epoch)
        assert own.epoch == epoch + 1
    assert (await store.get_ownership(A)).epoch == 5  # type: ignore[union-attr]


@contract
async def test_stale_epoch_fails_naming_owner_and_epoch(store: Store) -> None:
    await store.claim(A, "n1", "web", 0)
    own = await store.claim(A, "n2", "web", 1)
    rev = await store.revision()
    with pytest.raises(EpochConflict, match=r"10\.5\.5\.10 expected epoch 1.*owned by n2 "
                       r"\(guest web\) at epoch 2") as err:
        await store.claim(A, "n3", "web", 1)
    assert err.value.current[IPv4Address(A)] == own
    assert isinstance(err.value, StoreError)
    assert await store.get_ownership(A) == own  # nothing changed
    assert await store.revision() == rev  # and no change was published


@contract
async def test_claim_of_unclaimed_address_needs_epoch_zero(store: Store) -> None:
    with pytest.raises(EpochConflict, match="never claimed"):
        await store.claim(A, "n1", "web", 1)
    assert await store.get_ownership(A) is None


@contract
async def test_multi_address_claim_is_all_or_nothing(store: Store) -> None:
    first = await store.claim_all({A: 0, B: 0, C: 0}, "n1", "web")
    assert [o.epoch for o in first] == [1, 1, 1]
    assert [str(o.ip) for o in first] == sorted(IPS)
    await store.claim(B, "n3", "web", 1)  # someone moved one address
    with pytest.raises(EpochConflict, match=r"10\.5\.5\.11 expected epoch 1.*owned by n3") as err:
        await store.claim_all({A: 1, B: 1, C: 1}, "n2", "web")
    assert err.value.stale == [IPv4Address(B)] and A not in str(err.value)  # only the culprit
    owners = {str(o.ip): (o.node, o.epoch) for o in await store.list_ownership()}
    assert owners == {A: ("n1", 1), B: ("n3", 2), C: ("n1", 1)}
    moved = await store.claim_all({A: 1, B: 2, C: 1}, "n2", "web")
    assert {(str(o.ip), o.node, o.epoch) for o in moved} == {(A, "n2", 2), (B, "n2", 3),
                                                             (C, "n2", 2)}


@contract
async def test_release_keeps_the_epoch_going(store: Store) -> None:
    await store.claim(A, "n1", "web", 0)
    with pytest.raises(EpochConflict):
        await store.release(A, 0)
    released = await store.release(A, 1)
    assert (released.node, released.guest, released.epoch) == (None, "web", 2)
    assert await store.list_ownership() == []
    assert await store.list_ownership(include_released=True) == [released]
    with pytest.raises(EpochConflict, match="released at epoch 2"):
        await store.claim(A, "n2", "web", 0)  # a fencing token never goes back
    assert (await store.claim(A, "n2", "web", 2)).epoch == 3


@contract
async def test_release_of_unclaimed_address_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="never claimed"):
        await store.release(A, 0)


@contract
async def test_list_ownership_filters(store: Store) -> None:
    await store.claim_all({A: 0, B: 0}, "n1", "web")
    await store.claim(C, "n2", "db", 0)
    assert [str(o.ip) for o in await store.list_ownership(node="n1")] == [A, B]
    assert [str(o.ip) for o in await store.list_ownership(guest="db")] == [C]
    assert await store.list_ownership(node="n2", guest="web") == []


@contract
async def test_bad_claims_are_refused_clearly(store: Store) -> None:
    with pytest.raises(StoreError, match=r"not an IPv4 address: '10\.5\.5\.300'"):
        await store.claim("10.5.5.300", "n1", "web", 0)
    with pytest.raises(StoreError, match="listed twice"):
        await store.claim_all({A: 0, IPv4Address(A): 0}, "n1", "web")
    with pytest.raises(StoreError, match="no addresses"):
        await store.claim_all({}, "n1", "web")
    await three_nodes(store)
    with pytest.raises(StoreError, match="unknown node 'n9'; known: n1, n2, n3"):
        await store.claim(A, "n9", "web", 0)
    assert await store.list_ownership(include_released=True) == []


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, str, str, int]]:
    op = st.tuples(st.sampled_from(["claim", "release"]), st.sampled_from(IPS[:2]),
                   st.sampled_from(["n1", "n2"]), st.integers(-1, 1))
    return draw(st.lists(op, max_size=12))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations())
def test_random_claims_match_a_model(new_url: Callable[[], str],
                                     ops: list[tuple[str, str, str, int]]) -> None:
    """Any mix of claims and releases, with right and stale epochs, agrees with a dict."""

    async def body(store: Store) -> None:
        model: dict[str, tuple[str | None, int]] = {}
        for verb, ip, node, skew in ops:
            epoch = model.get(ip, (None, 0))[1]
            ok = skew == 0 and (verb == "claim" or ip in model)
            try:
                if verb == "claim":
                    await store.claim(ip, node, "web", epoch + skew)
                else:
                    await store.release(ip, epoch + skew)
            except StoreError:
                assert not ok
                continue
            assert ok
            model[ip] = (node if verb == "claim" else None, epoch + 1)
        got = {str(o.ip): (o.node, o.epoch)
               for o in await store.list_ownership(include_released=True)}
        assert got == model

    run(opened(new_url(), body))


# --- several processes racing for one address -----------------------------------------


def _racer(url: str, node: str, rounds: int, ready: Any, barrier: Any, out: Any) -> None:
    """Round r: both processes claim with expected epoch r at once; one must win it."""

    async def main() -> list[int]:
        won = []
        async with await open_store(url) as store:
            ready.put(node)
            for r in range(rounds):
                barrier.wait(10)  # blocking is fine: nothing else runs in this loop
                try:
                    own = await store.claim(A, node, "web", r)
                except EpochConflict as err:
                    assert err.current[IPv4Address(A)].epoch == r + 1  # type: ignore[union-attr]
                    continue
                assert own.epoch == r + 1
                won.append(r)
        return won

    out.put((node, asyncio.run(main())))


def test_two_processes_race_for_one_address(new_url: Callable[[], str]) -> None:
    rounds, url = 200, new_url()
    ready, out, barrier = MP.Queue(), MP.Queue(), MP.Barrier(2)
    procs = [MP.Process(target=_racer, args=(url, n, rounds, ready, barrier, out))
             for n in ("n1", "n2")]

    async def main() -> None:
        async with await open_store(url) as store:
            rev = await store.revision()
            for p in procs:
                p.start()
            for _ in procs:
                await asyncio.to_thread(ready.get, True, 10)
            # a third process watches the race live
            seen = await take(store, rev, rounds, timeout=20)
            assert [c.record.epoch for c in seen] == list(range(1, rounds + 1))  # type: ignore[union-attr]
            won = dict([await asyncio.to_thread(out.get, True, 10) for _ in procs])
            assert sorted(won["n1"] + won["n2"]) == list(range(rounds))  # one winner each
            assert won["n1"] and won["n2"], "no real race: one process won every round"
            assert [c.record.node for c in seen] == [  # type: ignore[union-attr]
                "n1" if r in won["n1"] else "n2" for r in range(rounds)]
            assert (await store.get_ownership(A)).epoch == rounds  # type: ignore[union-attr]

    try:
        run(main(), timeout=30)
    finally:
        for p in procs:
            p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]


def _churn(url: str) -> None:
    """Move three addresses between two nodes as fast as possible, until killed."""

    async def main() -> None:
        async with await open_store(url) as store:
            epoch = 0
            while True:
                await store.claim_all(dict.fromkeys(IPS, epoch), f"n{epoch % 2 + 1}", "web")
                epoch += 1

    asyncio.run(main())


def test_writer_killed_at_random_leaves_a_consistent_store(new_url: Callable[[], str]) -> None:
    url = new_url()
    proc = MP.Process(target=_churn, args=(url,))
    proc.start()

    async def main() -> None:
        async with await open_store(url) as store:
            while (own := await store.get_ownership(A)) is None or own.epoch < 20:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.013)  # lands anywhere in a transaction
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.join, 10)
        async with await open_store(url) as store:
            owners = await store.list_ownership()
            assert len({(o.node, o.epoch) for o in owners}) == 1 and len(owners) == 3
            epoch = owners[0].epoch
            changes = await take(store, 0, 3 * epoch)
            assert [c.record.epoch for c in changes] == [  # type: ignore[union-attr]
                e for e in range(1, epoch + 1) for _ in IPS]
            # one revision per claim, none half-done
            assert len({c.revision for c in changes}) == epoch
            assert changes[-1].revision == await store.revision()
            await store.claim_all(dict.fromkeys(IPS, epoch), "n1", "web")  # not locked out

    try:
        run(main(), timeout=20)
    finally:
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL


# --- nodes ----------------------------------------------------------------------------


@contract
async def test_nodes_upsert_heartbeat_list(store: Store) -> None:
    await three_nodes(store)
    n1 = await store.get_node("n1")
    assert n1 is not None
    assert (n1.tag, n1.mac_prefix, n1.pub_ip) == (1, "02:00", IPv4Address("192.168.122.11"))
    assert [n.name for n in await store.list_nodes()] == ["n1", "n2", "n3"]
    rev = await store.revision()
    beat = await store.heartbeat("n1")
    assert beat.heartbeat >= n1.heartbeat and beat.tag == 1
    await store.upsert_node("n1", 1, "02:00", "192.168.122.11")  # a restart: same values
    assert await store.revision() == rev  # liveness is not a change
    moved = await store.upsert_node("n1", 1, "02:00", "192.168.122.99")
    (change,) = await take(store, rev, 1)
    assert (change.kind, change.key, change.record) == ("node", "n1", moved)
    assert await store.get_node("n9") is None


@contract
async def test_node_errors(store: Store) -> None:
    await three_nodes(store)
    with pytest.raises(StoreError, match="tag 2 already belongs to node n2"):
        await store.upsert_node("n4", 2, "0e:00", "192.168.122.14")
    with pytest.raises(StoreError, match="heartbeat from unknown node 'n4'"):
        await store.heartbeat("n4")


# --- liveness: leases answered the same way by every backend -------------------------


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` holds (fails the test past ``timeout``)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@contract
async def test_lease_keeps_a_node_alive_while_it_beats(store: Store) -> None:
    await three_nodes(store)
    assert [(v.node, v.alive, v.ttl) for v in await store.list_liveness()] == [
        ("n1", False, 0.0), ("n2", False, 0.0), ("n3", False, 0.0)]  # never granted
    granted = await store.grant_lease("n1", 1)
    assert (granted.alive, granted.ttl) == (True, 1.0) and granted.remaining >= 1
    rev = await store.revision()
    for _ in range(6):  # 1.8 s of heartbeats, well past the 1 s TTL
        await asyncio.sleep(0.3)
        await store.heartbeat("n1")
        assert (await store.liveness("n1")).alive
    assert await store.revision() == rev  # liveness is not a change
    assert not (await store.liveness("n2")).alive
    assert not (await store.liveness("n9")).alive  # unknown: not alive
    with pytest.raises(StoreError, match="lease for unknown node 'n9'"):
        await store.grant_lease("n9", 1)
    with pytest.raises(StoreError, match="ttl must be positive"):
        await store.grant_lease("n1", 0)


@contract
async def test_lease_expires_without_heartbeats_and_heartbeats_revive_it(store: Store) -> None:
    await three_nodes(store)
    await store.grant_lease("n2", 1)

    async def dead() -> bool:
        return not (await store.liveness("n2")).alive

    # the TTL, plus etcd's expiry sweep (every 0.5 s): within twice the TTL
    assert await until(dead, 3) <= 2.0
    gone = await store.liveness("n2")
    assert (gone.ttl, gone.remaining) == (1.0, 0.0)
    await store.heartbeat("n2")  # back after a partition: alive again, same TTL
    assert (await store.liveness("n2")).alive
    await store.revoke_lease("n2")  # a clean stop: dead at once
    assert not (await store.liveness("n2")).alive
    await store.revoke_lease("n2")  # twice is harmless


# --- public addresses: adoption is a compare-and-swap that fences the home node -------


@contract
async def test_public_address_adoption_fences_the_home_node(store: Store) -> None:
    await three_nodes(store)
    pub = "192.168.122.11"
    home = await store.claim_public("n1", pub, "n1", 0)
    assert (home.node, str(home.ip), home.holder, home.epoch, home.adopted) == (
        "n1", pub, "n1", 1, False)
    rev = await store.revision()
    adopted = await store.claim_public("n1", pub, "n3", 1)  # failover to n3
    assert (adopted.holder, adopted.epoch, adopted.adopted) == ("n3", 2, True)
    # n1 comes back knowing only what it held: it is fenced, nothing changes
    with pytest.raises(PublicConflict, match=r"192\.168\.122\.11 of n1: expected epoch 1, "
                       "it is held by n3 at epoch 2"):
        await store.claim_public("n1", pub, "n1", 1)
    with pytest.raises(PublicConflict, match="held by n3"):
        await store.claim_public("n1", pub, "n2", 1)  # a second survivor loses the race
    assert await store.get_public("n1") == adopted
    (change,) = await take(store, rev, 1)
    assert (change.kind, change.key, change.record) == ("public", "n1", adopted)
    back = await store.claim_public("n1", pub, "n1", 2)  # failback
    assert (back.holder, back.epoch) == ("n1", 3)
    assert await store.list_public() == [back]
    assert (await store.snapshot()).public == (back,)
    with pytest.raises(StoreError, match=r"public address of n1 is 192\.168\.122\.11, not "):
        await store.claim_public("n1", "192.168.122.99", "n1", 3)
    with pytest.raises(StoreError, match="unknown node 'n9'"):
        await store.claim_public("n1", pub, "n9", 3)
    with pytest.raises(PublicConflict, match="never claimed"):
        await store.claim_public("n2", "192.168.122.12", "n2", 1)
    assert await store.get_public("n2") is None


# --- audit anchors: the head of each node's chain, only ever moving forward ----------


@contract
async def test_audit_anchor_only_moves_forward_and_is_no_change(store: Store) -> None:
    rev = await store.revision()
    assert await store.list_audit_anchors() == []
    first = AuditAnchor("n1", "/var/log/a.log", 5, "a" * 64, 1.0)
    assert await store.anchor_audit(first) == first
    assert await store.anchor_audit(first) == first  # again (a lost reply): the same
    # a restarted agent on a cut log anchors a shorter head: the store keeps the longer one
    assert await store.anchor_audit(AuditAnchor("n1", "/var/log/a.log", 3, "b" * 64, 2.0)) \
        == first  # fmt: skip
    assert await store.anchor_audit(AuditAnchor("n1", "/var/log/a.log", 5, "c" * 64, 2.0)) \
        == first  # fmt: skip
    later = AuditAnchor("n1", "/var/log/a.log", 9, "d" * 64, 3.0)
    other = AuditAnchor("n2", "/var/log/a.log", 7, "e" * 64, 3.0)
    assert await store.anchor_audit(later) == later
    assert await store.anchor_audit(other) == other
    assert await store.list_audit_anchors() == [later, other]
    moved = AuditAnchor("n1", "/srv/audit.log", 1, "f" * 64, 4.0)  # another file: afresh
    assert await store.anchor_audit(moved) == moved
    assert await store.list_audit_anchors() == [moved, other]
    # watchers see ownership, nodes, migrations, public addresses: never an anchor
    await store.claim(A, "n1", "web", 0)
    (change,) = await take(store, rev, 1)
    assert change.kind == "ownership"


# --- migrations -----------------------------------------------------------------------


@contract
async def test_migration_lifecycle(store: Store) -> None:
    await three_nodes(store)
    await store.claim_all({A: 0, B: 0}, "n1", "web")
    mig = await store.create_migration("web", [B, A], "n1", "n2")
    assert (mig.phase, mig.src, mig.dst, mig.active) == (Phase.PREPARE, "n1", "n2", True)
    assert mig.addresses == (IPv4Address(A), IPv4Address(B))
    assert mig.epoch_before == {IPv4Address(A): 1, IPv4Address(B): 1}
    assert await store.list_migrations() == [mig]
    for cur, nxt in [(Phase.PREPARE, Phase.PRECOPY), (Phase.PRECOPY, Phase.CUTOVER)]:
        mig = await store.advance_phase(mig.id, cur, nxt)
        await store.record_timing(mig.id, cur, 12.5)
    await store.claim_all({str(ip): e for ip, e in mig.epoch_before.items()}, "n2", "web")
    mig = await store.advance_phase(mig.id, Phase.CUTOVER, Phase.FINALIZE)
    assert mig.timings == {"prepare": 12.5, "precopy": 12.5}
    assert mig.updated >= mig.started
    done = await store.finish_migration(mig.id)
    assert done.phase == Phase.DONE and not done.active and done.error is None
    assert await store.finish_migration(mig.id) == done  # idempotent
    assert await store.list_migrations() == []
    assert await store.list_migrations(active=False) == [done]
    assert await store.get_migration(mig.id) == done
    assert await store.get_migration("nope") is None
    assert {o.node for o in await store.list_ownership(guest="web")} == {"n2"}


@contract
async def test_second_active_migration_is_refused(store: Store) -> None:
    await three_nodes(store)
    first = await store.create_migration("web", [A], "n1", "n2")
    with pytest.raises(StoreError, match=f"web already has an active migration {first.id} "
                       r"\(n1 -> n2, phase prepare\)"):
        await store.create_migration("web", [A], "n1", "n3")
    await store.create_migration("db", [B], "n1", "n3")  # another guest may move meanwhile
    await store.abort_migration(first.id, "test")
    await store.finish_migration(first.id)
    again = await store.create_migration("web", [A], "n1", "n3")  # finished ones don't count
    assert again.id != first.id and len(await store.list_migrations(guest="web")) == 1


@contract
async def test_create_migration_checks_nodes_and_owner(store: Store) -> None:
    await store.create_migration("free", [C], "x", "y")  # no node registered yet: anything
    await three_nodes(store)
    with pytest.raises(StoreError, match="unknown node 'n9'"):
        await store.create_migration("web", [A], "n1", "n9")
    with pytest.raises(StoreError, match="source and destination are both n1"):
        await store.create_migration("web", [A], "n1", "n1")
    await store.claim(A, "n3", "web", 0)
    with pytest.raises(StoreError, match=r"from n1: 10\.5\.5\.10 it is owned by n3"):
        await store.create_migration("web", [A], "n1", "n2")
    await store.claim(B, "n1", "db", 0)
    with pytest.raises(StoreError, match=r"10\.5\.5\.11 it is owned by n1 \(guest db\)"):
        await store.create_migration("web", [B], "n1", "n2")
    assert await store.list_migrations(guest="web") == []


@contract
async def test_create_migration_with_an_id_is_idempotent(store: Store) -> None:
    mig = await store.create_migration("web", [A], "n1", "n2", id="m1")
    assert await store.create_migration("web", [A], "n1", "n2", id="m1") == mig
    with pytest.raises(StoreError, match="migration id m1 is already used by web"):
        await store.create_migration("db", [B], "n1", "n2", id="m1")


@contract
async def test_phase_advance_is_idempotent_and_checked(store: Store) -> None:
    mig = await store.create_migration("web", [A], "n1", "n2")
    pre = await store.advance_phase(mig.id, Phase.PREPARE, Phase.PRECOPY)
    rev = await store.revision()
    assert await store.advance_phase(mig.id, Phase.PREPARE, Phase.PRECOPY) == pre
    assert await store.revision() == rev  # a no-op publishes nothing
    with pytest.raises(PhaseConflict, match="expected phase prepare, it is in precopy"):
        await store.advance_phase(mig.id, Phase.PREPARE, Phase.ABORT)
    with pytest.raises(PhaseConflict, match="cannot go from precopy to finalize; allowed: "
                       "abort, cutover"):
        await store.advance_phase(mig.id, Phase.PRECOPY, Phase.FINALIZE)
    with pytest.raises(PhaseConflict, match="only finalize or abort can finish"):
        await store.finish_migration(mig.id)
    with pytest.raises(StoreError, match="no migration 'nope'"):
        await store.advance_phase("nope", Phase.PREPARE, Phase.PRECOPY)
    with pytest.raises(StoreError, match="unknown phase 'warp'"):
        await store.advance_phase(mig.id, Phase.PRECOPY, "warp")  # type: ignore[arg-type]
    assert (await store.advance_phase(mig.id, "prepare", "precopy")) == pre  # type: ignore[arg-type]
    assert (await store.get_migration(mig.id)) == pre


@contract
async def test_abort_path(store: Store) -> None:
    await store.claim(A, "n1", "web", 0)
    mig = await store.create_migration("web", [A], "n1", "n2")
    await store.advance_phase(mig.id, Phase.PREPARE, Phase.PRECOPY)
    aborting = await store.abort_migration(mig.id, "destination refused the guest")
    assert (aborting.phase, aborting.error) == (Phase.ABORT, "destination refused the guest")
    assert aborting.active
    assert await store.abort_migration(mig.id, "again") == aborting  # first reason kept
    aborted = await store.finish_migration(mig.id)
    assert aborted.phase == Phase.ABORTED and not aborted.active
    assert await store.abort_migration(mig.id, "late") == aborted
    assert (await store.get_ownership(A)).node == "n1"  # type: ignore[union-attr]


@contract
async def test_no_abort_after_cutover_completed(store: Store) -> None:
    mig = await store.create_migration("web", [A], "n1", "n2")
    for cur, nxt in [(Phase.PREPARE, Phase.PRECOPY), (Phase.PRECOPY, Phase.CUTOVER),
                     (Phase.CUTOVER, Phase.FINALIZE)]:
        await store.advance_phase(mig.id, cur, nxt)
    with pytest.raises(PhaseConflict, match="cannot go from finalize to abort"):
        await store.abort_migration(mig.id, "too late")


# --- watch ----------------------------------------------------------------------------


@contract
async def test_watch_sees_changes_in_order_and_resumes(store: Store) -> None:
    start = await store.revision()
    await three_nodes(store)
    await store.claim_all({A: 0, B: 0}, "n1", "web")
    mig = await store.create_migration("web", [A, B], "n1", "n2")
    await store.advance_phase(mig.id, Phase.PREPARE, Phase.PRECOPY)
    await store.release(A, 1)
    seen = await take(store, start, 8)
    assert [(c.kind, c.key) for c in seen] == [
        ("node", "n1"), ("node", "n2"), ("node", "n3"), ("ownership", A), ("ownership", B),
        ("migration", mig.id), ("migration", mig.id), ("ownership", A)]
    revs = [c.revision for c in seen]
    assert revs == sorted(revs) and revs[3] == revs[4]  # one transaction, one revision
    assert seen[-1].revision == await store.revision()
    assert seen[6].record.phase == Phase.PRECOPY  # type: ignore[union-attr]
    # resume from the middle: exactly the rest, nothing twice
    assert await take(store, seen[4].revision, 3) == seen[5:]


@contract
async def test_watch_follows_live_changes(store: Store) -> None:
    rev = await store.revision()
    watcher = asyncio.create_task(take(store, rev, 4))
    await asyncio.sleep(0.1)  # the watcher is now polling an idle store
    for epoch in range(4):
        await store.claim(A, "n1", "web", epoch)
    assert [c.record.epoch for c in await watcher] == [1, 2, 3, 4]  # type: ignore[union-attr]


@contract
async def test_snapshot_then_watch(store: Store) -> None:
    await store.claim_all({A: 0, B: 0}, "n1", "web")
    mig = await store.create_migration("web", [A, B], "n1", "n2")
    snap = await store.snapshot()
    assert snap.revision == await store.revision()
    assert [str(o.ip) for o in snap.ownership] == [A, B]
    assert snap.migrations == (mig,) and snap.nodes == ()
    await store.claim(C, "n2", "db", 0)
    (change,) = await take(store, snap.revision, 1)
    assert change.key == C


@contract
async def test_compacted_revisions_are_reported(store: Store) -> None:
    revs = []
    for epoch in range(3):
        await store.claim(A, "n1", "web", epoch)
        revs.append(await store.revision())
    await store.compact(revs[1])
    with pytest.raises(Compacted, match="relist"):
        await take(store, revs[0], 1)
    (change,) = await take(store, revs[1], 1)
    assert change.record.epoch == 3  # type: ignore[union-attr]
    with pytest.raises(StoreError, match=f"the store is at {revs[2]}"):
        await store.compact(revs[2] + 6)


def test_watch_resumes_after_reopening(new_url: Callable[[], str]) -> None:
    url = new_url()

    async def first(store: Store) -> None:
        for epoch in range(3):
            await store.claim(A, "n1", "web", epoch)

    async def second(store: Store) -> None:
        seen = await take(store, 0, 3)
        await store.claim(A, "n2", "web", 3)
        assert [c.record.epoch for c in await take(store, seen[-1].revision, 1)] == [4]  # type: ignore[union-attr]

    run(opened(url, first))
    run(opened(url, second))


# --- open_store -----------------------------------------------------------------------


def test_url_parsing() -> None:
    assert sqlite_path("sqlite:///var/lib/convergent/store.db") == "/var/lib/convergent/store.db"
    assert sqlite_path("sqlite://store.db") == "store.db"
    assert sqlite_path("/tmp/s.db") == "/tmp/s.db"
    assert sqlite_path("etcd://127.0.0.1:2379") is None
    with pytest.raises(StoreError, match="names no file"):
        sqlite_path("sqlite://")


def test_etcd_url_parsing() -> None:
    url = parse_etcd_url("etcds://10.0.0.1:2379,etcd2:2379,[fd00::1]:2379/cl/one?ca=/ca.pem"
                         "&cert=/c.pem&key=/k.pem&timeout=2.5&max_txn_ops=1024&server_name=etcd")
    assert url.endpoints == ("10.0.0.1:2379", "etcd2:2379", "[fd00::1]:2379")
    assert (url.prefix, url.tls, url.ca, url.cert, url.key) == ("/cl/one", True, "/ca.pem",
                                                               "/c.pem", "/k.pem")
    assert (url.timeout, url.max_txn_ops, url.server_name) == (2.5, 1024, "etcd")
    assert url.display == "etcds://10.0.0.1:2379,etcd2:2379,[fd00::1]:2379/cl/one"
    sock = parse_etcd_url("etcd://%2Frun%2Fetcd%2Fa.sock:0,%2Frun%2Fetcd%2Fb.sock:0")
    assert sock.endpoints == ("unix:/run/etcd/a.sock:0", "unix:/run/etcd/b.sock:0")
    assert (sock.prefix, sock.tls, sock.timeout, sock.max_txn_ops) == ("/convergent", False,
                                                                      5.0, 128)


@pytest.mark.parametrize(("url", "message"), [
    ("redis://x", "unknown scheme 'redis'"),
    ("etcd:///convergent", "names no etcd member"),
    ("etcd://10.0.0.1/convergent", "member '10.0.0.1' is not host:port"),
    ("etcd://10.0.0.1:2379/c?tls=1", "unknown option 'tls'"),
    ("etcds://10.0.0.1:2379/c", "etcds:// needs ca=FILE"),
    ("etcd://10.0.0.1:2379/c?ca=/x.pem", "use etcds://"),
    ("etcds://10.0.0.1:2379/c?ca=/x.pem&cert=/c.pem", "needs both cert= and key="),
    ("etcd://10.0.0.1:2379/c?timeout=soon", "timeout='soon' is not a number"),
    ("etcds://10.0.0.1:2379/c?ca=/nonexistent/ca.pem", r"ca=/nonexistent/ca\.pem: No such file"),
])
def test_open_store_refuses_clearly(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        run(open_store(url))


def test_open_store_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot open store .*/nope/s\.db"):
        run(open_store(f"sqlite://{tmp_path}/nope/s.db"))


# --- SQLite only ----------------------------------------------------------------------


def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    SqliteCore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match=r"has schema 99.*upgrade convergent"):
        SqliteCore(path)


def _stalled_writer(path: str, stalled: Any) -> None:
    """Claim three addresses but stop for good after writing two of them."""
    core = SqliteCore(path)
    log, calls = core._log, list[tuple[Any, ...]]()

    def stall_on_third(*args: Any) -> None:
        if len(calls) == 2:
            stalled.set()
            time.sleep(60)
        calls.append(args)
        log(*args)

    core._log = stall_on_third  # type: ignore[method-assign,assignment]
    core.claim_all(dict.fromkeys(IPS, 1), "n2", "web")


def test_sqlite_writer_killed_mid_transaction(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    core = SqliteCore(path)
    core.claim_all(dict.fromkeys(IPS, 0), "n1", "web")
    stalled = MP.Event()
    proc = MP.Process(target=_stalled_writer, args=(path, stalled))
    proc.start()
    try:
        assert stalled.wait(10), "the writer never reached its stall"
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            SqliteCore(path, busy_timeout=0.1).claim_all(dict.fromkeys(IPS, 1), "n3", "web")
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join(10)
    finally:
        proc.kill()
    core.close()
    core = SqliteCore(path, busy_timeout=1)
    assert {(o.node, o.epoch) for o in core.list_ownership()} == {("n1", 1)}
    assert core.revision() == 1 and len(core.changes_since(0)) == 3
    assert core._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    core.claim_all(dict.fromkeys(IPS, 1), "n3", "web")  # the lock died with the writer
    assert {o.node for o in core.list_ownership()} == {"n3"}



def _open_at(path: str, start: float, results: Any) -> None:
    while time.time() < start:  # all three open at the same instant
        pass
    try:
        SqliteCore(path, busy_timeout=5).close()
        results.put("ok")
    except StoreError as exc:
        results.put(str(exc))


def test_agents_creating_the_store_together_all_open_it(tmp_path: Path) -> None:
    """Three agents starting at once on a node with no store yet: SQLite answers some of
    them "database is locked" at once (the WAL switch does not wait on the busy timeout;
    without the retry, about one open in ten failed here). Every one must open it."""
    ctx = multiprocessing.get_context("fork")  # spawn is too slow to start three at once
    failures = []
    for round_ in range(15):
        path = str(tmp_path / f"store{round_}.db")
        results = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_at, args=(path, start, results)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(20)
        failures += [r for r in (results.get(timeout=5) for _ in procs) if r != "ok"]
    assert failures == []


# --- etcd only ------------------------------------------------------------------------


def test_etcd_claims_fit_in_one_transaction_or_are_refused(etcd_url: str) -> None:
    """etcd runs a transaction of at most --max-txn-ops (128) compares and as many puts:
    a claim must fit whole, or be refused before anything is written."""
    fits = {f"10.6.{i // 250}.{i % 250}": 0 for i in range(127)}  # + the node compare
    too_many = {f"10.7.{i // 250}.{i % 250}": 0 for i in range(128)}

    async def body(store: Store) -> None:
        await three_nodes(store)
        assert len(await store.claim_all(fits, "n1", "web")) == 127
        with pytest.raises(StoreError, match=r"a claim of 128 addresses needs 129 operations "
                           r"in one transaction, more than max_txn_ops=128"):
            await store.claim_all(too_many, "n1", "web")
        assert len(await store.list_ownership()) == 127

    run(opened(f"{etcd_url}/cvt-{uuid.uuid4().hex[:8]}", body))

    async def above_server(store: Store) -> None:  # the URL promising more than the members
        with pytest.raises(StoreError, match=r"too many operations in txn request.*"
                           r"--max-txn-ops is below the URL's max_txn_ops=300"):
            await store.claim_all(too_many, "n1", "web")

    run(opened(f"{etcd_url}/cvt-{uuid.uuid4().hex[:8]}?max_txn_ops=300", above_server))


def test_etcd_unreachable_is_one_clear_line(tmp_path: Path) -> None:
    url = f"etcd://{str(tmp_path / 'none.sock').replace('/', '%2F')}/c?timeout=0.5"
    with pytest.raises(StoreError) as err:
        run(open_store(url))
    msg = str(err.value)
    assert "\n" not in msg and "no etcd member answered within 0.5 s" in msg
    assert "is a quorum of the cluster up?" in msg


@contract
async def test_release_each_releases_every_group_but_a_stale_one(store: Store) -> None:
    """A failover releasing a dead node's guests: each guest all or nothing; one guest moved
    meanwhile stays where it is and the others are still released (on etcd, more groups
    than one transaction holds)."""
    groups = []
    for g in range(150):
        ips = [f"10.8.{g}.1", f"10.8.{g}.2"]
        await store.claim_all(dict.fromkeys(ips, 0), "n1", f"g{g}")
        groups.append(dict.fromkeys(ips, 1))
    await store.claim("10.8.77.2", "n2", "g77", 1)  # g77 half moved away meanwhile
    results = await store.release_each([*groups, {}])
    assert isinstance(results[77], EpochConflict) and "10.8.77.2" in str(results[77])
    assert isinstance(results[-1], StoreError)  # an empty group: refused alone
    ok = [r for i, r in enumerate(results[:-1]) if i != 77]
    assert all(isinstance(r, list) and [o.node for o in r] == [None, None] for r in ok)
    left = {str(o.ip): o.node for o in await store.list_ownership()}
    assert left == {"10.8.77.1": "n1", "10.8.77.2": "n2"}
