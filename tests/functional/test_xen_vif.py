"""hooks/xen-vif wrapping Debian's real vif-bridge, run with libxl's exact argv and
environment in a node namespace against the stand-in xenstore written as libxl writes it.

Each test builds two identical hosts and runs the plain vif-bridge on one and our script
on the other: the bridge port, the vif's link state and the whole xenstore tree must come
out the same, while our script also reaches the agent's socket (the agent's real API
server, with a handler that records) or spools when the agent is absent, hung or refuses.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent.api import ApiServer
from orchestrator.errors import ConvergentError
from orchestrator.hypervisor import EventKind, HookCall
from orchestrator.xen.lab import debian
from orchestrator.xen.lab.netback import NETBACK_MAC
from orchestrator.xen.lab.rig import BE, DEVID, DOMID, IP, MAC, VifRig
from orchestrator.xen.vifcall import parse_vif_call

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scripts() -> Path:
    return debian.scripts_dir()


@pytest.fixture
def make_host(netns: Callable[[str], str], tmp_path: Path,
              scripts: Path) -> Callable[..., VifRig]:
    def make(label: str, ours: bool, conf: dict[str, Any] | None = None) -> VifRig:
        return VifRig.build(netns(f"xn{label}"), netns(f"xg{label}"), tmp_path / label / "root",
                            tmp_path / "bin", (conf or {}) if ours else None)
    return make


class Agent:
    """The agent's real API server on a Unix socket, with a hook.deliver that records."""

    def __init__(self, path: Path, refuse: bool = False) -> None:
        self.path, self.refuse, self.calls = path, refuse, []  # type: list[dict[str, Any]]
        self.loop = asyncio.new_event_loop()
        self.server = ApiServer(path, {"hook.deliver": self.deliver})
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    async def deliver(self, call: dict[str, Any]) -> dict[str, str]:
        if self.refuse:
            raise ConvergentError("not now")
        self.calls.append(call)
        return {"verdict": "allow"}

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path / "run" / "agent-n1.sock")
    yield a
    a.close()


def conf_for(tmp_path: Path, sock: Path, timeout: float = 1.5) -> dict[str, Any]:
    return {"socket": str(sock), "spool_dir": str(tmp_path / "spool"), "timeout_s": timeout,
            "node": "n1", "wrap": "vif-bridge"}


def spooled(tmp_path: Path) -> list[HookCall]:
    files = sorted((tmp_path / "spool").glob("*.call.json"))
    return [HookCall.from_dict(json.loads(f.read_text())) for f in files]


@pytest.mark.parametrize(("name", "online_kind", "offline_name", "offline_kind"), [
    ("guest1", EventKind.STARTED, "guest1", EventKind.STOPPED),
    ("guest1--incoming", EventKind.INCOMING, "guest1--migratedaway", EventKind.GONE),
])
def test_wrapper_does_what_vif_bridge_does_and_tells_the_agent(
        make_host: Callable[..., VifRig], agent: Agent, tmp_path: Path, name: str,
        online_kind: EventKind, offline_name: str, offline_kind: EventKind) -> None:
    plain = make_host("p", ours=False)
    ours = make_host("o", ours=True, conf=conf_for(tmp_path, agent.path))
    for host in (plain, ours):
        host.plug(name)
    before = plain.link()
    assert before["master"] is None

    p_on, o_on = plain.online(), ours.online()
    assert (o_on.returncode, o_on.stdout, o_on.stderr) == (p_on.returncode, p_on.stdout,
                                                           p_on.stderr) == (0, "", "")
    assert ours.link() == plain.link() and plain.link()["master"] == "guestbr0"
    assert plain.link()["address"] == NETBACK_MAC
    assert ours.tree() == plain.tree()
    assert plain.tree()[f"{BE}/hotplug-status"] == "connected"

    (call,) = agent.calls
    got = HookCall.from_dict(call)
    assert got.argv == (ours.script, "online", "type_if=vif")
    assert got.env == {"script": ours.script, "XENBUS_TYPE": "vif",
                       "XENBUS_PATH": f"backend/vif/{DOMID}/{DEVID}",
                       "XENBUS_BASE_PATH": "backend", "netdev": "", "vif": f"vif{DOMID}.{DEVID}"}
    assert got.extra["bridge"] == "guestbr0" and got.extra["status"] == "0"
    ev = parse_vif_call(got, "n1")
    assert ev is not None and (ev.kind, ev.guest, ev.macs, [str(a) for a in ev.addresses]) == (
        online_kind, "guest1", (MAC,), [IP])

    for host in (plain, ours):  # what xl migrate does on the source before destroying
        host.dom0.xs_write([(f"/local/domain/{DOMID}/name", offline_name)])
    p_off, o_off = plain.offline(), ours.offline()
    assert (o_off.returncode, o_off.stdout, o_off.stderr) == (p_off.returncode, p_off.stdout,
                                                              p_off.stderr) == (0, "", "")
    assert ours.link() == plain.link() and plain.link()["master"] is None
    assert ours.tree() == plain.tree()
    ev = parse_vif_call(HookCall.from_dict(agent.calls[1]), "n1")
    assert ev is not None and (ev.kind, ev.guest) == (offline_kind, "guest1")
    assert not spooled(tmp_path)


def test_a_failing_wrapped_script_keeps_its_status_and_message(
        make_host: Callable[..., VifRig], agent: Agent, tmp_path: Path) -> None:
    plain = make_host("p", ours=False)
    ours = make_host("o", ours=True, conf=conf_for(tmp_path, agent.path))
    for host in (plain, ours):
        host.plug("guest1", bridge="nobr0")  # vif-bridge: fatal "Could not find bridge ..."
    p_on, o_on = plain.online(), ours.online()
    assert p_on.returncode == 1
    assert (o_on.returncode, o_on.stdout, o_on.stderr) == (p_on.returncode, p_on.stdout,
                                                           p_on.stderr)
    assert ours.tree() == plain.tree()
    assert plain.tree()[f"{BE}/hotplug-status"] == "error"
    assert plain.tree()[f"{BE}/hotplug-error"] == "Could not find bridge device nobr0"
    assert ours.link() == plain.link() and plain.link()["master"] is None
    (call,) = agent.calls  # told, with the status: an online that failed means nothing
    got = HookCall.from_dict(call)
    assert got.extra["status"] == "1" and parse_vif_call(got, "n1") is None


def test_any_wrapped_scripts_output_and_status_pass_through(
        make_host: Callable[..., VifRig], agent: Agent, tmp_path: Path) -> None:
    ours = make_host("o", ours=True, conf={**conf_for(tmp_path, agent.path),
                                           "wrap": "vif-custom"})
    custom = ours.dom0.scripts_dir / "vif-custom"
    custom.write_text('#!/bin/sh\necho "out: $*"\necho "err: $vif" >&2\nexit 3\n')
    custom.chmod(0o755)
    ours.plug("guest1")
    res = ours.online()
    assert (res.returncode, res.stdout, res.stderr) == (
        3, "out: online type_if=vif\n", f"err: vif{DOMID}.{DEVID}\n")
    assert HookCall.from_dict(agent.calls[0]).extra["status"] == "3"


def test_a_missing_wrapped_script_fails_the_way_hotplug_scripts_do(
        make_host: Callable[..., VifRig], agent: Agent, tmp_path: Path) -> None:
    ours = make_host("o", ours=True, conf={**conf_for(tmp_path, agent.path),
                                           "wrap": "/nonexistent/vif-x"})
    ours.plug("guest1")
    res = ours.online()
    assert res.returncode == 1 and "not executable" in res.stderr
    tree = ours.tree()
    assert tree[f"{BE}/hotplug-status"] == "error"
    assert "cannot run /nonexistent/vif-x" in tree[f"{BE}/hotplug-error"]


def test_agent_absent_the_vif_still_comes_up_and_the_call_is_spooled(
        make_host: Callable[..., VifRig], tmp_path: Path) -> None:
    plain = make_host("p", ours=False)
    ours = make_host("o", ours=True, conf=conf_for(tmp_path, tmp_path / "no-agent.sock"))
    for host in (plain, ours):
        host.plug("guest1--incoming")
    p_on, o_on = plain.online(), ours.online()
    assert (o_on.returncode, o_on.stderr) == (p_on.returncode, p_on.stderr) == (0, "")
    assert ours.link() == plain.link() and ours.link()["master"] == "guestbr0"
    (call,) = spooled(tmp_path)
    ev = parse_vif_call(call, "n1")
    assert ev is not None and (ev.kind, ev.guest) == (EventKind.INCOMING, "guest1")
    assert not list((tmp_path / "spool").glob(".*"))  # no half-written file left


def test_agent_hung_costs_at_most_the_timeout(
        make_host: Callable[..., VifRig], tmp_path: Path) -> None:
    sock_path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(sock_path))
    hung.listen(8)  # accepts (the kernel does), never answers
    try:
        ours = make_host("o", ours=True, conf=conf_for(tmp_path, sock_path, timeout=0.5))
        ours.plug("guest1")
        start = time.monotonic()
        res = ours.online()
        took = time.monotonic() - start
    finally:
        hung.close()
    assert res.returncode == 0 and ours.link()["master"] == "guestbr0"
    assert len(spooled(tmp_path)) == 1
    assert 0.5 <= took < 0.5 + 2.0  # the Debian script itself takes a good part of a second


def test_agent_refusing_the_call_gets_it_spooled(
        make_host: Callable[..., VifRig], tmp_path: Path) -> None:
    refusing = Agent(tmp_path / "run" / "refusing.sock", refuse=True)
    try:
        ours = make_host("o", ours=True, conf=conf_for(tmp_path, refusing.path))
        ours.plug("guest1")
        assert ours.online().returncode == 0
    finally:
        refusing.close()
    (call,) = spooled(tmp_path)
    assert call.argv[1:] == ("online", "type_if=vif")
