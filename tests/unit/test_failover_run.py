"""The survivor's failover steps over the fakes (a real SQLite store, the in-memory
conntrack table held to the kernel by its contract suite, a recording adoption): their
order, what each leaves in the store and the table, one audit record per step, refusals
audited, the control switches, a second run (the failback: test_failback.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.audit.log import AuditLog
from orchestrator.errors import ConvergentError
from orchestrator.failover.adopt import Changes, desired_adoption
from orchestrator.failover.plan import FailoverRefused
from orchestrator.failover.run import Failover
from orchestrator.netfilter.conntrack import Conntrack
from orchestrator.netfilter.conntrack.fake import FakeConntrack
from orchestrator.store import Store, open_store
from orchestrator.store.base import PublicAddress
from tests.unit.test_failover_plan import CACHE, G_VIA_N1, unnated
from tests.unit.test_planner import PUB, G, H, T


class Recorder:
    """Stands for AdoptionOps: records what it was asked to program, and when."""

    def __init__(self, table: Conntrack, log: list[str]) -> None:
        self.table, self.log = table, log

    async def follow(self, records: Callable[[], Awaitable[list[PublicAddress]]]) -> Changes:
        want = desired_adoption(await records(), T, "n3")
        self.log.append(f"program entries={self.table.count()} adopted={sorted(want.entry)}")
        return Changes(sorted(ip for ip, _ in want.entry), [], True)


async def world(tmp: Path, table: Conntrack | None = None
                ) -> tuple[Store, Conntrack, Failover, list[str], Path]:  # fmt: skip
    """``table``: a real one (tests/functional), else the fake."""
    store = await open_store(f"sqlite://{tmp}/s.db")
    for n in T.nodes:
        await store.upsert_node(n.name, n.tag, n.mac_prefix, n.pub_ip)
        await store.claim_public(n.name, n.pub_ip, n.name, 0)
    for n in ("n2", "n3"):
        await store.grant_lease(n, 30)
    await store.claim(G, "n2", "g1", 0)
    await store.claim(H, "n1", "g2", 0)
    table, log = table or FakeConntrack(), []
    audit_path = tmp / "audit.log"
    fo = Failover(T, "n3", store, table, Recorder(table, log),
                  AuditLog(str(audit_path), node="n3", actor="agent"), lambda _n: CACHE,
                  lambda: log.append("wake"))
    return store, table, fo, log, audit_path


def actions(path: Path) -> list[tuple[str, str]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["action"], r["outcome"]) for r in recs]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_failover_steps_in_order_each_audited(tmp_path: Path) -> None:
    async def main() -> None:
        store, table, fo, log, audit = await world(tmp_path)
        report = await fo.run("n1")
        # the entries were in the table before the address was programmed
        assert log == [f"program entries=1 adopted={[(PUB[1], 1)]}", "wake"]
        assert table.get(G_VIA_N1) is not None
        assert (await store.get_public("n1")).holder == "n3"  # type: ignore[union-attr]
        assert {str(o.ip): o.node for o in await store.list_ownership(
            include_released=True)} == {G: "n2", H: None}
        assert report["committed"] == 1 and report["lost_guests"] == {"g2": [H]}
        assert set(report["steps_ms"]) == {"plan", "adopt", "commit", "program", "release"}
        assert actions(audit) == [(a, "ok") for a in (
            "failover.begin", "failover.adopt", "failover.commit", "failover.program",
            "failover.release", "failover.end")]
        again = await fo.run("n1")  # a second run: n3 holds it; nothing new, no error
        assert again["epoch"] == report["epoch"] and again["lost_guests"] == {}
        await store.close()

    run(main())


def test_failover_refused_is_audited_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        store, table, fo, log, audit = await world(tmp_path)
        await store.grant_lease("n1", 30)
        with pytest.raises(FailoverRefused, match="n1 is alive"):
            await fo.run("n1")
        assert actions(audit) == [("failover.begin", "refused")]
        assert table.count() == 0 and log == []
        assert (await store.get_public("n1")).holder == "n1"  # type: ignore[union-attr]
        forced = await fo.run("n1", force=True)
        assert forced["forced"] and "forced" in audit.read_text()
        with pytest.raises(ConvergentError, match="cannot skip"):
            await fo.run("n1", skip=frozenset({"everything"}))
        await store.close()

    run(main())


@pytest.mark.parametrize(("skip", "holder", "entries"), [
    ("entries", "n3", 0), ("address", "n1", 0)])
def test_control_switches_leave_their_part_out(tmp_path: Path, skip: str, holder: str,
                                               entries: int) -> None:
    async def main() -> None:
        store, table, fo, _, audit = await world(tmp_path)
        report = await fo.run("n1", skip=frozenset({skip}))
        assert table.count() == entries and report["skipped_parts"] == [skip]
        assert (await store.get_public("n1")).holder == holder  # type: ignore[union-attr]
        assert "control run: without " + skip in audit.read_text()
        await store.close()

    run(main())


def test_failover_replaces_the_survivors_unnated_copy(tmp_path: Path) -> None:
    """G moved n1 -> n3 before n1 died: n3 holds its n1-SNATed flow un-NATed. The commit
    replaces it with the bound entry, counted in the report and the audit record."""
    async def main() -> None:
        store, table, fo, _log, audit = await world(tmp_path)
        (bound,) = (await fo.plan("n1")).commit
        table.push([unnated(bound)], "fail")
        report = await fo.run("n1")
        got = table.get(bound)
        assert got is not None and got.tuple_reply == bound.tuple_reply and got.is_src_nat
        assert report["replaced"] == 1 and report["committed"] == 1
        assert report["unchanged"] == 0 and not report["commit_errors"]
        commit = [json.loads(line) for line in audit.read_text().splitlines()
                  if '"failover.commit"' in line]
        assert commit[0]["detail"] == "replaced 1 un-NATed"
        again = await fo.run("n1")  # held with its binding now: left as it is
        assert again["replaced"] == 0 and again["unchanged"] == 1
        await store.close()

    run(main())
