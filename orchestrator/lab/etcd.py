"""Run real etcd members (Debian's ``etcd-server``) for the lab, the tests and the bench.

Clients always reach a member through a Unix socket in the cluster's directory, so the
store URL works from any namespace and nothing listens on a network the test did not
make. Members talk to each other over Unix sockets too (``peer_ips`` absent), or over TCP
on addresses inside the lab's namespaces, so cutting a node's links partitions its member.
Every member is a child process killed by ``stop()``; a killed member keeps its data
directory and ``start(name)`` brings it back as the same member.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from orchestrator.errors import LabError
from orchestrator.lab.netns import exec_argv

PEER_PORT = 2380


def etcd_binary() -> str | None:
    """Debian's etcd-server installs /usr/bin/etcd (also when PATH lacks /usr/bin)."""
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


@dataclass
class Member:
    name: str
    netns: str | None = None
    peer_ip: str | None = None  # None: peers over a Unix socket
    proc: subprocess.Popen[bytes] | None = None

    def client_socket(self, root: Path) -> Path:
        return root / f"{self.name}.sock:0"  # etcd wants host:port; the file is named so

    def peer_url(self) -> str:
        if self.peer_ip:
            return f"http://{self.peer_ip}:{PEER_PORT}"
        return f"unix://{self.name}.peer:0"


@dataclass
class EtcdCluster:
    """``members``: name -> (netns, peer ip), both optional."""

    root: Path
    members: dict[str, Member] = field(default_factory=dict)
    heartbeat_ms: int = 50
    election_ms: int = 500
    max_txn_ops: int = 128
    # TLS: {"cert", "key", "ca", "client_cert", "client_key"} PEM paths (the members' own,
    # their CA, a client's for the health check); members then require client certs
    tls: dict[str, str] | None = None

    @classmethod
    def create(cls, names: Sequence[str], root: Path | None = None,
               places: Mapping[str, tuple[str | None, str | None]] | None = None,
               **tuning: Any) -> EtcdCluster:
        # Unix socket paths are limited to 108 bytes: keep the directory short
        root = root or Path(tempfile.mkdtemp(prefix="cvt-etcd-", dir="/tmp"))
        root.mkdir(parents=True, exist_ok=True)
        places = places or {}
        members = {n: Member(n, *places.get(n, (None, None))) for n in names}
        return cls(root, members, **tuning)

    # --- URLs -------------------------------------------------------------------------
    def url(self, prefix: str = "/convergent", only: Sequence[str] | None = None,
            **options: str | int | float) -> str:
        names = only or list(self.members)
        hosts = ",".join(quote(str(self.members[n].client_socket(self.root)), safe="")
                         for n in names)
        query = "&".join(f"{k}={v}" for k, v in options.items())
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{hosts}{prefix}" + (f"?{query}" if query else "")

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url()}" for m in self.members.values())

    # --- processes --------------------------------------------------------------------
    def argv(self, m: Member) -> list[str]:
        binary = etcd_binary()
        if binary is None:
            raise LabError("etcd is not installed (Debian package etcd-server; "
                           "scripts/setup.sh installs it)")
        sock = f"{'unixs' if self.tls else 'unix'}://{m.client_socket(self.root).name}"
        data = self.root / f"{m.name}.data"
        listen_peer = f"http://{m.peer_ip}:{PEER_PORT}" if m.peer_ip else m.peer_url()
        return [binary, "--name", m.name, "--data-dir", str(data),
                "--listen-client-urls", sock, "--advertise-client-urls", sock,
                "--listen-peer-urls", listen_peer, "--initial-advertise-peer-urls", m.peer_url(),
                "--initial-cluster", self._initial_cluster(),
                "--initial-cluster-token", f"cvt-{self.root.name}",
                "--initial-cluster-state", "existing" if data.exists() else "new",
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_ms),
                "--max-txn-ops", str(self.max_txn_ops),
                "--logger", "zap", "--log-level", "warn", "--log-outputs", "stderr",
                *self._tls_args()]

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]

    def start(self, *names: str) -> None:
        for name in names or tuple(self.members):
            m = self.members[name]
            if self.pid(name) is not None:
                continue
            with contextlib.suppress(FileNotFoundError):
                m.client_socket(self.root).unlink()  # a killed member leaves its socket
            argv = self.argv(m)
            if m.netns:
                argv = exec_argv(m.netns, argv)
            log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
            m.proc = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            self._pidfile(name).write_text(str(m.proc.pid))  # another process may kill it

    def wait_ready(self, *names: str, timeout: float = 20) -> None:
        """Until each member answers a linearizable read (``etcdctl endpoint health``):
        it has joined, and the cluster has a leader."""
        deadline = time.monotonic() + timeout
        for name in names or tuple(self.members):
            m = self.members[name]
            while not self.healthy(name):
                if m.proc is not None and m.proc.poll() is not None:
                    raise LabError(f"etcd member {name} exited with {m.proc.returncode}: "
                                   f"{self.log_tail(name)}")
                if m.proc is None and self.pid(name) is None:
                    raise LabError(f"etcd member {name} is not running: {self.log_tail(name)}")
                if time.monotonic() > deadline:
                    raise LabError(f"etcd member {name} not ready after {timeout:g} s: "
                                   f"{self.log_tail(name)}")
                time.sleep(0.05)

    def healthy(self, name: str) -> bool:
        sock = self.members[name].client_socket(self.root)
        if not sock.exists():
            return False
        ctl = shutil.which("etcdctl") or "/usr/bin/etcdctl"
        tls = []
        if self.tls:
            tls = [f"--cacert={self.tls['ca']}", f"--cert={self.tls['client_cert']}",
                   f"--key={self.tls['client_key']}", "--insecure-skip-tls-verify"]
        scheme = "unixs" if self.tls else "unix"
        proc = subprocess.run([ctl, f"--endpoints={scheme}://{sock}", "--command-timeout=1s",
                               *tls, "endpoint", "health"],
                              env={**os.environ, "ETCDCTL_API": "3"},
                              capture_output=True, timeout=10)
        return proc.returncode == 0

    def log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        return " | ".join(text.strip().splitlines()[-3:])

    def _pidfile(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        """The member's pid while it runs (also one another process started)."""
        m = self.members[name]
        if m.proc is not None:
            return m.proc.pid if m.proc.poll() is None else None
        try:
            pid = int(self._pidfile(name).read_text())
            with open(f"/proc/{pid}/stat") as f:
                return pid if f.read().split()[2] != "Z" else None
        except (OSError, ValueError):
            return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        m, pid = self.members[name], self.pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        if m.proc is not None:
            m.proc.wait(10)
            m.proc = None
        deadline = time.monotonic() + 10
        while self.pid(name) is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    def running(self) -> list[str]:
        return [n for n in self.members if self.pid(n) is not None]

    def stop(self, remove: bool = True) -> None:
        for name in list(self.members):
            self.kill(name)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
