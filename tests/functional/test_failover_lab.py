"""Node death in the lab (3 nodes on a 3-member etcd): G runs on n2 after having run on n1;
an SSH session from the workstation through n1's address to G, a stream G opened while on
n1 (SNATed to n1's address), an SSH session through n3's address; H runs on n1. n1 dies
(agent SIGKILL, every link cut, its etcd member partitioned with it). Its lease expires;
``convergent failover --from n1 --to n3``, asked on n2 (n2's agent forwards it to n3's);
the three flows keep going, H is reported lost; n1 brought back (rebooted: an empty
conntrack table, its address off its uplink) stays fenced off its address until
``convergent failback n1``, which hands n3's entries for n1's address back before the
address moves: the three flows keep going through it too, and a second failback has
nothing to do.

A third guest K opened a stream on n1 and moved to n3 before n1 died: n3 holds that flow
un-NATed, the failover's commit replaces it with the bound entry, and K's stream goes
through the failover too.

Control runs, same steps (asked on n3 itself): without the entry commit the SNAT streams
die (G's and K's); without the address adoption the sessions through n1 die (the one through n3
survives both). The failback (asked on n2, forwarded to n1) has its control in the same
lab (one setup for the module): n1 dies a second time, n3 fails it over again (from what
n1 replicated of the flows it was handed), and ``failback --without entries`` (the address
alone, the old failback) kills the SNAT stream while the sessions through n1 and n3 live.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lab import netns as ns
from orchestrator.lab.etcd import etcd_binary
from orchestrator.lab.flows import FlowResult, demo_config, start_flows, start_snat_stream
from orchestrator.lab.lab import Lab
from orchestrator.lab.migrate import migrate
from orchestrator.lab.plan import switch_pipe_port, switch_sync_port, switch_wan_port
from orchestrator.store import open_store
from tests.conftest import unique

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(etcd_binary() is None, reason="needs etcd (etcd-server)")]
CONVERGENT = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "convergent")
G, H, K = "guest1", "guest2", "guest3"
K_SNAT = f"guest-snat@{K}"  # K's stream: opened on n1 (SNATed there), K moved to n3 since
TTL = 3.0  # the lab's lease_ttl_s


def config(lab: str) -> str:
    return demo_config(3, lab, G) + (
        f'\n[[guests]]\nname = "{H}"\nmacs = ["52:54:00:00:02:02"]\n'
        'addresses = ["10.5.5.202"]\nhome = "n1"\n'
        f'\n[[guests]]\nname = "{K}"\nmacs = ["52:54:00:00:02:03"]\n'
        'addresses = ["10.5.5.203"]\nhome = "n1"\n')


def cli(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([CONVERGENT, *args, "--config", str(lab.config_path)],
                          capture_output=True, text=True, timeout=90)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def view(lab: Lab) -> dict[str, Any]:
    return json.loads(cli(lab, "status", "--cluster", "--json").stdout)


def cut_links(lab: Lab, index: int, up: bool = False) -> None:
    """What pulling the node's cables does: its uplink, pipe and sync ports on the switch."""
    for port in (switch_wan_port(index), switch_pipe_port(index), switch_sync_port(index)):
        ns.ip(lab.names.switch, "link", "set", port, "up" if up else "down")


def uplink_addresses(lab: Lab, node: str) -> set[str]:
    out = json.loads(ns.ip(lab.names.node(node), "-j", "addr", "show", "dev", "xenbr0"))
    return {a["local"] for link in out for a in link["addr_info"] if a["family"] == "inet"}


def uplink_config(lab: Lab, node: str) -> tuple[list[dict[str, Any]], str]:
    """What the operator configured on the node's uplink: its addresses (lifetimes aside)
    and every route through it."""
    out = json.loads(ns.ip(lab.names.node(node), "-4", "-j", "addr", "show", "dev", "xenbr0"))
    addrs = [{k: v for k, v in a.items() if not k.endswith("life_time")}
             for link in out for a in link["addr_info"]]
    return addrs, ns.ip(lab.names.node(node), "-4", "route", "show", "table", "all", "dev",
                        "xenbr0")


async def seconds_until_dead(lab: Lab, node: str, since: float) -> float:
    async with await open_store(lab.topology().agent.store) as store:
        while (await store.liveness(node)).alive:
            assert time.time() - since < TTL + 5, f"{node}'s lease never expired"
            await asyncio.sleep(0.05)
    return time.time() - since


def reboot(lab: Lab, node: str) -> None:
    """What a node that died comes back with: no conntrack entries, its public address not
    on its uplink until its agent says so; its links up again."""
    ns.in_ns(lab.names.node(node), "conntrack", "-F", check=False)
    pub = str(lab.topology().node(node).pub_ip)
    if pub in uplink_addresses(lab, node):
        ns.ip(lab.names.node(node), "addr", "del", f"{pub}/24", "dev", "xenbr0", check=False)
        ns.ip(lab.names.node(node), "addr", "del", f"{pub}/32", "dev", "xenbr0", check=False)
    cut_links(lab, int(node[1:]), up=True)


def kill(lab: Lab, node: str) -> tuple[float, float]:
    """SIGKILL the agent, cut every link; (when, seconds until the store said dead)."""
    killed = time.time()
    lab.kill_agent(node)
    cut_links(lab, int(node[1:]))
    return killed, asyncio.run(seconds_until_dead(lab, node, killed))


def node_death(without: tuple[str, ...] = (), asked_on: str | None = None) -> dict[str, Any]:
    """``asked_on``: the node whose agent the failover commands ask (None: n3's own)."""
    here = ("--node", asked_on) if asked_on else ()
    lab = Lab(unique("fo"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cluster.toml"
        cfg.write_text(config(lab.name))
        t = lab.up(config=cfg, store="etcd")
    try:
        flows = start_flows(lab, t, G, ["n1", "n3"])  # G on n1: its stream is SNATed there
        try:
            k_flows = start_snat_stream(lab, t, K, 7002)  # so is K's
        except BaseException:
            flows.abort()
            raise
        out: dict[str, Any] = {}
        try:
            time.sleep(1.5)
            asyncio.run(migrate(lab, G, "n2"))  # G runs on n2, its n1 SNAT flow stays n1's
            asyncio.run(migrate(lab, K, "n3"))  # K on the survivor: n3 holds it un-NATed
            early = cli(lab, "failover", "--from", "n1", "--to", "n3", *here,
                        check=False)  # n1 alive: refused
            time.sleep(1.0)  # the replicator has told n3 everything n1 holds
            out["n1_uplink_before"] = uplink_config(lab, "n1")
            # the store says n1 is dead within the TTL of its last heartbeat, and status too
            killed, dead_after = kill(lab, "n1")
            assert view(lab)["nodes"]["n1"]["alive"] is False
            report = json.loads(cli(lab, "failover", "--from", "n1", "--to", "n3", "--json",
                                    *here, *[a for w in without for a in ("--without", w)]
                                    ).stdout)
            failed_over = time.time() - killed
            time.sleep(8.0)  # long enough for TCP's backed-off retransmission to get through
            out.update({"early": early, "dead_after": dead_after, "report": report,
                        "failed_over": failed_over, "killed": killed,
                        "forwards": forwards(lab)})
            if not without:
                out.update(comeback(lab))
                out.update(second_death(lab))
        finally:
            results = {r.name: r for f in (flows, k_flows) for r in f.stop(alive_within=2.0)}
        out.update({"flows": results, "gaps": {n: largest_gap_between(
            r, killed, out.get("back_at", time.time())) for n, r in results.items()}})
        if not without:
            out["back_gaps"] = {n: largest_gap_between(r, out["back_at"], out["killed2"])
                                for n, r in results.items()}
        return out
    finally:
        lab.down()


def forwards(lab: Lab) -> list[tuple[str, str, str, str]]:
    """The forward records of the audit log: (action, node, asked on, outcome)."""
    path = Path(str(lab.topology().agent.audit_log).replace("{node}", "*"))
    return [(r["action"], r["node"], r["from_node"], r["outcome"])
            for log in sorted(path.parent.glob(path.name))
            for r in map(json.loads, log.read_text().splitlines())
            if r["action"] in ("forward.send", "forward.serve")]


def largest_gap_between(r: FlowResult, t0: float, t1: float) -> float:
    return max((gap for at, gap in r.gaps if t0 <= at <= t1), default=0.0)


def comeback(lab: Lab) -> dict[str, Any]:
    """n1 returns (rebooted): it sees n3 holding its address and stays off it; then the
    failback, run twice."""
    reboot(lab, "n1")
    lab.start_agent("n1")
    time.sleep(1.0)  # one adoption pass; n3's replicator resyncs with the returned n1
    back: dict[str, Any] = {"n1_after_return": uplink_addresses(lab, "n1"),
                            "n3_after_return": uplink_addresses(lab, "n3"),
                            "public_after_return": view(lab)["public"]["n1"],
                            "dry": json.loads(cli(lab, "failback", "n1", "--dry-run",
                                                  "--json").stdout)}
    back["back_at"] = time.time()
    # asked on n2: its agent forwards it to n1's, which runs the steps
    back["failback"] = json.loads(cli(lab, "failback", "n1", "--json", "--node", "n2").stdout)
    back["back_took"] = time.time() - back["back_at"]
    back.update({"n1_after_failback": uplink_addresses(lab, "n1"),
                 "n1_uplink_after_failback": uplink_config(lab, "n1"),
                 "n3_after_failback": uplink_addresses(lab, "n3"),
                 "public_after_failback": view(lab)["public"]["n1"],
                 "again": cli(lab, "failback", "n1").stdout})
    time.sleep(4.0)  # the flows through n1's address, answered by n1 again
    return back


def second_death(lab: Lab) -> dict[str, Any]:
    """The failback's control: n1 dies again, n3 fails it over again (the flows n1 was
    handed back and replicated), n1 returns, ``failback --without entries``."""
    killed, _ = kill(lab, "n1")
    report = json.loads(cli(lab, "failover", "--from", "n1", "--to", "n3", "--json").stdout)
    time.sleep(8.0)
    reboot(lab, "n1")
    lab.start_agent("n1")
    time.sleep(1.0)
    control_at = time.time()
    control = json.loads(cli(lab, "failback", "n1", "--without", "entries", "--json").stdout)
    time.sleep(5.0)  # the next reply to n1's address meets n1's stack: a reset
    return {"killed2": killed, "report2": report, "control_at": control_at,
            "control": control}


@pytest.fixture(scope="module")
def death() -> dict[str, Any]:
    """One lab for the failover, the failback and the failback's control run."""
    return node_death(asked_on="n2")


def test_node_death_failover_keeps_the_flows_through_it(death: dict[str, Any]) -> None:
    r = death
    # n3's refusal, its line unchanged through n2's agent
    said = r["early"].stderr.splitlines()
    assert r["early"].returncode == 1 and said[0] == "failing over n1 -> n3 through n2 ...", said
    assert len(said) == 2 and said[1].startswith(
        "convergent: failover n1 -> n3: n1 is alive: its lease has"), said
    assert sorted(r["forwards"]) == sorted([
        ("forward.send", "n2", "n2", "refused"), ("forward.serve", "n3", "n2", "refused"),
        ("forward.send", "n2", "n2", "ok"), ("forward.serve", "n3", "n2", "ok")])
    # the lease ends <= TTL after the last keep-alive; etcd's lessor looks every 0.5 s and
    # a loaded 2-core machine (3 etcd members, 3 agents) adds seconds: 5.1 s seen at load 7
    assert r["dead_after"] <= 2 * TTL, f"n1 shown dead {r['dead_after']:.1f} s after the kill"
    rep = r["report"]
    assert rep["lost_guests"] == {H: ["10.5.5.202"]}
    assert rep["committed"] >= 2 and rep["flows_by_guest"].get(G, 0) >= 1
    # K's flow: n3 held it un-NATed (K moved there from n1); the commit replaced it, and
    # the stream went through the failover (its control: without entries it dies)
    assert rep["flows_by_guest"].get(K, 0) >= 1 and rep["replaced"] >= 1, rep
    k = r["flows"][K_SNAT]
    assert k.died_at is None or k.died_at > r["back_at"], (k.error, k.died_at)
    flows = r["flows"]
    for name in ("ssh@n1", "guest-snat", "ssh@n3"):  # alive until the failback's control
        died = flows[name].died_at
        assert died is None or died > r["control_at"], (name, flows[name].error)
    # the worst gap of the three is the outage itself: the lease TTL, then the failover
    assert max(r["gaps"][n] for n in ("ssh@n1", "guest-snat")) < 15_000
    # n1 back: fenced, n3 keeps its address
    assert "192.168.122.11" not in r["n1_after_return"]
    assert "192.168.122.11" in r["n3_after_return"]
    assert r["public_after_return"]["holder"] == "n3"
    print(f"\nnode death: dead after {r['dead_after']:.2f} s, failed over "
          f"{r['failed_over']:.2f} s after the kill ({rep['total_ms']} ms in the agent); "
          f"largest gaps {', '.join(f'{n} {g:.0f} ms' for n, g in sorted(r['gaps'].items()))}")


def test_failback_hands_the_flows_back(death: dict[str, Any]) -> None:
    r = death
    dry, back = r["dry"], r["failback"]
    assert dry["dry_run"] and dry["from"] == "n3" and dry["bindings"] >= 1
    assert back["from"] == "n3" and back["to"] == "n1" and back["skipped_parts"] == []
    assert back["committed"] >= 1 and back["bindings"] >= 1, back
    assert back["flows_by_guest"].get(G, 0) >= 1 and not back["commit_errors"]
    assert back["released"] == ["192.168.122.11"] and back["adopted"] == ["192.168.122.11"]
    assert back["retired"] >= 1
    # ownership of the address back at n1, off n3
    assert r["public_after_failback"]["holder"] == "n1"
    assert "192.168.122.11" in r["n1_after_failback"]
    assert "192.168.122.11" not in r["n3_after_failback"]
    # n1 back as it was: its /24 and its default route (the reboot took them off; its
    # agent had kept their shape in its state dir)
    assert r["n1_uplink_after_failback"] == r["n1_uplink_before"]
    assert "default via" in r["n1_uplink_before"][1]
    assert r["again"].startswith("nothing to do: n1 holds its address")
    # the three flows went through the failback with no reset; its gap, measured
    flows = r["flows"]
    for name in ("ssh@n1", "guest-snat", "ssh@n3"):
        died = flows[name].died_at
        assert died is None or died > r["control_at"], (name, flows[name].error)
        assert r["back_gaps"][name] < 2_000, (name, r["back_gaps"])
    print(f"\nfailback: {back['total_ms']} ms in the agent ({back['steps_ms']}), "
          f"{r['back_took']:.2f} s for the command; {back['committed']} entries handed "
          f"back; largest gaps {', '.join(f'{n} {g:.0f} ms' for n, g in sorted(r['back_gaps'].items()))}")


def test_control_failback_without_entries_kills_the_snat_stream(
        death: dict[str, Any]) -> None:
    r = death
    assert r["report2"]["committed"] >= 1  # n1 had replicated the flows it was handed back
    assert r["control"]["skipped_parts"] == ["entries"] and r["control"]["committed"] == 0
    flows = r["flows"]
    snat = flows["guest-snat"]
    assert not snat.survived and snat.died_at is not None and snat.died_at > r["control_at"], (
        snat.error, snat.died_at, r["control_at"])
    assert flows["ssh@n1"].survived and flows["ssh@n3"].survived


@pytest.mark.parametrize(("without", "dies", "lives"), [
    ("entries", {"guest-snat", K_SNAT}, {"ssh@n1", "ssh@n3"}),
    ("address", {"ssh@n1", "guest-snat", K_SNAT}, {"ssh@n3"}),
])
def test_control_each_part_of_failover_matters(without: str, dies: set[str],
                                               lives: set[str]) -> None:
    r = node_death((without,))
    assert r["forwards"] == []  # asked on n3 itself
    flows = r["flows"]
    assert {n for n in dies | lives if not flows[n].survived} == dies, {
        n: (f.survived, f.error) for n, f in flows.items()}
    assert r["report"]["skipped_parts"] == [without]

