"""The lab's stand-in for ``xl``: what libxl does, in libxl's order, on a node whose dom0 is
a network namespace (``xen/lab/dom0.py``) with the stand-in xenstore and Debian's real
hotplug scripts.

    xl create [-p] CONFIG        xl destroy DOMAIN        xl list [-l] [DOMAIN...]
    xl pause|unpause DOMAIN      xl rename DOMAIN NAME    xl domid NAME / domname ID
    xl migrate [-s SSH] [-C CONFIG] [-p] [-e] [-D] [--debug] DOMAIN HOST
    xl migrate-receive [-e] [-d] [-p] [-t] [-T] [-F]

Create: the domain (paused, its xenstore home), then for each vif the xenstore entries
(libxl path, frontend, backend), netback's device, the backend in InitWait, the hotplug
script ``online type_if=vif`` (its failure fails the domain), Connected; then unpause.
Destroy: pause, then per vif the backend closed, netback's device gone, ``offline
type_if=vif``, the entries removed; then the domain's home. Migrate: the handshake of
tools/xl/xl_migrate.c byte for byte over the ``sh -c RUNE`` transport (``exec SSH HOST xl
migrate-receive ...``); the receiver creates ``NAME--incoming`` paused, reads the stream,
then attaches the devices (online before resume), asks permission, renames and unpauses;
the sender renames itself ``NAME--migratedaway`` before GO and destroys its copy after the
receiver's report, or renames back and resumes with no vif call when the report is a
failure.

Environment: ``CONVERGENT_XEN_ROOT`` (the node's dom0 directory), ``CONVERGENT_XEN_NETNS``
(its namespace), ``CONVERGENT_XEN_BIN`` (the stand-in tools), ``CONVERGENT_XEN_GUEST_NETNS``
(the guests' namespaces, ``{name}`` replaced), ``CONVERGENT_XEN_STREAM_S`` (how long the
memory stream takes, default 0.3), ``CONVERGENT_XL_FAULT`` (on a receiver: ``rename`` or
``unpause`` fails after GO; ``stream`` breaks the stream before the devices are attached),
``CONVERGENT_LAB_KEEP_ARP`` (0: the guest's ARP cache lapses across the move).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from ..names import AWAY_SUFFIX, INCOMING_SUFFIX, split_name, vif_name
from . import netback
from .dom0 import Dom0
from .libxl import (
    XENBUS_CLOSED,
    XENBUS_CONNECTED,
    XENBUS_INITWAIT,
    Domain,
    abs_script,
    domain_make_writes,
    domain_paths,
    nic_add_writes,
    nic_paths,
    nic_remove_writes,
    rename_writes,
)
from .xlcfg import ConfigError, from_json, parse_cfg, to_json

# tools/xl/xl.h; sizeof() of the last three includes their NUL
BANNER = b"xl migration receiver ready, send binary domain data.\n"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"
SAVEFILE_MAGIC = b"Xen saved domain, xl format\n \0 \r"
ERROR_FAIL = 3  # -ERROR_FAIL, what the receiver reports when it could not start


class XlError(Exception):
    """One line for stderr; xl exits 1."""


@dataclass
class Host:
    dom0: Dom0
    guest_netns: str  # with {name}

    @classmethod
    def from_env(cls) -> Host:
        env = os.environ
        try:
            root, netns = env["CONVERGENT_XEN_ROOT"], env["CONVERGENT_XEN_NETNS"]
        except KeyError as exc:
            raise XlError(f"xl stand-in: {exc.args[0]} is not set") from None
        bin_dir = Path(env.get("CONVERGENT_XEN_BIN") or Path(sys.argv[0]).resolve().parent)
        return cls(Dom0(Path(root), netns, bin_dir),
                   env.get("CONVERGENT_XEN_GUEST_NETNS", "{name}"))

    # state ----------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.dom0.root / "var/lib/xen"

    def _hv(self, domid: int) -> Path:
        return self.state_dir / "hv" / f"{domid}.json"

    def domids(self) -> list[int]:
        hv = self.state_dir / "hv"
        return sorted(int(p.stem) for p in hv.glob("*.json")) if hv.is_dir() else []

    def hv_state(self, domid: int) -> dict[str, Any]:
        return dict(json.loads(self._hv(domid).read_text()))

    def set_hv(self, domid: int, **changes: Any) -> None:
        path = self._hv(domid)
        state = json.loads(path.read_text()) if path.exists() else {}
        state.update(changes)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def config(self, domid: int) -> Domain:
        """libxl_retrieve_domain_configuration: the stored config, with the current name."""
        uuid = self.hv_state(domid)["uuid"]
        doc = json.loads((self.state_dir / f"userdata-d.{domid}.{uuid}.libxl-json").read_text())
        name = self.dom0.xs_read(f"/local/domain/{domid}/name") or doc["c_info"]["name"]
        return replace(from_json(doc), name=name)

    def find(self, ident: str) -> int:
        if ident.isdigit() and int(ident) in self.domids():
            return int(ident)
        for domid in self.domids():
            if self.dom0.xs_read(f"/local/domain/{domid}/name") == ident:
                return domid
        raise XlError(f"{ident} is an invalid domain identifier (rc=-6)")

    def guest_ns(self, dom: Domain) -> str:
        return self.guest_netns.replace("{name}", split_name(dom.name)[0])

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".xl.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # domains --------------------------------------------------------------
    def make(self, dom: Domain) -> int:
        """libxl__domain_make: a new domid (per host, increasing), paused, its home."""
        with self.locked():
            counter = self.state_dir / "next-domid"
            domid = int(counter.read_text()) if counter.exists() else 1
            counter.write_text(str(domid + 1))
            self.set_hv(domid, uuid=dom.uuid, paused=True, holds_nic=False,
                        created=time.time())
        doc = to_json(dom)
        (self.state_dir / f"userdata-d.{domid}.{dom.uuid}.libxl-json").write_text(
            json.dumps(doc, indent=4))
        self.dom0.xs_write(domain_make_writes(domid, dom))
        return domid

    def attach(self, domid: int, dom: Domain, take_from: dict[str, Any] | None = None) -> None:
        """Each vif in libxl's order; ``take_from``: the source's namespace and old vif
        names of a migrating guest (the one veth that plays both vifs)."""
        scripts = str(self.dom0.scripts_dir)
        for nic in dom.nics:
            self.dom0.xs_write(nic_add_writes(domid, nic, scripts))
            be = f"/local/domain/0/backend/vif/{domid}/{nic.devid}"
            vif = vif_name(domid, nic.devid)
            if take_from is not None:
                old = take_from["vifs"][str(nic.devid)]
                cache = netback.neighbours(self.guest_ns(dom), nic.devid) if _keep_arp() else []
                netback.move(take_from["netns"], old, self.dom0.netns, vif)
                netback.restore_neighbours(self.guest_ns(dom), nic.devid, cache)
            else:
                netback.create(self.dom0.netns, vif, self.guest_ns(dom), nic.devid, nic.mac)
            self.set_hv(domid, holds_nic=True)
            self.dom0.xs_write([(f"{be}/state", str(XENBUS_INITWAIT))])
            script = abs_script(nic.script, scripts)
            res = self.dom0.hotplug(script, "add", domid, nic.devid,
                                    nic.gatewaydev or "", base_env=os.environ, capture=False)
            if res.returncode != 0:
                why = self.dom0.xs_read(f"{be}/hotplug-error")
                _err(f"libxl: error: libxl_exec.c: {script} online [-1] exited with error "
                     f"status {res.returncode}")
                raise XlError(f"libxl: error: libxl_device.c: device_hotplug_child_death_cb: "
                              f"script: {why or f'{script} failed'}")
            fe = f"/local/domain/{domid}/device/vif/{nic.devid}"
            self.dom0.xs_write([(f"{be}/state", str(XENBUS_CONNECTED)),
                                (f"{fe}/state", str(XENBUS_CONNECTED))])

    def destroy(self, domid: int, give_back: dict[str, Any] | None = None) -> None:
        """libxl__destroy_domid: paused; each vif closed (netback drops its device, or
        hands the veth back to a source resuming), ``offline``, its entries removed; then
        the domain's home."""
        dom = self.config(domid)
        self.pause(domid)
        scripts = str(self.dom0.scripts_dir)
        for nic in dom.nics:
            be = f"/local/domain/0/backend/vif/{domid}/{nic.devid}"
            if self.dom0.xs_read(f"{be}/state") is None:
                continue  # never attached (libxl only removes the devices it finds)
            self.dom0.xs_write(nic_remove_writes(domid, nic.devid))
            vif = vif_name(domid, nic.devid)
            if netback.exists(self.dom0.netns, vif):
                if give_back is not None:
                    old = give_back["vifs"][str(nic.devid)]
                    cache = netback.neighbours(self.guest_ns(dom), nic.devid)
                    netback.move(self.dom0.netns, vif, give_back["netns"], old)
                    netback.reattach(give_back["netns"], old, give_back["bridges"][
                        str(nic.devid)])
                    netback.restore_neighbours(self.guest_ns(dom), nic.devid, cache)
                else:
                    netback.destroy(self.dom0.netns, vif)
            self.dom0.xs_write([(f"{be}/state", str(XENBUS_CLOSED))])
            script = abs_script(nic.script, scripts)
            self.dom0.hotplug(script, "remove", domid, nic.devid, nic.gatewaydev or "",
                              base_env=os.environ, capture=False)
            self.dom0.xs_rm(*nic_paths(domid, nic.devid))
        self.dom0.xs_rm(*domain_paths(domid, dom))
        uuid = self.hv_state(domid)["uuid"]
        (self.state_dir / f"userdata-d.{domid}.{uuid}.libxl-json").unlink(missing_ok=True)
        self._hv(domid).unlink(missing_ok=True)

    def pause(self, domid: int) -> None:
        st = self.hv_state(domid)
        if not st["paused"] and st.get("holds_nic"):
            netback.pause(self.guest_ns(self.config(domid)), self._devids(domid))
        self.set_hv(domid, paused=True)

    def unpause(self, domid: int, announce: bool = False) -> None:
        st = self.hv_state(domid)
        dom = self.config(domid)
        if st["paused"] and st.get("holds_nic"):
            netback.unpause(self.guest_ns(dom))
            if announce:  # xen-netfront on resume: NETDEV_NOTIFY_PEERS, gratuitous ARP
                _gratuitous_arp(self.guest_ns(dom), dom)
        self.set_hv(domid, paused=False)

    def rename(self, domid: int, new: str) -> None:
        self.dom0.xs_write(rename_writes(domid, self.hv_state(domid)["uuid"], new))

    def _devids(self, domid: int) -> list[int]:
        return [n.devid for n in self.config(domid).nics]

    def create(self, dom: Domain, paused: bool) -> int:
        domid = self.make(dom)
        try:
            self.attach(domid, dom)
        except (XlError, netback.NetbackError) as exc:
            _err(str(exc))
            self.destroy(domid)
            raise XlError("libxl: error: libxl_create.c: domcreate_attach_devices: unable "
                          "to add nic devices") from None
        if not paused:
            self.unpause(domid)
        return domid


def _keep_arp() -> bool:
    """A VM keeps its ARP cache across a migration; ``CONVERGENT_LAB_KEEP_ARP=0`` lets it
    lapse as a cache past its time would (a control run: the guest then re-resolves the
    gateway and finds the destination's)."""
    return os.environ.get("CONVERGENT_LAB_KEEP_ARP", "1") != "0"


def _gratuitous_arp(guest_ns: str, dom: Domain) -> None:
    for nic in dom.nics:
        for ip in (nic.ip or "").split():
            if "/" not in ip and ":" not in ip:
                subprocess.Popen(["ip", "netns", "exec", guest_ns, "arping", "-q", "-U",
                                  "-c", "2", "-w", "1", "-I", netback.guest_nic(nic.devid),
                                  ip], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# migration ---------------------------------------------------------------------------------
def _read_exactly(f: IO[bytes], n: int, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise XlError(f"libxl: error: libxl_utils.c: {what}: unexpected end of stream")
        buf += chunk
    return buf


def _expect(f: IO[bytes], msg: bytes, what: str, stream: str) -> None:
    if _read_exactly(f, len(msg), f"{stream} {what}") != msg:
        raise XlError(f"{stream} contained unexpected data instead of {what}")


def _write(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()


def migrate(host: Host, ident: str, target: str, ssh: str, config_file: str | None,
            pause_after: bool, debug: bool, daemonize: bool) -> None:
    domid = host.find(ident)
    dom = host.config(domid)
    common = dom.name
    if config_file:
        try:
            dom = replace(parse_cfg(Path(config_file).read_text(), config_file), name=common,
                          uuid=dom.uuid)
        except (OSError, ConfigError) as exc:
            raise XlError(str(exc)) from None
    if not ssh:
        rune = target
    else:
        rune = (f"exec {ssh} {target} xl migrate-receive{'' if daemonize else ' -e'}"
                f"{' -d' if debug else ''}{' -p' if pause_after else ''}")
    child = subprocess.Popen(["sh", "-c", rune], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    send, recv = child.stdin, child.stdout
    try:
        _expect(recv, BANNER, "banner", "migration receiver stream")
        config = json.dumps(to_json(dom)).encode() + b"\0"
        _write(send, SAVEFILE_MAGIC + struct.pack("=IIII", 0x01020304, 3, 0, len(config))
               + config)
        _err(f"Saving to migration stream new xl format (info 0x3/0x0/{len(config)})")
        _send_memory(host, domid, dom, send)
        _expect(recv, READY, "ready message", "migration receiver stream")
    except (XlError, OSError, ValueError) as exc:
        _err(str(exc))
        send.close()
        _reap(child)
        _err("Migration failed, resuming at sender.")
        host.set_hv(domid, holds_nic=_holds(host, domid, dom))  # given back, if it left
        host.unpause(domid)
        raise SystemExit(1) from None
    _err("migration sender: Target has acknowledged transfer.")
    away = common + AWAY_SUFFIX
    host.rename(domid, away)
    _err("migration sender: Giving target permission to start.")
    try:
        _write(send, GO)
        _expect(recv, REPORT, "success/failure report message", "migration receiver stream")
        rc = _read_exactly(recv, 1, "migration ack stream success/failure status")[0]
    except (XlError, OSError) as exc:
        _err(str(exc))
        _err("** Migration failed during final handshake **\nDomain state is now undefined !")
        raise SystemExit(1) from None
    if rc:
        _err(f"migration sender: Target reports startup failure (status code {rc}).")
        try:
            _expect(recv, GO, "permission for sender to resume", "migration receiver stream")
        except (XlError, OSError) as exc:
            _err(str(exc))
            raise SystemExit(1) from None
        _err("migration sender: Trying to resume at our end.")
        host.rename(domid, common)
        host.set_hv(domid, holds_nic=_holds(host, domid, dom))  # the receiver gave it back
        host.unpause(domid)
        _err("migration sender: Resumed OK.")
        _err("Migration failed due to problems at target.")
        _reap(child)
        raise SystemExit(1)
    _err("migration sender: Target reports successful startup.")
    host.destroy(domid)  # bang!
    _err("Migration successful.")
    _reap(child)


def _holds(host: Host, domid: int, dom: Domain) -> bool:
    return all(netback.exists(host.dom0.netns, vif_name(domid, n.devid)) for n in dom.nics)


def _send_memory(host: Host, domid: int, dom: Domain, send: IO[bytes]) -> None:
    """The live stream, then the suspend: the lab's guest stops where it is."""
    vifs = {str(n.devid): vif_name(domid, n.devid) for n in dom.nics}
    bridges = {str(n.devid): n.bridge for n in dom.nics}
    lab = {"netns": host.dom0.netns, "vifs": vifs, "bridges": bridges, "domid": domid}
    _write(send, b"LAB " + json.dumps(lab).encode() + b"\n")
    total = float(os.environ.get("CONVERGENT_XEN_STREAM_S", "0.3"))
    steps = 5
    for i in range(steps):
        time.sleep(total / steps)
        _write(send, f"MEM {i + 1} {steps}\n".encode())
    host.pause(domid)  # the final iteration runs with the guest suspended
    host.set_hv(domid, holds_nic=False)  # the receiver takes the vif when it attaches
    _write(send, b"END\n")


def migrate_receive(host: Host, pause_after: bool) -> None:
    send, recv = sys.stdout.buffer, sys.stdin.buffer
    _err("migration target: Ready to receive domain.")
    _write(send, BANNER)
    fault = os.environ.get("CONVERGENT_XL_FAULT", "")
    try:
        if _read_exactly(recv, len(SAVEFILE_MAGIC), "savefile magic") != SAVEFILE_MAGIC:
            raise XlError("File has wrong magic number - corrupt or for a different tool?")
        _order, _flags, _opt, length = struct.unpack("=IIII", _read_exactly(recv, 16, "hdr"))
        dom = from_json(json.loads(_read_exactly(recv, length, "config").rstrip(b"\0")))
    except (XlError, ValueError, KeyError) as exc:
        _err(str(exc))
        _err("migration target: Domain creation failed (code -3).")
        raise SystemExit(1) from None
    _err(f"Loading new save file <incoming migration stream> (new xl fmt info "
         f"0x3/0x0/{length})")
    _err(" Savefile contains xl domain config in JSON format")
    _err("Parsing config from <saved>")
    common = dom.name
    incoming = replace(dom, name=common + INCOMING_SUFFIX)
    domid = host.make(incoming)
    lab: dict[str, Any] | None = None
    try:
        lab = _receive_memory(recv, fault)
        host.attach(domid, incoming, take_from=lab)
    except (XlError, netback.NetbackError, ValueError, OSError) as exc:
        _err(str(exc))
        host.destroy(domid, give_back=lab)
        _err("migration target: Domain creation failed (code -3).")
        raise SystemExit(1) from None
    _err("migration target: Transfer complete, requesting permission to start domain.")
    _write(send, READY)
    try:
        _expect(recv, GO, "GO message", "migration stream")
    except XlError as exc:
        _err(str(exc))
        host.destroy(domid, give_back=lab)
        raise SystemExit(1) from None
    _err("migration target: Got permission, starting domain.")
    rc = 0
    if fault == "rename":
        _err(f"libxl: error: libxl_domain.c: domain rename {common}{INCOMING_SUFFIX} -> "
             f"{common} failed (fault injected)")
        rc = ERROR_FAIL
    else:
        host.rename(domid, common)
        if fault == "unpause":
            _err("libxl: error: libxl_domain.c: unpausing domain failed (fault injected)")
            rc = ERROR_FAIL
        elif not pause_after:
            host.unpause(domid, announce=True)
    if rc == 0:
        _err("migration target: Domain started successsfully.")
    _write(send, REPORT + bytes([rc]))
    if rc:
        _err("migration target: Failure, destroying our copy.")
        host.destroy(domid, give_back=lab)
        _err("migration target: Cleanup OK, granting sender permission to resume.")
        _write(send, GO)


def _receive_memory(recv: IO[bytes], fault: str) -> dict[str, Any]:
    lab: dict[str, Any] | None = None
    while True:
        line = recv.readline()
        if not line:
            raise XlError("libxl: error: libxl_stream_read.c: reading record header: "
                          "unexpected end of stream")
        if line.startswith(b"LAB "):
            lab = json.loads(line[4:])
        elif line.startswith(b"MEM "):
            i, n = (int(x) for x in line.split()[1:3])
            _err(f"xc: Frames: {i}/{n} {100 * i // n:4d}%")
            if fault == "stream" and i * 2 >= n:
                raise XlError("libxl: error: libxl_stream_read.c: stream broken (fault "
                              "injected)")
        elif line == b"END\n":
            if lab is None:
                raise XlError("stream without its lab record")
            return lab


def _reap(child: subprocess.Popen[bytes]) -> None:
    try:
        child.wait(timeout=2)
    except subprocess.TimeoutExpired:
        _err(f"migration child [{child.pid}] not exiting, no longer waiting")


# listing -----------------------------------------------------------------------------------
def list_short(host: Host, idents: list[str]) -> str:
    rows = ["Name                                        ID   Mem VCPUs\tState\tTime(s)"]
    if not idents:
        rows.append(f"{'Domain-0':<40}{0:>6}{1024:>6}{2:>6}     r-----{0.0:>10.1f}")
    domids = [host.find(i) for i in idents] if idents else host.domids()
    for domid in domids:
        dom, st = host.config(domid), host.hv_state(domid)
        flags = "--p---" if st["paused"] else "-b----"
        rows.append(f"{dom.name:<40}{domid:>6}{dom.memory_mb:>6}{dom.vcpus:>6}     {flags}"
                    f"{time.time() - st['created']:>10.1f}")
    return "\n".join(rows) + "\n"


def list_long(host: Host, idents: list[str]) -> str:
    domids = [host.find(i) for i in idents] if idents else host.domids()
    doc = []
    for domid in domids:
        d = to_json(host.config(domid))
        doc.append({"domid": domid, "config": d})
    return json.dumps(doc, indent=2) + "\n"


# command line ------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    if not argv:
        _err("Usage xl [-vfNtT] <subcommand> [args]")
        return 1
    cmd, args = argv[0], argv[1:]
    try:
        host = Host.from_env()
        return _run(host, cmd, args)
    except XlError as exc:
        _err(str(exc))
        return 1


def _run(host: Host, cmd: str, args: list[str]) -> int:
    opts, rest = _opts(args)
    if cmd == "create":
        if not rest:
            raise XlError("Usage: xl create [-p] <ConfigFile>")
        try:
            dom = parse_cfg(Path(rest[0]).read_text(), rest[0])
        except (OSError, ConfigError) as exc:
            raise XlError(f"Failed to parse config: {exc}") from None
        _err(f"Parsing config from {rest[0]}")
        host.create(dom, paused="-p" in opts)
    elif cmd in ("destroy", "shutdown"):
        host.destroy(host.find(_one(rest, cmd)))
    elif cmd == "list":
        sys.stdout.write(list_long(host, rest) if "-l" in opts or "--long" in opts
                         else list_short(host, rest))
    elif cmd == "pause":
        host.pause(host.find(_one(rest, cmd)))
    elif cmd == "unpause":
        host.unpause(host.find(_one(rest, cmd)))
    elif cmd == "rename":
        if len(rest) != 2:
            raise XlError("Usage: xl rename <Domain> <NewDomainName>")
        host.rename(host.find(rest[0]), rest[1])
    elif cmd == "domid":
        print(host.find(_one(rest, cmd)))
    elif cmd == "domname":
        print(host.config(host.find(_one(rest, cmd))).name)
    elif cmd == "migrate":
        if len(rest) != 2:
            raise XlError("Usage: xl migrate [options] <Domain> <host>")
        migrate(host, rest[0], rest[1], str(opts.get("-s", "ssh")), _opt_str(opts.get("-C")),
                "-p" in opts, "--debug" in opts, "-e" not in opts)
    elif cmd == "migrate-receive":
        migrate_receive(host, "-p" in opts)
    else:
        raise XlError(f"xl: unknown subcommand '{cmd}'")
    return 0


_WITH_VALUE = {"-s", "-C"}


def _opts(args: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a in _WITH_VALUE:
            opts[a] = next(it, "")
        elif a.startswith("-") and len(a) > 1 and not rest:
            opts[a] = True
        else:
            rest.append(a)
    return opts, rest


def _opt_str(v: str | bool | None) -> str | None:
    return v if isinstance(v, str) and v else None


def _one(rest: list[str], cmd: str) -> str:
    if len(rest) != 1:
        raise XlError(f"Usage: xl {cmd} <Domain>")
    return rest[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
