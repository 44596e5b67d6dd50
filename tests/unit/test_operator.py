"""Who runs an operator's request (orchestrator/agent/operator.py): the guest's owner or the
survivor, here or through a forward to that node's agent. Real SQLite store, real audit
logs, a real PeerServer on loopback TCP for the other node; the requests' own handlers are
recorders (what they do is tested where they live)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent.forward import Refused, Unreachable
from orchestrator.agent.operator import OperatorRequests
from orchestrator.agent.peer import PeerServer
from orchestrator.audit.log import AuditLog
from orchestrator.config.loader import parse
from orchestrator.errors import MigrationError
from orchestrator.lab.plan import default_config
from orchestrator.store import open_store

KEY = os.urandom(32)
GUEST_IP = IPv4Address("10.5.5.201")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Recorder:
    """A node's own handlers: what they were asked, and what they answer."""

    def __init__(self, node: str, refuse: str | None = None) -> None:
        self.node, self.refuse = node, refuse
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def handlers(self) -> dict[str, Any]:
        async def migrate(guest: str, to: str, emit: Any = None) -> dict[str, Any]:
            self.calls.append(("guest.migrate", {"guest": guest, "to": to}))
            if self.refuse:
                raise MigrationError(self.refuse)
            for phase in ("starting", "done"):
                if emit is not None:
                    await emit({"phase": phase})
            return {"from": self.node, "to": to}

        async def failover(from_node: str, force: bool = False, dry_run: bool = False,
                           skip: list[str] | None = None) -> dict[str, Any]:
            self.calls.append(("failover.run", {"from_node": from_node, "dry_run": dry_run}))
            return {"from": from_node, "to": self.node}

        async def unused(**args: Any) -> None:
            raise AssertionError(args)
        return {"guest.migrate": migrate, "failover.run": failover,
                "guest.migrate_abort": unused, "migration.abort": unused}


async def two_nodes(tmp: Path, refuse: str | None = None) -> Any:
    """n1 owns guest1 and serves forwards on 127.0.0.1; n2 asks."""
    port = free_port()
    cfg = default_config(3).replace('sync_ip = "172.31.0.11"', 'sync_ip = "127.0.0.1"')
    topology = parse(cfg + f"\n[agent]\npeer_port = {port}\n")
    store = await open_store(f"sqlite://{tmp}/s.db")
    await store.claim(GUEST_IP, "n1", "guest1", 0)
    nodes = {}
    for name, rec in (("n1", Recorder("n1", refuse)), ("n2", Recorder("n2"))):
        audit = AuditLog(tmp / f"audit-{name}.log", node=name, fsync=False)
        nodes[name] = (OperatorRequests(name, topology, store, audit, KEY, rec.handlers()),
                       rec, tmp / f"audit-{name}.log")

    async def never(peer: str, req: dict[str, Any]) -> Any:
        raise AssertionError(req)
    server = PeerServer("n1", KEY, never, lambda: None, on_forward=nodes["n1"][0].serve)
    await server.start("127.0.0.1", port)
    return store, server, nodes


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_migration_is_run_by_the_owner_here_or_through_a_forward(tmp_path: Path) -> None:
    async def main() -> None:
        store, server, nodes = await two_nodes(tmp_path)
        (n1, rec1, log1), (n2, rec2, log2) = nodes["n1"], nodes["n2"]
        try:
            seen: list[Any] = []

            async def emit(step: Any) -> None:
                seen.append(step["phase"])
            here = await n1.migrate("guest1", "n3", emit, caller="uid 0 (root) pid 1")
            assert here == {"from": "n1", "to": "n3"} and seen == ["starting", "done"]
            assert records(log1) == []  # nothing forwarded
            seen.clear()
            there = await n2.migrate("guest1", "n3", emit, caller="uid 0 (root) pid 2")
            assert there == {"from": "n1", "to": "n3"} and seen == ["starting", "done"]
            assert rec1.calls == [("guest.migrate", {"guest": "guest1", "to": "n3"})] * 2
            assert rec2.calls == []  # n2 never ran it itself
            sent, = records(log2)
            served, = records(log1)
            assert (sent["action"], sent["from_node"], sent["to_node"]) == (
                "forward.send", "n2", "n1")
            assert (served["action"], served["from_node"], served["to_node"]) == (
                "forward.serve", "n2", "n1")
            assert served["detail"] == ("guest.migrate guest1 to=n3, asked by uid 0 (root) "
                                        "pid 2 on n2")
            assert server.forwarded == 1
            with pytest.raises(Exception, match="unknown guest 'nope'"):
                await n2.migrate("nope", "n3", caller="x")
            assert server.forwarded == 1  # decided on n2: nobody to ask
        finally:
            await server.close()
            await store.close()
    asyncio.run(main())


def test_a_refusal_is_the_owners_line_here_and_there(tmp_path: Path) -> None:
    async def main() -> None:
        store, server, nodes = await two_nodes(tmp_path, refuse="guest1 is already migrating")
        try:
            for asker in ("n1", "n2"):
                with pytest.raises(Refused, match=r"^guest1 is already migrating$"):
                    await nodes[asker][0].migrate("guest1", "n3", caller="x")
            assert records(nodes["n2"][2])[0]["outcome"] == "refused"
            assert records(nodes["n1"][2])[0]["outcome"] == "refused"
        finally:
            await server.close()
            await store.close()
    asyncio.run(main())


def test_a_failover_runs_on_the_survivor_and_an_unreachable_one_is_one_line(
        tmp_path: Path) -> None:
    async def main() -> None:
        store, server, nodes = await two_nodes(tmp_path)
        n2, rec1 = nodes["n2"][0], nodes["n1"][1]
        try:
            assert await n2.failover("n3", to_node="n1", dry_run=True, caller="x") == {
                "from": "n3", "to": "n1"}
            assert rec1.calls == [("failover.run", {"from_node": "n3", "dry_run": True})]
            assert await n2.failover("n3", caller="x") == {"from": "n3", "to": "n2"}
            with pytest.raises(MigrationError, match=r"unknown node 'n9' \(nodes: n1, n2, n3"):
                await n2.failover("n1", to_node="n9", caller="x")
            await server.close()  # n1's agent gone
            with pytest.raises(Unreachable, match=r"^n1's agent is unreachable at 127.0.0.1:"
                                                  r"\d+: Connection refused; nothing was "
                                                  r"started on n1$"):
                await n2.failover("n3", to_node="n1", caller="x")
            assert records(nodes["n2"][2])[-1]["outcome"] == "failed"
        finally:
            await server.close()
            await store.close()
    asyncio.run(main())
