"""The store on a real 3-member etcd cluster while members die and come back.

Members talk over Unix sockets (no network, no root); one cluster for the module, each test
on its own key prefix, every member running again at the end of each test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import aclosing
from ipaddress import IPv4Address
from typing import Any

import grpc.aio
import pytest
from etcd3aio import _protobuf as pb

from orchestrator.errors import StoreError
from orchestrator.lab.etcd import EtcdCluster, etcd_binary
from orchestrator.store import Change, Compacted, EpochConflict, Store, open_store

pytestmark = pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (etcd-server)")
A = "10.5.5.10"


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster.create(["m1", "m2", "m3"]) as c:
        c.start()
        c.wait_ready()
        yield c


@pytest.fixture
def prefix(cluster: EtcdCluster) -> Iterator[str]:
    yield f"/cvt-{uuid.uuid4().hex[:8]}"
    cluster.start()  # whatever a test killed runs again for the next
    cluster.wait_ready()


def run(coro: Awaitable[Any], timeout: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def leader(cluster: EtcdCluster) -> str:
    ids, lead = {}, 0
    for name in cluster.running():
        path = cluster.members[name].client_socket(cluster.root)
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            st = await pb.MaintenanceStub(ch).Status(pb.StatusRequest(), timeout=5)
            ids[st.header.member_id] = name
            lead = st.leader
    return ids[lead]


async def register(store: Store) -> None:
    for i in (1, 2, 3):
        await store.upsert_node(f"n{i}", i, f"0{2 * i}:00", f"192.168.122.1{i}")


def test_claims_continue_when_the_leader_dies(cluster: EtcdCluster, prefix: str) -> None:
    """Claims run back to back; the leader is killed in the middle; every claim still
    succeeds exactly once (the longest wait is the new election)."""

    async def main() -> float:
        async with await open_store(cluster.url(prefix)) as store:
            await register(store)
            worst, epoch = 0.0, 0
            for i in range(60):
                if i == 20:
                    cluster.kill(await leader(cluster))
                t = time.monotonic()
                own = await store.claim(A, f"n{i % 2 + 1}", "web", epoch)
                worst = max(worst, time.monotonic() - t)
                epoch = own.epoch
            assert (await store.get_ownership(A)).epoch == 60  # type: ignore[union-attr]
            return worst

    worst = run(main())
    assert worst < 5.0, f"a claim waited {worst:.2f} s for the new leader"


def test_quorum_lost_refuses_clearly_and_never_gives_two_owners(cluster: EtcdCluster,
                                                                 prefix: str) -> None:
    url = cluster.url(prefix, timeout=2)

    async def main() -> None:
        async with await open_store(url) as store:
            await register(store)
            await store.claim(A, "n1", "web", 0)
            cluster.kill("m2")
            cluster.kill("m3")
            t = time.monotonic()
            with pytest.raises(StoreError) as err:
                await store.claim(A, "n2", "web", 1)
            msg = str(err.value)
            assert "\n" not in msg and "no etcd member answered within 2 s" in msg
            assert "quorum" in msg and time.monotonic() - t < 4
            with pytest.raises(StoreError, match="no etcd member answered"):
                await store.create_migration("web", [A], "n1", "n2")
            cluster.start("m2", "m3")
            await asyncio.to_thread(cluster.wait_ready)
            # quorum back. Raft may have committed the refused claim after all (m1 had it
            # in its log): one owner either way, at the epoch that owner's claim gave it
            own = await store.get_ownership(A)
            assert own is not None and (own.node, own.epoch) in (("n1", 1), ("n2", 2))
            racers = [store.claim(A, n, "web", own.epoch) for n in ("n2", "n3")]
            results = await asyncio.gather(*racers, return_exceptions=True)
            winners = [r for r in results if not isinstance(r, BaseException)]
            assert len(winners) == 1 and isinstance(
                next(r for r in results if isinstance(r, BaseException)), EpochConflict)
            assert (await store.get_ownership(A)).node == winners[0].node  # type: ignore[union-attr]

    run(main())


def test_watch_resumes_on_another_member_without_loss_or_repeat(cluster: EtcdCluster,
                                                                  prefix: str) -> None:
    """The watcher's member is killed while changes keep coming: the watch moves to the
    next member and resumes after the last change it delivered."""

    async def main() -> None:
        async with await open_store(cluster.url(prefix, only=["m1", "m2", "m3"])) as watcher, \
                await open_store(cluster.url(prefix, only=["m3", "m2"])) as writer:
            start = await watcher.revision()
            seen: list[Change] = []

            async def follow() -> None:
                async with aclosing(watcher.watch(start)) as changes:
                    async for c in changes:
                        seen.append(c)
                        if len(seen) == 40:
                            return

            task = asyncio.create_task(follow())
            for epoch in range(40):
                if epoch == 15:
                    await asyncio.to_thread(cluster.kill, "m1")
                await writer.claim(A, "n1", "web", epoch)
                await asyncio.sleep(0.01)
            await asyncio.wait_for(task, 20)
            assert [c.record.epoch for c in seen] == list(range(1, 41))  # type: ignore[union-attr]

    run(main())


def test_watch_reports_compaction_it_missed(cluster: EtcdCluster, prefix: str) -> None:
    async def main() -> None:
        async with await open_store(cluster.url(prefix)) as store:
            first = await store.revision()
            for epoch in range(3):
                await store.claim(A, "n1", "web", epoch)
            await store.compact(await store.revision())
            with pytest.raises(Compacted, match="relist"):
                async with aclosing(store.watch(first)) as changes:
                    async for _ in changes:
                        pass
            assert (await store.get_ownership(IPv4Address(A))).epoch == 3  # type: ignore[union-attr]

    run(main())
