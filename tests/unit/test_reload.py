"""What a SIGHUP may change in a running agent (pure), and the notify datagrams."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from orchestrator.agent.notify import Notifier
from orchestrator.agent.reload import reload_problems
from orchestrator.config.loader import parse

SEED_TEXT = (Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml").read_text()
OLD = parse(SEED_TEXT)


def changed(find: str, replace: str) -> list[str]:
    assert find in SEED_TEXT
    return reload_problems(OLD, parse(SEED_TEXT.replace(find, replace, 1)), "node1")


def test_unchanged_and_live_changes_are_taken() -> None:
    assert reload_problems(OLD, OLD, "node1") == []
    assert changed('name = "http"\nport = 80', 'name = "http"\nport = 8080') == []
    assert changed('pipes = ["pipe0"]', 'pipes = ["pipe0", "pipe1"]') == []
    assert reload_problems(OLD, parse(SEED_TEXT + "\n[agent]\nreconcile_interval_s = 3\n"),
                           "node1") == []


@pytest.mark.parametrize(("addition", "named"), [
    ('[agent]\npeer_port = 7999\n', "agent.peer_port"),
    ('[agent]\nstore = "sqlite:///tmp/x.db"\n', "agent.store"),
    ('[sync]\nport = 7406\n', "sync.port"),
    ('[sync]\nprecopy = "replicator"\n', "sync.precopy"),
    ('[hypervisor]\nkind = "lab"\n', "hypervisor.kind"),
])
def test_restart_only_settings_are_named(addition: str, named: str) -> None:
    (problem,) = reload_problems(OLD, parse(SEED_TEXT + "\n" + addition), "node1")
    assert problem == f"{named} changed: restart the agent to apply"


def test_peers_marks_node_and_migrations() -> None:
    assert changed("tag = 2", "tag = 3") == [
        "nodes (names, tags, sync_ip or pub_ip: the replicator's and the peer channel's "
        "peers) changed: restart the agent to apply"]
    assert changed("tag_mask = 0xff", "tag_mask = 0xfff") == [
        "cluster.tag_mask changed: restart the agent to apply"]
    assert changed('uplink = "xenbr0"', 'uplink = "br-up"') == [
        "cluster.uplink changed: restart the agent to apply"]
    assert reload_problems(OLD, OLD, "node9") == [
        "nodes: this node 'node9' is no longer in the file"]
    assert reload_problems(OLD, OLD, "node1", ["guest1"]) == [
        "migrations in flight (guest1): reload once they are done"]


def test_notifier_speaks_sd_notify(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_s == 4.0
        assert n.ready("serving node1")
        assert listener.recv(4096).decode().splitlines() == [
            "READY=1", "STATUS=serving node1", f"MAINPID={os.getpid()}"]
        n.reloading()
        reloading = dict(line.split("=") for line in listener.recv(4096).decode().splitlines())
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        n.stopping("bye")
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_notifier_abstract_socket_and_absent() -> None:
    name = f"cvt-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert listener.recv(64) == b"WATCHDOG=1"
    off = Notifier({})
    assert not off.enabled and not off.ready("x") and off.watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}).watchdog_s is None

