"""Live flows for ``convergent lab demo``: long-lived streams and what happened to each.

:func:`start_flows` opens, for every entry node given, one stream of each inbound kind
(real OpenSSH, websocket client-push and server-push, HTTP/1.1 keep-alive, UDP
request/response) to the node's public address, plus one guest-initiated TCP stream
(SNAT) to the workstation. Every stream carries a line every 50 ms and never reconnects.
:meth:`FlowSet.stop` ends them and judges each: it survived if its connection was never
closed or reset and lines still arrived at the end.

Processes (all spawned inside the lab's namespaces, so ``lab down`` ends them too):
sshd and :mod:`~orchestrator.lab.flow_servers` in the guest; one
:mod:`~orchestrator.lab.flow_client` in the workstation (it drives the ``ssh`` clients and
hosts the echo server of the guest-initiated stream) and one in the guest.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config.schema import Mode, Topology
from orchestrator.errors import LabError
from orchestrator.lab import netns as ns
from orchestrator.lab.lab import Lab
from orchestrator.lab.plan import GUEST_IFACE, default_config

INTERVAL = 0.05
SSH_PORT = 22
WS_PORT = 8765
HTTP_PORT = 8000
UDP_PORT = 9123
SNAT_PORT = 7001  # the workstation's echo server (7000 is the lab's own responder)
INBOUND_KINDS = ("ssh", "ws-client-push", "ws-server-push", "http-keepalive", "udp")
KIND_PORT = {"ssh": SSH_PORT, "ws-client-push": WS_PORT, "ws-server-push": WS_PORT,
             "http-keepalive": HTTP_PORT, "udp": UDP_PORT}
# (service name, port, proto): what demo_config publishes, stateless, to the guest
DEMO_SERVICES = (("ssh", SSH_PORT, "tcp"), ("ws", WS_PORT, "tcp"),
                 ("http-keepalive", HTTP_PORT, "tcp"), ("udp-echo", UDP_PORT, "udp"))
SSHD_PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; it refuses to start without


def demo_config(nodes: int = 3, lab: str = "lab", guest: str = "guest1") -> str:
    """The lab's default cluster plus the stateless services the demo's flows use."""
    parts = [default_config(nodes, lab)]
    for name, port, proto in DEMO_SERVICES:
        parts.append(f'[[services]]\nname = "{name}"\nport = {port}\nproto = "{proto}"\n'
                     f'guest = "{guest}"\nmode = "stateless"\n')
    return "\n".join(parts)


@dataclass
class FlowResult:
    name: str
    kind: str
    entry_node: str
    survived: bool
    max_gap_ms: float
    gaps: list[tuple[float, float]]  # (wall-clock arrival time, ms since the previous line)
    lines_sent: int  # ws-server-push: the lines that arrived (the server's count is unseen)
    lines_received: int
    error: str | None
    died_at: float | None = None  # wall clock: the error, or the last line of a silent death


@dataclass
class Proc:
    pid: int
    log: Path
    result: Path | None = None


class GuestSide(Protocol):
    """Where the guest's end of the flows runs: a guest namespace (the namespace lab), or
    a real VM (the libvirt lab, orchestrator.kvm)."""

    ready_timeout_s: float  # how long every client gets to connect its flows

    def start_servers(self, run_dir: Path) -> tuple[list[Proc], Path]:
        """The guest's OpenSSH and app servers (those to stop at the end) and the client
        key its sshd accepts."""

    def start_client(self, run_dir: Path, spec: dict[str, Any]) -> Proc:
        """The guest-initiated flows' client, inside the guest; it prints ``ready {...}``
        and, stopped with SIGTERM, writes its result to ``Proc.result``."""

    def restore(self, run_dir: Path) -> None:
        """Leave the guest as the flows found it."""


@dataclass
class NamespaceGuest:
    """The namespace lab's guest: its servers are spawned in its namespace, and the lab's
    one-shot responder (on the same ports) is stopped meanwhile."""

    lab: Lab
    guest: str
    responder: list[str] = field(default_factory=list)
    ready_timeout_s: float = 20.0

    @property
    def netns(self) -> str:
        return self.lab.names.guest(self.guest)

    def start_servers(self, run_dir: Path) -> tuple[list[Proc], Path]:
        self.responder = _free_guest_ports(self.lab, self.guest)
        servers = [_start_sshd(self.netns, run_dir), _start_app_servers(self.netns, run_dir)]
        return servers, run_dir / "ssh" / "client_key"

    def start_client(self, run_dir: Path, spec: dict[str, Any]) -> Proc:
        return _start_client(self.netns, run_dir, "guest", spec)

    def restore(self, run_dir: Path) -> None:
        if self.responder:  # leave the lab as we found it: ``lab check`` passes again
            log = run_dir / "responder.log"
            ns.spawn(self.netns, self.responder, log)
            ns.wait_for_line(log, "ready")
            self.responder = []


@dataclass
class FlowSet:
    lab: Lab
    run_dir: Path
    clients: list[Proc]
    servers: list[Proc]
    guest: GuestSide
    started_at: float = field(default_factory=time.time)
    results: list[FlowResult] | None = None

    def stop(self, alive_within: float = 2.0, timeout: float = 10.0) -> list[FlowResult]:
        """End every stream and judge it: alive = no error and a line in ``alive_within``
        seconds before the stop (so stop a few seconds after the last migration)."""
        if self.results is None:
            # one client at a time, the guest's first: the workstation's client hosts the
            # echo server of the guest-initiated stream, and stopping both at once could end
            # that stream while its client still counted it ("closed by the peer")
            judged: dict[int, list[FlowResult]] = {}
            try:
                for proc in reversed(self.clients):
                    _signal(proc.pid, signal.SIGTERM)
                    judged[proc.pid] = _collect(proc, alive_within, timeout)
                self.results = [r for proc in self.clients for r in judged[proc.pid]]
            finally:
                for proc in self.clients:  # a result that never came: stop them anyway
                    _signal(proc.pid, signal.SIGTERM)
                self._stop_servers()
        return self.results

    def abort(self) -> None:
        """Stop everything without judging (a start that failed half-way)."""
        for proc in self.clients:
            _signal(proc.pid, signal.SIGTERM)  # they end their ssh clients on the way out
        self._stop_servers()

    def _stop_servers(self) -> None:
        for proc in self.servers:  # frees the ports for the next start_flows
            _signal(proc.pid, signal.SIGTERM)
        _wait_gone([proc.pid for proc in self.servers])
        self.guest.restore(self.run_dir)


def start_flows(lab: Lab, topology: Topology, guest: str, entry_nodes: Sequence[str],
                side: GuestSide | None = None) -> FlowSet:
    """Open every stream (each inbound kind via each entry node, plus guest-initiated).
    ``side``: where the guest's end runs (default: the guest's namespace)."""
    _require_services(topology, guest)
    home = lab.guest_node(topology, guest)
    if home is None:
        raise LabError(f"guest {guest!r} is on no node")
    inbound = _inbound_specs(topology, entry_nodes)
    run_dir = _new_run_dir(lab)
    side = side or _driver_side(lab, topology, guest) or NamespaceGuest(lab, guest)
    flows = FlowSet(lab, run_dir, [], [], side)
    try:
        servers, key = side.start_servers(run_dir)
        flows.servers += servers
        # half the ready time for each connect (the namespace lab: 10 s, as always)
        connect = {"connect_timeout": side.ready_timeout_s / 2}
        ws_spec = {"flows": inbound, "echo_port": SNAT_PORT, "ssh_key": str(key), **connect}
        flows.clients.append(_start_client(lab.names.workstation, run_dir, "workstation",
                                           ws_spec, "listening"))
        snat = {"name": "guest-snat", "kind": "guest-snat", "entry_node": home,
                "host": str(topology.lab.workstation), "port": SNAT_PORT}
        flows.clients.append(side.start_client(run_dir, client_spec({"flows": [snat],
                                                                    **connect})))
        failed = {k: v for c in flows.clients
                  for k, v in _wait_ready(c, side.ready_timeout_s).items()}
        if failed:
            raise LabError(f"flows failed to start: {failed}")
    except BaseException:
        flows.abort()
        raise
    return flows


def start_snat_stream(lab: Lab, topology: Topology, guest: str, port: int) -> FlowSet:
    """A guest-initiated stream alone (``guest-snat@GUEST``, to the workstation's echo
    server on ``port``): another guest's, beside a :func:`start_flows` set."""
    home = lab.guest_node(topology, guest)
    if home is None:
        raise LabError(f"guest {guest!r} is on no node")
    run_dir = _new_run_dir(lab)
    side = NamespaceGuest(lab, guest)
    flows = FlowSet(lab, run_dir, [], [], side)
    try:
        flows.clients.append(_start_client(lab.names.workstation, run_dir, "workstation",
                                           {"flows": [], "echo_port": port}, "listening"))
        snat = {"name": f"guest-snat@{guest}", "kind": "guest-snat", "entry_node": home,
                "host": str(topology.lab.workstation), "port": port}
        flows.clients.append(side.start_client(run_dir, {"flows": [snat]}))
        failed = _wait_ready(flows.clients[-1], side.ready_timeout_s)
        if failed:
            raise LabError(f"flows failed to start: {failed}")
    except BaseException:
        flows.abort()
        raise
    return flows


def _driver_side(lab: Lab, t: Topology, guest: str) -> GuestSide | None:
    """A lab hypervisor whose guests are VMs says where their end of the flows runs."""
    make = getattr(lab.driver(t), "flow_side", None)
    side: GuestSide | None = make(lab, t, guest) if make is not None else None
    return side


def client_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"interval": INTERVAL, **spec}


# preparation -------------------------------------------------------------------------
def _require_services(t: Topology, guest: str) -> None:
    published = {(s.port, s.target_port, s.proto) for s in t.services
                 if s.guest == guest and s.mode is Mode.STATELESS}
    missing = [n for n, p, proto in DEMO_SERVICES if (p, p, proto) not in published]
    if missing:
        raise LabError(f"the lab does not publish {missing} to {guest} statelessly: "
                       "build it with flows.demo_config()")


def _new_run_dir(lab: Lab) -> Path:
    base = lab.dir / "flows"
    for i in itertools.count(1):
        run_dir = base / f"run{i}"
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            return run_dir
    raise AssertionError("unreachable")


def _inbound_specs(t: Topology, entry_nodes: Sequence[str]) -> list[dict[str, Any]]:
    unknown = [n for n in entry_nodes if n not in {node.name for node in t.nodes}]
    if unknown:
        raise LabError(f"unknown entry nodes: {unknown}")
    specs = []
    for node in map(t.node, entry_nodes):
        for kind in INBOUND_KINDS:
            specs.append({"name": f"{kind}@{node.name}", "kind": kind, "entry_node": node.name,
                          "host": str(node.pub_ip), "port": KIND_PORT[kind]})
    return specs


def _free_guest_ports(lab: Lab, guest: str) -> list[str]:
    """The lab's one-shot responder listens on every published port, the demo's too:
    stop it while the flows run. Returns its arguments, to start it again at stop."""
    demo = {(p, proto) for _, p, proto in DEMO_SERVICES}
    found = [(pid, argv) for pid in _ns_pids(lab.names.guest(guest))
             if (argv := _responder_argv(pid)) and _ports(argv) & demo]
    for pid, _ in found:
        _signal(pid, signal.SIGTERM)
    _wait_gone([pid for pid, _ in found])
    return found[0][1] if found else []


def _responder_argv(pid: int) -> list[str]:
    """The command line of a lab responder process; empty for anything else."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    except OSError:
        return []
    return argv if "orchestrator.lab.responder" in argv else []


def _ports(argv: list[str]) -> set[tuple[int, str]]:
    return {(int(v), k[2:]) for k, v in itertools.pairwise(argv) if k in ("--tcp", "--udp")}


def _ns_pids(netns: str) -> list[int]:
    return [int(p) for p in ns.sh(["ip", "netns", "pids", netns], check=False).split()]


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    """Until none of ``pids`` runs (their ports free), for at most ``timeout`` (a loaded
    machine can take seconds to end an interpreter)."""
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(pid: int) -> bool:
    """Alive and not a zombie (the lab spawns without reaping; a zombie holds no port)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# processes ---------------------------------------------------------------------------
def _start_sshd(g_ns: str, run_dir: Path) -> Proc:
    sshd = shutil.which("sshd", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if sshd is None:
        raise LabError("missing sshd (package openssh-server)")
    config = _ssh_material(run_dir / "ssh")
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log = run_dir / "sshd.log"
    # -D: stays in the foreground (dies with the namespace); -e: logs to the log file
    pid = ns.spawn(g_ns, [os.path.abspath(sshd), "-D", "-e", "-f", str(config)], log)
    ns.wait_for_line(log, "Server listening")
    return Proc(pid, log)


def _ssh_material(d: Path) -> Path:
    """Host key, client key, authorized_keys and an sshd config, all in the lab dir."""
    d.mkdir(mode=0o700)
    for key in ("host_key", "client_key"):
        ns.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"convergent-{key}",
               "-f", str(d / key)])
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"Port {SSH_PORT}", "ListenAddress 0.0.0.0", f"HostKey {d / 'host_key'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
        "PidFile none", "PrintMotd no", "PrintLastLog no", "Subsystem sftp internal-sftp",
        # no keepalives: the harness must see breakage, not have it masked or caused
        "ClientAliveInterval 0", "TCPKeepAlive no", "MaxStartups 64", "LogLevel INFO", "",
    ]))
    return config


def _start_app_servers(g_ns: str, run_dir: Path) -> Proc:
    log = run_dir / "flow-servers.log"
    pid = ns.spawn(g_ns, [sys.executable, "-m", "orchestrator.lab.flow_servers",
                          "--ws", str(WS_PORT), "--http", str(HTTP_PORT),
                          "--udp", str(UDP_PORT), "--interval", str(INTERVAL)], log)
    ns.wait_for_line(log, "ready")
    return Proc(pid, log)


def _start_client(netns: str, run_dir: Path, name: str, spec: dict[str, Any],
                  wait_for: str | None = None) -> Proc:
    spec_path, result = run_dir / f"{name}-spec.json", run_dir / f"{name}-result.json"
    spec_path.write_text(json.dumps(client_spec(spec)))
    log = run_dir / f"{name}-client.log"
    pid = ns.spawn(netns, [sys.executable, "-m", "orchestrator.lab.flow_client",
                           "--spec", str(spec_path), "--result", str(result)], log)
    if wait_for:
        ns.wait_for_line(log, wait_for)
    return Proc(pid, log, result)


def _wait_ready(proc: Proc, timeout: float = 20.0) -> dict[str, str]:
    """The client's connect failures ({} when every stream is up)."""
    ns.wait_for_line(proc.log, "ready ", timeout=timeout)
    line = next(ln for ln in proc.log.read_text().splitlines() if ln.startswith("ready "))
    failed: dict[str, str] = json.loads(line.removeprefix("ready "))
    return failed


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# the hypervisor's part of a move ------------------------------------------------------
# QEMU's announce-self (and Xen's netfront) broadcast a frame from the guest's MAC after a
# move so switches relearn where it is. A bare vif move lacks it: the cluster switch keeps
# the guest's MAC on the source's pipe, and everything entering via another node is lost.
_ANNOUNCE = """
import socket, sys, time
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
rarp = bytes.fromhex("0001080006040003") + mac + bytes(4) + mac + bytes(4)
frame = b"\\xff" * 6 + mac + b"\\x80\\x35" + rarp + bytes(60 - 14 - len(rarp))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[2], 0))
start = time.monotonic()
for at in map(float, sys.argv[3:]):
    time.sleep(max(0.0, start + at - time.monotonic()))
    try:
        s.send(frame)
    except OSError as exc:
        print("lost", at, exc, flush=True)
print("announced", flush=True)
"""
# QEMU's rounds start at 50 ms; later ones cover the lab's ~1 s carrier hiccup
ANNOUNCE_AT = (0.0, 0.05, 0.15, 0.35, 0.75, 1.5)


def announce_guest(lab: Lab, topology: Topology, guest: str) -> None:
    """Broadcast RARP from the guest's MAC (in the background), as a hypervisor does."""
    mac = topology.guest(guest).macs[0]
    argv = [sys.executable, "-c", _ANNOUNCE, mac, GUEST_IFACE, *map(str, ANNOUNCE_AT)]
    ns.spawn(lab.names.guest(guest), argv, lab.dir / "logs" / f"announce-{guest}.log")


# judging -----------------------------------------------------------------------------
def _collect(proc: Proc, alive_within: float, timeout: float) -> list[FlowResult]:
    assert proc.result is not None
    deadline = time.monotonic() + timeout
    while not proc.result.exists():
        if time.monotonic() > deadline:
            tail = proc.log.read_text(errors="replace")[-400:] if proc.log.exists() else ""
            raise LabError(f"flow client wrote no result ({proc.result}): {tail}")
        time.sleep(0.05)
    data = json.loads(proc.result.read_text())
    return [judge(f, data["stopped_at"], alive_within) for f in data["flows"]]


def judge(flow: dict[str, Any], stopped_at: float, alive_within: float) -> FlowResult:
    """A flow survived if nothing ended it and its last line came within ``alive_within``."""
    arrivals: list[float] = flow["arrivals"]
    gaps = [(b, round((b - a) * 1000, 1)) for a, b in itertools.pairwise(arrivals)]
    last = arrivals[-1] if arrivals else flow["connected_at"] or stopped_at
    tail_s = max(0.0, stopped_at - last)
    gaps.append((stopped_at, round(tail_s * 1000, 1)))  # the open gap counts too
    error: str | None = flow["error"]
    silent = tail_s > alive_within
    if error is None and silent:
        error = f"silent: nothing received in the last {tail_s:.1f} s"
    died_at = flow["error_at"] if flow["error"] else (last if silent else None)
    return FlowResult(
        name=flow["name"], kind=flow["kind"], entry_node=flow["entry_node"],
        survived=error is None, max_gap_ms=max(g for _, g in gaps), gaps=gaps,
        lines_sent=flow["sent"], lines_received=flow["received"], error=error,
        died_at=died_at,
    )


# plotting ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    """One move of the tour, for the plot: wall-clock start and end."""

    started: float
    ended: float
    src: str
    dst: str


ALIVE_COLOUR, DEAD_COLOUR = "#1f77b4", "#d62728"
GAP_FLOOR_MS, GAP_CEILING_MS = 10.0, 30_000.0


def plot_gaps(results: Sequence[FlowResult], migrations: Sequence[Migration],
              path: str | Path, title: str = "") -> None:
    """A grid: one row per kind of flow, one column per entry node, so every flow has its
    own line. Each line is the gap before each of the flow's lines arrived (ms, log scale)
    over time, blue while it lives; a flow that died is red and ends at a cross where it
    died. Migrations are grey bands labelled src -> dst."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r.kind for r in results))
    nodes = sorted({r.entry_node for r in results})
    t0 = min([t for r in results for t, _ in r.gaps[:1]] + [m.started for m in migrations]
             or [0.0])
    fig, axes = plt.subplots(len(kinds), len(nodes), sharex=True, sharey=True,
                             squeeze=False, figsize=(4.2 * len(nodes) + 1, 1.45 * len(kinds) + 1.6))
    by_cell = {(r.kind, r.entry_node): r for r in results}
    for row, kind in enumerate(kinds):
        for col, node in enumerate(nodes):
            ax = axes[row, col]
            flow = by_cell.get((kind, node))
            if flow is None:
                ax.set_axis_off()
                continue
            _plot_flow(ax, flow, t0)
            _mark_migrations(ax, migrations, t0, labelled=row == 0)
            if col == 0 or by_cell.get((kind, nodes[col - 1])) is None:
                ax.set_ylabel(f"{kind}\ngap (ms)", fontsize=9)
            if row == 0:
                ax.set_title(f"entering via {node}", fontsize=10, pad=18)
    for col in range(len(nodes)):
        axes[-1, col].set_xlabel("seconds")
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_flow(ax: Any, r: FlowResult, t0: float) -> None:
    gaps = _alive_part(r)
    xs = [t - t0 for t, _ in gaps]
    ys = [min(max(g, GAP_FLOOR_MS), GAP_CEILING_MS) for _, g in gaps]
    colour = ALIVE_COLOUR if r.survived else DEAD_COLOUR
    # a gap spans the time before its arrival: steps drawn backwards show that
    ax.step(xs, ys, where="pre", lw=1.2, color=colour)
    if r.died_at is not None:
        y = ys[-1] if ys else GAP_FLOOR_MS
        ax.plot([r.died_at - t0], [y], "X", ms=12, color=DEAD_COLOUR, markeredgecolor="black",
                zorder=5)
        ax.annotate("died", (r.died_at - t0, y), xytext=(6, 6), textcoords="offset points",
                    fontsize=9, color=DEAD_COLOUR, fontweight="bold")
    ax.set_yscale("log")
    ax.set_ylim(GAP_FLOOR_MS * 0.8, GAP_CEILING_MS)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.text(0.99, 0.92, f"max {r.max_gap_ms:.0f} ms" if r.survived else "dead",
            transform=ax.transAxes, ha="right", va="top", fontsize=8, color=colour)


def _alive_part(r: FlowResult) -> list[tuple[float, float]]:
    """The gaps up to the flow's death (the open gap of a dead flow is not drawn on)."""
    if r.died_at is None:
        return r.gaps
    return [(t, g) for t, g in r.gaps if t <= r.died_at + 1e-6]


def _mark_migrations(ax: Any, migrations: Sequence[Migration], t0: float,
                     labelled: bool) -> None:
    for m in migrations:
        ax.axvspan(m.started - t0, m.ended - t0, color="0.6", alpha=0.35, lw=0)
        if labelled:
            ax.annotate(f"{m.src}\u2192{m.dst}", (m.started - t0, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, 2),
                        textcoords="offset points", fontsize=9, fontweight="bold",
                        ha="center", va="bottom",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "0.5"})
