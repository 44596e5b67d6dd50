"""The agent as a systemd service, against a real agent in a lab: the notify protocol on a
socket this test listens on (as systemd does), SIGHUP reloads (a bad file refused, the old
one kept; a good one applied to the kernel), and start/stop/reload audit records."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agent.client import acall
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from tests.conftest import running_lab

pytestmark = pytest.mark.root


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: one datagram per sd_notify call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def next(self, timeout: float = 30) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until(self, key: str, timeout: float = 30) -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout
        while not seen or key not in seen[-1]:
            seen.append(self.next(max(0.1, deadline - time.monotonic())))
        return seen


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from running_lab("svc", 2)


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    s = FakeSystemd(tmp_path / "notify")
    yield s
    s.sock.close()


def audit(lab: Lab, action: str) -> list[dict]:
    records = [json.loads(line) for line in (lab.dir / "audit.log").read_text().splitlines()]
    return [r for r in records if r["action"] == action and r["node"] == "n2"]


def ruleset(lab: Lab) -> str:
    return ns.in_ns(lab.names.node("n2"), "nft", "list", "table", "ip", "convergent")


def test_notify_reload_and_stop(lab: Lab, systemd: FakeSystemd) -> None:
    lab.kill_agent("n2", signal.SIGTERM)
    pid = lab.start_agent("n2", env={"NOTIFY_SOCKET": systemd.path})
    ready = systemd.until("READY")[-1]
    assert ready["READY"] == "1" and ready["MAINPID"] == str(pid)
    assert "serving n2" in ready["STATUS"]
    started = audit(lab, "agent.start")[-1]

    api = lab.topology().agent.socket("n2")
    original = lab.config_path.read_text()
    try:
        # a file that does not parse: refused, the old one serves on
        lab.config_path.write_text(original + "\n[[services]]\nname = 'x'\nport = 'eighty'\n")
        os.kill(pid, signal.SIGHUP)
        reloading, *_, again = systemd.until("READY")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert again["STATUS"].startswith("reload refused: ")
        refused = audit(lab, "agent.reload")[-1]
        assert refused["outcome"] == "failed" and "services[" in refused["detail"]
        assert asyncio.run(acall(api, "status"))["node"] == "n2"  # still serving

        # a setting only a restart can take: refused, named
        lab.config_path.write_text(original.replace("peer_retry_s = 5.0",
                                                    "peer_retry_s = 5.0\npeer_port = 7999"))
        os.kill(pid, signal.SIGHUP)
        assert "agent.peer_port changed: restart" in systemd.until("READY")[-1]["STATUS"]

        # a new published service: applied to the kernel at once
        assert "dport 8443" not in ruleset(lab)
        lab.config_path.write_text(original + "\n[[services]]\nname = 'alt-https'\n"
                                   "port = 8443\nguest = 'guest1'\n")
        os.kill(pid, signal.SIGHUP)
        assert "serving n2" in systemd.until("READY")[-1]["STATUS"]
        assert audit(lab, "agent.reload")[-1]["outcome"] == "ok"
        assert "dport 8443" in ruleset(lab)
    finally:
        lab.config_path.write_text(original)

    os.kill(pid, signal.SIGTERM)
    stopping = systemd.until("STOPPING")[-1]
    assert stopping["STOPPING"] == "1"
    deadline = time.monotonic() + 15
    while lab.agent_pid("n2") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.agent_pid("n2") is None
    stop = audit(lab, "agent.stop")[-1]
    assert stop["detail"] == "signal SIGTERM" and stop["outcome"] == "ok"
    assert stop["time"] > started["time"]
    lab.start_agent("n2")  # the module's lab as it was
