"""Shared bench plumbing: throwaway namespaces and the processes started in them, always
cleaned up (also on SIGTERM/SIGINT), and small timing helpers."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any


class BenchNamespaces:
    """Uniquely named namespaces (``cvb-<run>-<tag>``) and the processes this run started
    in them; ``close`` (or leaving the ``with``) kills those processes by pid and deletes the
    namespaces, whatever happened."""

    def __init__(self) -> None:
        self.owner = os.getpid()  # a forked child (pyroute2 forks) must not clean up for us
        self.run = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._old: dict[int, Any] = {}

    def __enter__(self) -> BenchNamespaces:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.owner:
            # a forked child inherited this handler: pyroute2 stops its netns child with
            # SIGTERM, and unwinding there would run our ``close`` and delete our namespaces
            os._exit(128 + signum)
        raise SystemExit(128 + signum)  # unwinds through ``finally``/``__exit__``

    def netns(self, tag: str) -> str:
        name = f"cvb-{self.run}-{tag}"
        self.namespaces.append(name)  # first: a signal during ``add`` still cleans it up
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    def veth(self, a: str, b: str, addr_a: str, addr_b: str) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed and up: (dev in a, dev in b)."""
        dev_a, dev_b = f"vb{self.run[:4]}a", f"vb{self.run[:4]}b"
        subprocess.run(
            ["ip", "-n", a, "link", "add", dev_a, "type", "veth", "peer", dev_b, "netns", b],
            check=True,
        )
        for ns, dev, addr in ((a, dev_a, addr_a), (b, dev_b, addr_b)):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        return dev_a, dev_b

    def spawn(
        self, ns: str, cmd: Sequence[str], log: IO[Any] | None = None
    ) -> subprocess.Popen[Any]:
        """A long-running process in ``ns`` (``ip netns exec`` execs it: same pid)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if os.getpid() != self.owner:
            return
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        self.procs.clear()
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.namespaces.clear()


def run_in(ns: str, *cmd: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, **kw
    )


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds) if seconds else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def read_root_sysctl(name: str) -> int | None:
    """Read-only look at a root-namespace sysctl (never written)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError):
        return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_until(ok: Callable[[], bool], deadline: float, what: str, poll: float = 0.02) -> float:
    """Poll ``ok`` every ``poll`` seconds until it holds; the seconds it took. RuntimeError
    naming ``what`` after ``deadline`` seconds."""
    t0 = time.perf_counter()
    while not ok():
        if time.perf_counter() - t0 > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)
    return time.perf_counter() - t0
