"""Drive the lab and read the audit log: every action writes exactly one record, with the
fields an operator asks for after an incident, and the chain verifies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from tests.conftest import running_lab
from tests.functional.test_migration import agent

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[Lab]:
    yield from running_lab("a")


def records(lab: Lab) -> list[dict[str, Any]]:
    text = (lab.dir / "audit.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def new_since(lab: Lab, mark: int) -> list[dict[str, Any]]:
    """Records after ``mark``, less the replicator's resyncs (they come when peers join)."""
    return [r for r in records(lab)[mark:] if r["action"] != "sync.resync"]


def wait_for_resyncs(lab: Lab, mark: int, nodes: set[str]) -> list[dict[str, Any]]:
    """The ``sync.resync`` records after ``mark`` once every one of ``nodes`` wrote one
    (the agent polls its sender's counter each second)."""
    deadline = time.monotonic() + 15
    while True:
        found = [r for r in records(lab)[mark:] if r["action"] == "sync.resync"]
        if {r["node"] for r in found} >= nodes or time.monotonic() > deadline:
            assert {r["node"] for r in found} >= nodes, found
            return found
        time.sleep(0.2)


def test_each_action_writes_one_record(lab):
    # start: the home agent claims the guest once
    start = Counter(r["action"] for r in records(lab))
    assert start["agent.start"] == 3 and start["guest.start"] == 1
    assert start["ownership.claim"] == 1
    claim = next(r for r in records(lab) if r["action"] == "ownership.claim")
    assert (claim["node"], claim["guest"], claim["epoch"]) == ("n1", "guest1", 1)
    assert claim["addresses"] == ["10.5.5.201"] and claim["actor"] == "agent"

    # migrate: one record per phase, on the destination, with from/to and timings, and
    # one on the source when it closed its part (the guest left it)
    mark = len(records(lab))
    asyncio.run(migrate(lab, "guest1", "n2"))
    left = [r for r in new_since(lab, mark) if r["action"] == "migration.leave"]
    for _ in range(50):  # the source closes its part once the migration is done
        if left:
            break
        time.sleep(0.1)
        left = [r for r in new_since(lab, mark) if r["action"] == "migration.leave"]
    assert [(r["node"], r["from_node"], r["to_node"], r["outcome"]) for r in left] == [
        ("n1", "n1", "n2", "ok")]
    phases = [r for r in new_since(lab, mark) if r["action"] != "migration.leave"]
    assert [r["action"] for r in phases] == [
        "migration.prepare", "migration.precopy", "migration.cutover", "migration.finalize"]
    assert left[0]["migration"] == phases[0]["migration"]
    assert len({r["migration"] for r in phases}) == 1
    for r in phases:
        assert (r["node"], r["from_node"], r["to_node"]) == ("n2", "n1", "n2")
        assert r["guest"] == "guest1" and r["outcome"] == "ok" and "duration_ms" in r
    assert phases[2]["epoch"] == 2

    # abort: prepare + precopy, then exactly one abort record with the reason
    mark = len(records(lab))
    agent(lab, "n3", "migration.prepare", guest="guest1", src="n2")
    agent(lab, "n3", "migration.abort", guest="guest1", reason="hypervisor failed")
    aborted = new_since(lab, mark)
    assert [r["action"] for r in aborted] == [
        "migration.prepare", "migration.precopy", "migration.abort"]
    assert aborted[-1]["outcome"] == "failed" and "hypervisor failed" in aborted[-1]["detail"]

    # someone flushes n2's rules: the agent restores them and says so, once
    mark = len(records(lab))
    ns.in_ns(lab.names.node("n2"), "nft", "delete", "table", "ip", "convergent")
    agent(lab, "n2", "reconcile")
    agent(lab, "n2", "reconcile")  # nothing left to change: no second record
    applied = [r for r in new_since(lab, mark) if r["action"] == "ruleset.apply"]
    assert len(applied) == 1 and applied[0]["node"] == "n2"

    # stop: the guest shuts down on n2, which releases what it owned
    mark = len(records(lab))
    agent(lab, "n2", "guest.stopped", guest="guest1")
    stopped = new_since(lab, mark)
    assert [r["action"] for r in stopped] == ["guest.stop", "ownership.release"]
    assert stopped[1]["epoch"] == 3

    # the replicator: a restarted n3 first hears n1 and n2 through ALIVE, not HELLO, so it
    # cannot know what it missed and asks both for a full resync; each records its own
    mark = len(records(lab))
    lab.kill_agent("n3")
    lab.start_agent("n3")
    resyncs = wait_for_resyncs(lab, mark, {"n1", "n2"})
    assert all(r["actor"] == "agent" and r["from_node"] == r["node"] for r in resyncs)

    verify = subprocess.run([sys.executable, "-m", "orchestrator", "audit", "verify", "--log",
                             str(lab.dir / "audit.log")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_verify_names_every_problem_of_a_lab_log_and_junk_never_stops_the_writer(lab, tmp_path):
    from orchestrator.audit.chain import expected_prefix
    from orchestrator.audit.record import line_hash

    live = lab.dir / "audit.log"
    lines = live.read_bytes().splitlines()
    assert len(lines) >= 4
    copy = tmp_path / "audit.log"
    edited = lines[2].replace(b'"node":"', b'"node":"x', 1)
    cut = expected_prefix(len(lines) + 1, line_hash(lines[-1])) + b',"time":"20'
    copy.write_bytes(b"\n".join([*lines[:2], edited, *lines[3:]]) + b"\n" + cut)
    got = subprocess.run([sys.executable, "-m", "orchestrator", "audit", "verify", "--log",
                          str(copy)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert got.returncode == 1
    assert got.stderr.splitlines() == [
        f"convergent: {copy}:3: edited: its hash differs from the prev recorded by {copy}:4 "
        "(this line, or that prev, was changed)",
        f"convergent: warning: {copy}:{len(lines) + 1}: truncated: last line cut short "
        f"({len(cut)} bytes, no newline): a crash during a write, not tampering; the next "
        "write drops it and records the recovery"]
    # junk at the end of the live log: the agents go on writing, the junk stays named
    with live.open("ab") as f:
        f.write(b"garbage line\n")
    asyncio.run(migrate(lab, "guest1", "n2"))
    junk_at = live.read_bytes().splitlines().index(b"garbage line") + 1  # agents write too
    report = subprocess.run([sys.executable, "-m", "orchestrator", "audit", "verify", "--log",
                             str(live)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert report.returncode == 1
    assert report.stderr.splitlines() == [f"convergent: {live}:{junk_at}: corrupt: not an "
                                          "audit record (no seq/prev prefix or no newline)"]
    after = [json.loads(x) for x in live.read_text().splitlines()[junk_at:]]
    assert after[0]["action"] == "error" and "are not audit records" in after[0]["detail"]
    assert "migration.finalize" in {r["action"] for r in after}


def test_the_labs_log_is_keyed_and_verify_finds_the_key_through_the_config(lab, tmp_path):
    import hashlib

    live = lab.dir / "audit.log"
    lines = live.read_bytes().splitlines()
    last = json.loads(lines[-1])
    forged = {**last, "seq": last["seq"] + 1, "prev": hashlib.sha256(lines[-1]).hexdigest(),
              "action": "ownership.release", "detail": "nothing to see"}
    forged.pop("mac", None)
    copy = tmp_path / "audit.log"
    copy.write_bytes(live.read_bytes() + json.dumps(forged, separators=(",", ":")).encode()
                     + b"\n")
    verify = [sys.executable, "-m", "orchestrator", "audit", "verify", "--log", str(copy)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVERGENT_")}
    bare = subprocess.run([*verify, "--no-key"], capture_output=True, text=True, timeout=30,
                          env=env)  # fmt: skip
    assert bare.returncode == 0, bare.stderr  # the hash chain alone cannot see it
    keyed = subprocess.run(verify, capture_output=True, text=True, timeout=30,
                           env={**env, "CONVERGENT_CONFIG": str(lab.config_path)})
    assert keyed.returncode == 1
    assert keyed.stderr == (f"convergent: {copy}:{len(lines) + 1}: forged: no mac: the chain "
                            "is keyed, and this line was written without the key\n")
    intact = subprocess.run([*verify[:-1], str(live)], capture_output=True, text=True,
                            timeout=30, env={**env, "CONVERGENT_CONFIG": str(lab.config_path)})
    assert intact.returncode == 0, intact.stderr


def _store_anchors(lab: Lab) -> list[Any]:
    from orchestrator.store import open_store

    async def read() -> list[Any]:
        async with await open_store(lab.topology().agent.store) as store:
            return await store.list_audit_anchors()

    return asyncio.run(read())


def _rechained(lines: list[bytes], start: int) -> list[bytes]:
    """The chain rewritten from line ``start`` (1-based) on, its hashes recomputed: what
    someone does who edits a line and covers it up (macs dropped: verify runs --no-key)."""
    from orchestrator.audit.record import encode, line_hash

    out = lines[: start - 1]
    for raw in lines[start - 1:]:
        record = json.loads(raw)
        record.pop("mac", None)
        record["prev"] = line_hash(out[-1])
        if len(out) == start - 1:
            record["detail"] = "nothing happened here"
        out.append(encode(record))
    return out


def test_the_store_anchors_the_labs_log_and_verify_checks_it_by_default(lab):
    from orchestrator.audit.record import line_hash

    live = lab.dir / "audit.log"
    url = lab.topology().agent.store
    deadline = time.monotonic() + 20
    while True:  # each agent anchors its last record within a second (on a quiet machine)
        lines = live.read_bytes().splitlines()
        anchors = [a for a in _store_anchors(lab) if a.path == str(live.resolve())]
        top = max((a.seq for a in anchors), default=0)
        # every agent's anchor, and the newest at the log's last line (one node's may
        # reach the end before another's first one lands)
        if {a.node for a in anchors} == {"n1", "n2", "n3"} and top == len(lines):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {a.node for a in anchors} == {"n1", "n2", "n3"} and top == len(lines), anchors
    assert all(a.hash == line_hash(lines[a.seq - 1]) for a in anchors)
    for node in ("n1", "n2", "n3"):
        lab.kill_agent(node)  # nothing writes any more (SIGKILL: no last anchor either)
    anchors = [a for a in _store_anchors(lab) if a.path == str(live.resolve())]  # by node
    original = live.read_bytes()
    lines = original.splitlines()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CONVERGENT_")},
           "CONVERGENT_CONFIG": str(lab.config_path)}

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator", "audit", "verify", "--log",
                               str(live), *extra], capture_output=True, text=True, timeout=30,
                              env=env)  # fmt: skip

    untouched = verify()
    assert untouched.returncode == 0, untouched.stderr
    named = ", ".join(f"{a.node} at seq {a.seq}" for a in anchors)
    assert f"; checked against the anchor(s) from the store {url}: {named}; head " \
        in untouched.stdout, untouched.stdout  # fmt: skip

    # the last three lines deleted: the hash chain and the macs cannot see it; the anchor can
    end = len(lines) - 3
    live.write_bytes(b"".join(line + b"\n" for line in lines[:end]))
    assert verify("--no-store").returncode == 0
    cut = verify()
    noted = min(a.seq for a in anchors if a.seq > end)
    assert cut.returncode == 1
    assert cut.stderr.splitlines() == [
        f"convergent: {live}:{end}: anchor: chain ends at seq {end} but the store {url} "
        f"anchored seq {noted}: last lines deleted",
        f"convergent: {live}: checked against the anchor(s) from the store {url}: {named}"]

    # a line edited and the chain rewritten after it: each anchor past the edit is named
    start = min(a.seq for a in anchors) - 1
    live.write_bytes(b"".join(line + b"\n" for line in _rechained(lines, start)))
    assert verify("--no-key", "--no-store").returncode == 0  # the control: it passes bare
    rewritten = verify("--no-key")
    assert rewritten.returncode == 1
    assert rewritten.stderr.splitlines()[:-1] == [
        f"convergent: {live}:{a.seq}: anchor: seq {a.seq} does not hash to the anchor from "
        f"the store {url}: chain rewritten from here" for a in sorted(anchors, key=lambda a: a.seq)]
    live.write_bytes(original)
