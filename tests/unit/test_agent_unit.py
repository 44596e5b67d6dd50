"""The agent with fakes for its kernel (``FakeConntrack`` and ``FakeNodeOps``, held to the
kernel by their contract suites) and its hypervisor, and the real store, audit log, API
socket, hook client and handover feed (the source's side over its own fake table): hook
intake drives a migration here, bad input is counted and audited, the spool is replayed, a
restarted destination settles what it was preparing. No root, no namespaces.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent.daemon import Agent, Kernel, Parts
from orchestrator.agent.guests import UnknownGuest, guest_from_info
from orchestrator.agent.keys import write_new_key
from orchestrator.audit.log import AuditLog
from orchestrator.config.loader import parse
from orchestrator.hooks import hookclient
from orchestrator.hypervisor import (
    EventKind,
    GuestEvent,
    GuestInfo,
    HookCall,
    Hypervisor,
    HypervisorError,
    ProgressFn,
)
from orchestrator.lab.plan import default_config
from orchestrator.migration.coordinator import record_guest
from orchestrator.migration.feed import LocalFeed, SourceFeed, SourceSide
from orchestrator.migration.nodeops import FakeNodeOps
from orchestrator.model.conntrack import Entry
from orchestrator.netfilter.conntrack.fake import FakeConntrack
from orchestrator.store import open_store
from orchestrator.store.base import MigrationRecord, Store
from tests.entries import tcp

GUEST = "guest1"
ADDR = "10.5.5.201"
BIT = 0x40000000


# --- the hypervisor (the kernel's fakes are house's, held to the kernel by contract) ----

class FakeHypervisor(Hypervisor):
    """Hook argv ``KIND GUEST [PEER]``; the guests "here" are whatever the test says."""

    kind = "fake"

    def __init__(self, node: str) -> None:
        super().__init__({}, node)
        self.here: dict[str, bool] = {}  # guest -> running
        self.meta: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}  # guest -> (macs, addresses)

    def parse_hook(self, call: HookCall) -> GuestEvent | None:
        if not call.argv:
            return None
        try:
            kind = EventKind(call.argv[0])
            guest = call.argv[1]
        except (ValueError, IndexError):
            raise ValueError(f"unknown fake hook arguments {list(call.argv)}") from None
        peer = call.argv[2] if len(call.argv) > 2 else None
        return GuestEvent(kind, guest, self.node, "hook:fake", call.at, peer=peer, id=call.id,
                          wants_verdict=kind == EventKind.INCOMING)

    async def events(self):  # type: ignore[override]
        return
        yield

    async def describe(self, guest: str) -> GuestInfo:
        if guest not in self.here and guest not in self.meta:
            raise HypervisorError(f"no guest {guest} here")
        macs, addrs = self.meta.get(guest, ((), ()))
        return GuestInfo(guest, macs, tuple(IPv4Address(a) for a in addrs), self.node,
                         running=self.here.get(guest, True))

    async def running(self) -> list[GuestInfo]:
        return [GuestInfo(g, (), (), self.node, running=r) for g, r in self.here.items()]

    async def migrate(self, guest: str, dst: str, progress: ProgressFn) -> None:
        raise HypervisorError("not in this test")


def inbound(sport: int) -> Entry:
    """A client's TCP flow entering through n1 (mark = n1's tag) to the guest's port 80."""
    return tcp("192.168.122.1", ADDR, sport, 80, mark=1)


# --- the running agent --------------------------------------------------------------------

@dataclass
class Running:
    agent: Agent
    store: Store
    ops: FakeNodeOps
    table: FakeConntrack  # the destination's (n2's)
    source: FakeConntrack  # n1's, which the feed reads
    hv: FakeHypervisor
    conf: dict[str, Any]
    dir: Path

    async def hook(self, *argv: str) -> dict[str, Any]:
        call = hookclient.make_call("fake", list(argv))
        verdict: dict[str, Any] = await asyncio.to_thread(hookclient.deliver, call, self.conf)
        assert "spooled" not in verdict, f"the agent did not answer {argv}: {verdict}"
        return verdict

    def gate(self) -> set[str]:
        return self.ops.elements["race_gate"]

    def local(self) -> set[str]:
        return self.ops.elements["local_guests"]

    async def owner(self) -> list[tuple[str | None, int]]:
        return [(o.node, o.epoch) for o in await self.store.list_ownership(guest=GUEST)]

    def audit(self) -> list[dict[str, Any]]:
        text = (self.dir / "audit.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


async def start_agent(tmp: Path, settle_s: float = 30.0
                      ) -> tuple[Running, asyncio.Event, asyncio.Task[None]]:
    cfg = default_config(3) + (
        f'\n[agent]\nrun_dir = "{tmp}/run"\nstore = "sqlite://{tmp}/store.db"\n'
        f'audit_log = "{tmp}/audit.log"\nspool_dir = "{tmp}/spool/{{node}}"\n'
        f'key_file = "{tmp}/cluster.key"\nreconcile_interval_s = 0.2\n'
        f'recovery_settle_s = {settle_s}\n'
        'metrics = ""\n')  # off: a fixed port of the root namespace is shared by every run
    topology = parse(cfg)
    store = await open_store(topology.agent.store)
    if not topology.agent.key_file.exists():  # a first start: n1 runs the guest
        write_new_key(topology.agent.key_file)
        for n in topology.nodes:
            await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
        await store.claim_all({ADDR: 0}, "n1", GUEST)
    ops, table, hv = FakeNodeOps("n2"), FakeConntrack(), FakeHypervisor("n2")
    source = FakeConntrack()
    source.push([inbound(41000), inbound(41001)])
    audit = AuditLog(tmp / "audit.log", node="n2", actor="agent")

    def feed(record: MigrationRecord) -> SourceFeed:
        return LocalFeed(SourceSide(source, topology, record_guest(record), record.src,
                                    record.dst, record.addresses))

    parts = Parts(store, audit, Kernel(table, ops), hv,  # type: ignore[arg-type]
                  feed_factory=feed, serve_peers=False, replicate=False)
    agent = Agent(topology, "n2", parts)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    ready = asyncio.create_task(agent.ready.wait())
    await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():  # it failed to start: its own error, not a timeout
        ready.cancel()
        task.result()
    assert ready.done(), "the agent was not ready within 60 s"
    # the hook waits long (a loaded CI machine): an answer after it would be spooled
    conf = {"socket": str(topology.agent.socket("n2")), "timeout_s": 20.0, "node": "n2",
            "spool_dir": str(topology.agent.spool("n2"))}
    return Running(agent, store, ops, table, source, hv, conf, tmp), stop, task


async def until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def run(scenario: Any, tmp: Path) -> None:
    async def main() -> None:
        r, stop, task = await start_agent(tmp)
        try:
            await scenario(r)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    asyncio.run(main())


# --- tests ------------------------------------------------------------------------------

def test_hooks_drive_a_migration_here(tmp_path):
    async def scenario(r: Running) -> None:
        v = await r.hook("incoming", GUEST)
        assert (v["verdict"], v["outcome"], v["ops"]) == ("allow", "apply",
                                                         ["migration.prepare"])
        assert ADDR in r.gate()  # the gate closed before the hook was answered

        async def precopied() -> bool:
            return len(r.table.dump(mark=BIT, mark_mask=BIT)) == 2
        await until(precopied)
        v = await r.hook("resumed", GUEST)
        assert v["outcome"] == "apply" and v["results"][0]["phase"] == "cutover"
        assert await r.owner() == [("n2", 2)]
        assert ADDR in r.local() and ADDR not in r.gate()

        async def finalized() -> bool:
            return not r.table.dump(mark=BIT, mark_mask=BIT)
        await until(finalized)  # the handover bit cleared: the entries are D's own
        assert len(r.table.dump(addresses=[ADDR])) == 2
        again = await r.hook("resumed", GUEST)  # history: the same moment told again
        assert again["outcome"] == "ignore"
        async def recorded() -> bool:
            return bool(r.agent.migrations.recent)
        await until(recorded)
        actions = [a["action"] for a in r.audit() if a["action"].startswith("migration.")]
        assert actions == ["migration.prepare", "migration.precopy", "migration.cutover",
                           "migration.finalize"]
        st = await r.agent.status()
        assert st["intake"]["counts"]["apply"] == 2 and st["recent"][0]["phase"] == "done"
    run(scenario, tmp_path)


def test_a_failed_arrival_is_undone_and_a_conflict_vetoed(tmp_path):
    async def scenario(r: Running) -> None:
        await r.hook("incoming", GUEST)
        v = await r.hook("failed", GUEST)
        assert v["ops"] == ["migration.abort"]
        assert await r.owner() == [("n1", 1)] and not r.gate()
        assert not r.table.dump(addresses=[ADDR])
        # n2 does not own it and it is not migrating: starting it here is a conflict
        v = await r.hook("started", GUEST)
        assert v["outcome"] == "report" and "n1 owns it" in v["reason"]
        v = await r.hook("incoming", GUEST, "n3")  # the hypervisor names another source
        assert (v["verdict"], v["outcome"]) == ("deny", "report")
    run(scenario, tmp_path)


def test_bad_input_is_counted_reported_and_audited_never_a_crash(tmp_path):
    async def scenario(r: Running) -> None:
        sock = r.conf["socket"]
        assert (await r.agent.intake.deliver(call=42))["outcome"] == "rejected"
        v = await r.hook("explode", GUEST)
        assert v["outcome"] == "rejected" and "unknown fake hook arguments" in v["reason"]
        v = await r.hook("started", "ghost")
        assert v["outcome"] == "report" and "unknown guest 'ghost'" in v["reason"]
        def junk_line() -> bytes:  # a line that is not JSON
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
                s.sendall(b'{"op": "hook.deliver", "args": \n')
                return s.recv(1000)
        assert b"bad request" in await asyncio.to_thread(junk_line)
        spool = Path(r.conf["spool_dir"])
        spool.mkdir(parents=True)
        (spool / f"{time.time_ns():020d}-a.call.json").write_text('{"hook": "fake", "ar')
        (spool / f"{time.time_ns():020d}-b.call.json").write_text("not json at all")
        (spool / f"{time.time_ns():020d}-c.call.json").write_text("[1, 2]")
        good = hookclient.make_call("fake", ["stopped", GUEST])
        hookclient.spool(good, str(spool))
        await r.agent.intake.replay()  # (the agent's own loop may get there first)
        assert r.agent.intake.counts["spool.bad"] == 3
        assert r.agent.intake.counts["spool.taken"] == 1
        assert sorted(p.name.split("-")[1] for p in spool.iterdir()) == [
            "a.call.json.bad", "b.call.json.bad", "c.call.json.bad"]
        await asyncio.sleep(0.05)
        st = await r.agent.status()
        counts = st["intake"]["counts"]
        for kind in ("malformed", "unreadable", "reported", "bad-spool-file"):
            assert counts[f"problem.{kind}"] >= 1, (kind, counts)
        assert counts["problem.malformed"] == 2  # the call and the API line
        kinds = {p["kind"] for p in st["intake"]["problems"]}
        assert {"malformed", "unreadable", "reported", "bad-spool-file"} <= kinds
        audited = [a for a in r.audit() if a["action"] in ("hook.rejected", "hook.report")]
        details = " | ".join(a["detail"] for a in audited)
        for word in ("malformed", "unreadable", "unknown guest 'ghost'", "bad-spool-file"):
            assert word in details, (word, details)
        assert (await r.hook("incoming", GUEST))["outcome"] == "apply"  # still serving
    run(scenario, tmp_path)


def test_the_spool_replays_in_order_and_history_never_undoes_the_store(tmp_path):
    async def scenario(r: Running) -> None:
        spool = r.conf["spool_dir"]
        # spooled while the agent was away: the guest arrived here
        for argv in (["incoming", GUEST], ["resumed", GUEST]):
            hookclient.spool(hookclient.make_call("fake", argv), spool)
            await asyncio.sleep(0.01)
        await r.agent.intake.replay()  # (the agent's own loop may take some first)
        assert not r.agent.intake.pending()
        assert await r.owner() == [("n2", 2)]
        # an old "stopped" (from before the arrival) turns up late: it must not release
        old = hookclient.make_call("fake", ["stopped", GUEST])
        old["at"] = time.time() - 3600
        hookclient.spool(old, spool)
        await r.agent.intake.replay()
        assert not r.agent.intake.pending()
        assert await r.owner() == [("n2", 2)]
        assert r.agent.intake.counts["ignore"] >= 1
    run(scenario, tmp_path)


def test_a_restarted_destination_settles_what_it_was_preparing(tmp_path):
    """Its resume never comes and the guest is not here: aborted after recovery_settle_s
    (0.3 s here), not after the 900 s migration timeout; a guest that did resume here is
    cut over instead."""
    async def phases() -> list[str]:
        store = await open_store(f"sqlite://{tmp_path}/store.db")
        try:
            return [m.phase.value for m in await store.list_migrations()]
        finally:
            await store.close()

    async def main() -> None:
        for arrived, want in ((False, [("n1", 1)]), (True, [("n2", 2)])):
            r, stop, task = await start_agent(tmp_path, settle_s=0.3)
            await r.hook("incoming", GUEST)
            stop.set()  # the agent goes away mid-precopy; its resume is never delivered
            await task
            assert await phases() in (["prepare"], ["precopy"])
            r, stop, task = await start_agent(tmp_path, settle_s=0.3)
            if arrived:
                r.hv.here[GUEST] = True
            try:
                async def settled(store: Store = r.store) -> bool:
                    return not await store.list_migrations()
                await until(settled)
                assert await r.owner() == want
                assert ADDR not in r.gate()
            finally:
                stop.set()
                await task
    asyncio.run(main())


def test_a_guest_only_the_hypervisor_knows_is_resolved_from_its_metadata(tmp_path):
    async def scenario(r: Running) -> None:
        r.hv.meta["vm7"] = (("52:54:00:00:07:07",), ("10.5.5.77",))
        v = await r.hook("started", "vm7")
        assert (v["outcome"], v["ops"]) == ("apply", ["guest.started"])
        owned = await r.store.list_ownership(guest="vm7")
        assert [(str(o.ip), o.node) for o in owned] == [("10.5.5.77", "n2")]
        # metadata that would clash with the cluster is refused with its reason
        r.hv.meta["vm8"] = (("52:54:00:00:08:08",), ("10.5.5.201",))  # guest1's address
        v = await r.hook("started", "vm8")
        assert v["outcome"] == "report" and "10.5.5.201 belongs to guest guest1" in v["reason"]
        r.hv.meta["vm9"] = (("52:54:00:00:09:09",), ())
        v = await r.hook("started", "vm9")
        assert v["outcome"] == "report" and "no addresses in its metadata" in v["reason"]
    run(scenario, tmp_path)


@pytest.mark.parametrize(("macs", "addrs", "why"), [
    (["52:54:00:00:01:01"], ["10.9.9.9"], "outside guest_subnet"),
    (["52:54:00:00:01:01"], ["10.5.5.254"], "reserved"),
    (["52:54:00:00:01:01"], ["10.5.5.251"], "reserved"),
    (["0a:00:01:00:00:05"], ["10.5.5.90"], "falls in node n1's MAC prefix"),
    (["not-a-mac"], ["10.5.5.90"], "macs"),
    (["52:54:00:00:02:01"], ["10.5.5.90"], None),
])
def test_guest_from_info_checks_what_the_cluster_file_checks(macs, addrs, why):
    topology = parse(default_config(3))
    ips = [IPv4Address(a) for a in addrs]
    if why is None:
        g = guest_from_info("vm", macs, ips, topology)
        assert (g.name, [str(a) for a in g.addresses]) == ("vm", addrs)
        return
    with pytest.raises(UnknownGuest, match=why):
        guest_from_info("vm", macs, ips, topology)
