"""``convergent migrate`` asked of a node that does not run the guest: its agent forwards
the request over the peer channel to the owner's agent, which runs it as if asked locally.

One lab for the module (guest1 starts on n1; each test reads where it is now):
- through n2's agent, guest1 moves n1 -> n3: every phase shows as it happens, ownership
  follows, a guest-initiated flow survives, and both agents audit the forward (who asked,
  from which node);
- refusals of the owner come back as its one line, unchanged, exit 1;
- an abort asked through another node stops the owner's move;
- the owner's agent stopped: one line naming it and why, exit 1, nothing changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lab.lab import Lab
from tests.conftest import running_lab
from tests.functional.test_agent_faults import restart_with
from tests.functional.test_hook_intake import STALL_S, in_flight, stall_config, until
from tests.functional.test_migration import established_pair, owners, received_within

pytestmark = pytest.mark.root
PHASES = ["starting", "memory", "paused", "resumed", "done"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("fw", config=stall_config,
                           config_dir=tmp_path_factory.mktemp("fw"))


def via(lab: Lab, node: str, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``convergent migrate ARGV`` asking ``node``'s agent."""
    return subprocess.run(command(lab, node, *argv), capture_output=True, text=True,
                          timeout=timeout)


def command(lab: Lab, node: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "migrate", *argv, "--node", node,
            "--config", str(lab.config_path)]


def where(lab: Lab) -> str:
    node = lab.guest_node(lab.topology(), "guest1")
    assert node is not None
    return node


def audit(lab: Lab, action: str, since: str) -> list[dict[str, Any]]:
    path = Path(str(lab.topology().agent.audit_log).replace("{node}", "*"))
    out = []
    for log in sorted(path.parent.glob(path.name)):
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec["action"] == action and rec["time"] >= since:
                out.append(rec)
    return out


def now() -> str:
    """The audit log's time format, for records written from now on."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def test_a_migration_asked_on_another_node_runs_on_the_owner(lab):
    assert where(lab) == "n1" and owners(lab) == [("n1", 1)]
    cli_sock, conn = established_pair(lab, 7500)  # SNATed by n1: its entry must follow
    since = now()
    moving = subprocess.Popen(command(lab, "n2", "guest1", "--to", "n3"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # each phase, as n1's adapter reports it, relayed by n2's agent while it runs
        assert moving.stderr is not None
        first = moving.stderr.readline()
        running_then = moving.poll() is None
        out, rest = moving.communicate(timeout=90)
    finally:
        moving.kill()
    assert moving.returncode == 0, first + rest
    assert running_then, "the first phase came only with the answer"
    shown = [line.split()[2].rstrip(":") for line in (first + rest).splitlines()]
    assert shown == PHASES, first + rest
    assert first.split()[3:] == ["guest1", "n1", "->", "n3"]
    assert out.startswith("guest1: n1 -> n3 in ") and "cutover" in out
    assert where(lab) == "n3" and owners(lab) == [("n3", 2)]
    cli_sock.sendall(b"moved")  # the flow survived, as with a local call
    assert received_within(conn, 5) == b"moved"
    conn.sendall(b"back")
    assert received_within(cli_sock, 5) == b"back"
    cli_sock.close()
    conn.close()
    sent, = audit(lab, "forward.send", since)
    served, = audit(lab, "forward.serve", since)
    assert (sent["node"], sent["from_node"], sent["to_node"], sent["outcome"]) == (
        "n2", "n2", "n1", "ok")
    assert (served["node"], served["from_node"], served["outcome"]) == ("n1", "n2", "ok")
    assert sent["guest"] == served["guest"] == "guest1"
    assert "guest.migrate guest1 to=n3, asked by uid 0 (root) pid " in sent["detail"]
    assert served["detail"].startswith("guest.migrate guest1 to=n3, asked by uid 0 (root) "
                                       "pid ") and served["detail"].endswith(" on n2")
    # --json through another node: one object, as on the owner
    back = via(lab, "n2", "guest1", "--to", "n1", "--json")
    assert back.returncode == 0, back.stderr
    report = json.loads(back.stdout)
    assert (report["from"], report["to"], report["outcome"]) == ("n3", "n1", "done")
    assert [p["phase"] for p in report["phases"]] == PHASES
    assert report["migration"]["timings"]["cutover"] > 0
    assert where(lab) == "n1" and owners(lab) == [("n1", 3)]


def test_the_owners_refusals_come_back_as_its_one_line(lab):
    owner = where(lab)
    other = next(n for n in ("n1", "n2", "n3") if n != owner)
    since = now()
    for argv, line in (
            (("guest1", "--to", "n9"), "unknown node 'n9' (nodes: n1, n2, n3)"),
            (("guest1", "--to", owner), f"guest1 already runs on {owner}"),
            (("nosuch", "--to", owner), "unknown guest 'nosuch' (known: guest1)")):
        refused = via(lab, other, *argv, "--json")
        assert (refused.returncode, refused.stderr, refused.stdout) == (
            1, f"convergent: {line}\n", ""), argv
    served = audit(lab, "forward.serve", since)
    assert [(r["node"], r["from_node"], r["outcome"]) for r in served] == [
        (owner, other, "refused")] * 2  # the unknown guest: no owner to forward it to
    assert served[0]["detail"].endswith(": unknown node 'n9' (nodes: n1, n2, n3)")
    assert where(lab) == owner and not in_flight(lab)


def test_an_abort_asked_on_another_node_stops_the_owners_move(lab):
    src = where(lab)
    dst, asker = (n for n in ("n1", "n2", "n3") if n != src)
    restart_with(lab, dst, f"precopy.synced=sleep:{STALL_S}")  # the precopy stalls at dst
    moving = subprocess.Popen(command(lab, asker, "guest1", "--to", dst),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: bool(in_flight(lab)), 15, "the migration to start")
        aborted = via(lab, asker, "--abort", "guest1")
        _, err = moving.communicate(timeout=30)
    finally:
        moving.kill()
        lab.kill_agent(dst)
        lab.start_agent(dst)
    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout.count("\n") == 1 and \
        f"{src} -> {dst} aborted; guest1 stays on {src}" in aborted.stdout
    assert moving.returncode == 1 and err.strip().splitlines()[-1].startswith(
        f"convergent: guest1: migration {src} -> {dst} aborted by request"), err
    assert where(lab) == src and [o for o, _ in owners(lab)] == [src]


def test_the_owners_agent_down_is_one_line_naming_it_and_nothing_changes(lab):
    owner = where(lab)
    asker, dst = (n for n in ("n1", "n2", "n3") if n != owner)
    before = owners(lab)
    lab.kill_agent(owner)
    try:
        down = via(lab, asker, "guest1", "--to", dst)
        assert down.returncode == 1
        port = lab.topology().agent.peer_port
        peer_ip = lab.topology().node(owner).peer_ip
        assert down.stderr == (f"convergent: {owner}'s agent is unreachable at {peer_ip}:"
                               f"{port}: Connection refused; nothing was started on "
                               f"{owner}\n")
        assert owners(lab) == before and where(lab) == owner and not in_flight(lab)
    finally:
        lab.start_agent(owner)
    moved = via(lab, asker, "guest1", "--to", dst)  # back up: the same request goes through
    assert moved.returncode == 0, moved.stderr
    assert where(lab) == dst
