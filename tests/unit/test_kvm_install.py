"""``install-hooks --libvirt`` under a scratch root, and the installed hook run as libvirt
runs it (its own shebang, libvirt's three variables, the recorded XML on stdin).

The agent's side here is a socket answering one verdict line, the protocol of
hooks/hookclient.py; tests/functional/test_kvm_e2e.py runs the same hook against real
agents under a real libvirtd."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.cli.install_hooks import HookTarget, installer
from orchestrator.kvm.install import (
    HOOKS_DIR,
    InstallError,
    parse_version,
    uses_qemu_d,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "libvirt"
ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


def target(root: Path, uninstall: bool = False, version: tuple[int, int] | None = (9, 0),
           sock: str = "/run/convergent/agent-n1.sock") -> HookTarget:
    return HookTarget(root, uninstall, "n1", sock, str(root / "spool"),
                      options={"libvirt_version": version})


def run(t: HookTarget) -> list[str]:
    return installer("libvirt")(t).done


def test_versions() -> None:
    assert parse_version("libvirtd (libvirt) 9.0.0\n") == (9, 0)
    assert parse_version("nothing") is None
    assert uses_qemu_d((6, 5)) and uses_qemu_d((9, 0)) and uses_qemu_d(None)
    assert not uses_qemu_d((6, 4))


def test_install_is_a_link_in_qemu_d_and_idempotent(tmp_path: Path) -> None:
    done = run(target(tmp_path))
    hooks = tmp_path / HOOKS_DIR
    link = hooks / "qemu.d" / "convergent"
    assert os.readlink(link) == "../convergent/libvirt-qemu"
    assert os.access(link, os.X_OK) and (hooks / "convergent" / "hookclient.py").exists()
    conf = json.loads((hooks / "convergent" / "hook.json").read_text())
    assert conf == {"socket": "/run/convergent/agent-n1.sock",
                    "spool_dir": str(tmp_path / "spool"), "timeout_s": 1.5, "node": "n1",
                    "verdict_timeout_s": 1.5}
    assert all(line.startswith("installed") for line in done)
    assert all(line.startswith("unchanged") for line in run(target(tmp_path)))
    assert not (hooks / "qemu").exists()


@pytest.mark.parametrize(("store", "verdict_s"), [
    ("sqlite:///tmp/x.db", 1.5),  # SQLite refuses at once
    ("etcd://127.0.0.1:2379/convergent", 6.0),  # etcd's default 5 s, plus a second
    ("etcd://127.0.0.1:2379/convergent?timeout=8", 9.0),
])
def test_migrate_begin_outwaits_the_stores_refusal(tmp_path: Path, store: str,
                                                   verdict_s: float) -> None:
    """A no-quorum "deny" must reach the waiting hook, not time out into spool-and-allow."""
    seed = (Path(__file__).resolve().parents[2] / "examples" / "seed-2node.toml").read_text()
    config = tmp_path / "cluster.toml"
    config.write_text(seed + f'\n[agent]\nstore = "{store}"\n')
    node = tomllib.loads(seed)["nodes"][0]["name"]
    main(["install-hooks", "--libvirt", "--root", str(tmp_path / "r"), "--config", str(config),
          "--node", node])
    conf = json.loads((tmp_path / "r" / HOOKS_DIR / "convergent" / "hook.json").read_text())
    assert (conf["timeout_s"], conf["verdict_timeout_s"]) == (1.5, verdict_s)


def test_an_operators_hook_is_kept_and_reported(tmp_path: Path) -> None:
    hooks = tmp_path / HOOKS_DIR
    hooks.mkdir(parents=True)
    (hooks / "qemu").write_text("#!/bin/sh\nexit 0\n")
    done = run(target(tmp_path))
    assert (hooks / "qemu").read_text() == "#!/bin/sh\nexit 0\n"
    assert any(line.startswith("kept") for line in done)


def test_never_clobbers_a_foreign_file(tmp_path: Path) -> None:
    qd = tmp_path / HOOKS_DIR / "qemu.d"
    qd.mkdir(parents=True)
    (qd / "convergent").write_text("#!/bin/sh\n# someone else's\n")
    with pytest.raises(InstallError, match="is not convergent's: left alone"):
        run(target(tmp_path))
    assert (qd / "convergent").read_text() == "#!/bin/sh\n# someone else's\n"


def test_uninstall_removes_only_its_own(tmp_path: Path) -> None:
    run(target(tmp_path))
    hooks = tmp_path / HOOKS_DIR
    (hooks / "qemu.d" / "other").write_text("#!/bin/sh\n")
    done = installer("libvirt")(target(tmp_path, uninstall=True)).done
    assert any("removed" in d for d in done)
    assert not (hooks / "qemu.d" / "convergent").is_symlink()
    assert not (hooks / "convergent").exists() and (hooks / "qemu.d" / "other").exists()
    again = installer("libvirt")(target(tmp_path, uninstall=True)).done
    assert again == [f"nothing to remove in {hooks}"]


def test_old_libvirt_chains_the_operators_hook_and_gives_it_back(tmp_path: Path) -> None:
    hooks = tmp_path / HOOKS_DIR
    hooks.mkdir(parents=True)
    operator = "#!/bin/sh\necho operator-was-here >&2\n"
    (hooks / "qemu").write_text(operator)
    (hooks / "qemu").chmod(0o755)
    done = run(target(tmp_path, version=(6, 0)))
    assert os.readlink(hooks / "qemu") == "convergent/libvirt-qemu"
    assert (hooks / "convergent" / "qemu.chained").read_text() == operator
    conf = json.loads((hooks / "convergent" / "hook.json").read_text())
    assert conf["chain"] == "/etc/libvirt/hooks/convergent/qemu.chained"
    assert done[0].startswith("moved")
    assert all(d.startswith("unchanged") for d in run(target(tmp_path, version=(6, 0))))
    installer("libvirt")(target(tmp_path, uninstall=True))
    assert (hooks / "qemu").read_text() == operator and not (hooks / "qemu").is_symlink()


# the hook itself -------------------------------------------------------------------
def recorded(name: str, op: str) -> tuple[list[str], str]:
    for line in (DATA / f"{name}.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["source"] == "hook" and r["argv"][1] == op:
            return r["argv"], r["stdin"]
    raise AssertionError(f"no {op} in {name}")


def call_hook(root: Path, argv: list[str], xml: str) -> subprocess.CompletedProcess[bytes]:
    hook = root / HOOKS_DIR / "qemu.d" / "convergent"
    return subprocess.run([str(hook), *argv], input=xml.encode(), capture_output=True,
                          env=ENV, timeout=20)


class Agent:
    """Answers every hook.deliver with one verdict and keeps what it got."""

    def __init__(self, path: Path, verdict: dict[str, str] | None, hang: bool = False):
        self.calls: list[dict[str, object]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.verdict, self.hang = verdict, hang
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    buf += conn.recv(65536)
                self.calls.append(json.loads(buf))
                if self.hang:
                    threading.Event().wait(5)
                    continue
                conn.sendall(json.dumps({"ok": True, "result": self.verdict}).encode() + b"\n")


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    run(target(tmp_path, sock=str(tmp_path / "agent.sock")))
    conf = tmp_path / HOOKS_DIR / "convergent" / "hook.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "timeout_s": 0.5}))
    yield tmp_path


def spooled(root: Path) -> list[dict[str, object]]:
    d = root / "spool"
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.call.json"))] if d.exists() else []


def test_agent_absent_spools_and_allows_silently(installed: Path) -> None:
    argv, xml = recorded("migrate", "migrate")
    p = call_hook(installed, argv, xml)
    assert (p.returncode, p.stdout) == (0, b"")
    (call,) = spooled(installed)
    assert call["hook"] == "libvirt-qemu" and call["argv"][1:] == argv
    assert call["stdin"] == xml and call["env"] == ENV


def test_agent_hung_spools_within_the_timeout(installed: Path) -> None:
    agent = Agent(installed / "agent.sock", None, hang=True)
    argv, xml = recorded("migrate", "migrate")
    p = call_hook(installed, argv, xml)
    assert (p.returncode, p.stdout) == (0, b"") and len(spooled(installed)) == 1
    assert len(agent.calls) == 1


def test_only_migrate_begin_waits_the_verdict_timeout(installed: Path) -> None:
    conf = installed / HOOKS_DIR / "convergent" / "hook.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "verdict_timeout_s": 2.0}))
    Agent(installed / "agent.sock", None, hang=True)
    waited = {}
    for name, op in (("migrate", "migrate"), ("start", "prepare")):
        argv, xml = recorded(name, op)
        t0 = time.monotonic()
        p = call_hook(installed, argv, xml)
        waited[op] = time.monotonic() - t0
        assert (p.returncode, p.stdout) == (0, b""), p
    assert waited["migrate"] >= 2.0 and waited["prepare"] < 1.9, waited  # timeout_s is 0.5
    assert len(spooled(installed)) == 2


def test_deny_at_migrate_begin_vetoes_with_one_line(installed: Path) -> None:
    agent = Agent(installed / "agent.sock", {"verdict": "deny",
                                             "reason": "guest guest1 is unknown\nto the cluster"})
    argv, xml = recorded("veto", "migrate")
    p = call_hook(installed, argv, xml)
    assert p.returncode == 1 and p.stdout == b""
    assert p.stderr == b"convergent: guest guest1 is unknown to the cluster\n"
    assert agent.calls[0]["op"] == "hook.deliver" and not spooled(installed)


def test_deny_anywhere_else_cannot_fail_the_guest(installed: Path) -> None:
    Agent(installed / "agent.sock", {"verdict": "deny", "reason": "no"})
    for op in ("started", "stopped", "prepare"):
        argv, xml = recorded("start" if op != "stopped" else "destroy", op)
        p = call_hook(installed, argv, xml)
        assert (p.returncode, p.stdout, p.stderr) == (0, b"", b""), op


def test_allow_passes_silently(installed: Path) -> None:
    agent = Agent(installed / "agent.sock", {"verdict": "allow", "reason": ""})
    argv, xml = recorded("migrate", "migrate")
    assert call_hook(installed, argv, xml).returncode == 0
    call = agent.calls[0]["args"]["call"]  # type: ignore[index]
    assert call["argv"][0].endswith("qemu.d/convergent") and call["argv"][1:] == argv


def test_a_chained_operator_hook_runs_first_and_keeps_its_say(tmp_path: Path) -> None:
    hooks = tmp_path / HOOKS_DIR
    hooks.mkdir(parents=True)
    (hooks / "qemu").write_text("#!/bin/sh\ncat >/dev/null\necho '<domain/>'\n"
                                "[ \"$2\" = migrate ] && { echo 'operator says no' >&2; exit 3; }\n"
                                "exit 0\n")
    (hooks / "qemu").chmod(0o755)
    run(target(tmp_path, version=(6, 0), sock=str(tmp_path / "agent.sock")))
    conf = hooks / "convergent" / "hook.json"  # where the chained hook is, seen from here
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "timeout_s": 0.5,
                                "chain": str(hooks / "convergent" / "qemu.chained")}))
    argv, xml = recorded("migrate", "migrate")
    p = subprocess.run([str(hooks / "qemu"), *argv], input=xml.encode(), capture_output=True,
                       env=ENV, timeout=20)
    assert (p.returncode, p.stdout, p.stderr) == (3, b"<domain/>\n", b"operator says no\n")
    argv, xml = recorded("start", "started")
    p = subprocess.run([str(hooks / "qemu"), *argv], input=xml.encode(), capture_output=True,
                       env=ENV, timeout=20)
    assert (p.returncode, p.stdout) == (0, b"<domain/>\n") and len(spooled(tmp_path)) == 1
