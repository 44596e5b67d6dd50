"""The conntrack table seam: one network namespace, plain ``Entry`` dataclasses in and out.

Fast paths, measured in ``bench/conntrack.py``:
- batches: thousands of pre-built messages per ``send``; no ACK requested, so the kernel only
  answers failures, each carrying the failing message's sequence number (= index in the batch).
  Netlink delivers to the kernel synchronously, so once ``send`` returns every error of that
  chunk is queued on our socket: a non-blocking drain after each chunk collects them all.
  Encoding of the next chunk overlaps the kernel's work on the previous one (a sender thread:
  ``send`` releases the GIL while the kernel inserts);
- dumps: the kernel fills dump skbs only inside ``recv``, so receiving runs beside decoding:
  for big unfiltered tables in a helper interpreter that pipes the raw skbs (no GIL between
  them), otherwise in a receiver thread (``recv`` releases the GIL). Decoding uses layouts
  learned per message shape (``ctnetlink.learn_layout``) with the cyclic GC paused;
- events: a non-blocking socket on the ctnetlink groups read from the asyncio loop, with a
  large forced receive buffer; an overrun (ENOBUFS) is yielded as ``OVERRUN`` so the caller
  resyncs with a dump.

Sockets are opened inside the namespace by a short-lived thread that ``setns``-es itself: a
socket keeps the namespace it was created in, and the caller's thread never moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

from orchestrator.errors import NetlinkError
from orchestrator.model.conntrack import Entry, Event, IPAddress, Proto, TcpFlag, Tuple
from orchestrator.netfilter import ctnetlink as nl

Key = tuple[Tuple, int]  # (orig tuple, zone): what identifies an entry
_T = TypeVar("_T")
Policy = Literal["update", "replace", "fail"]

_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_CLONE_NEWNET: Final = 0x40000000

CMD_RCVBUF: Final = 16 << 20  # holds every error report of one chunk, and dump skbs
CMD_SNDBUF: Final = 4 << 20  # one send may not exceed the send buffer
EVENTS_RCVBUF: Final = 64 << 20  # ~100k queued events before an overrun
CHUNK_BYTES: Final = 64 << 10  # per send: ~320 entries; smaller chunks start the kernel sooner
DUMP_RECV: Final = 64 << 10  # the kernel fills dump skbs of at most 32 KiB
HELPER_MIN_ENTRIES: Final = 20_000  # unfiltered dumps of bigger tables use the helper process
# Cost model for address dumps, measured here (2 cores, 262144 hash buckets): a filtered
# kernel walk costs a fixed part (the buckets) plus a little per entry; a full dump costs
# the kernel's fill and our decoding per entry.
WALK_FIXED_S: Final = 0.013
WALK_PER_ENTRY_S: Final = 0.2e-6
DUMP_PER_ENTRY_S: Final = 5e-6


def _filtered_is_cheaper(addresses: int, entries: int) -> bool:
    """Four filtered walks per address, or one full dump? (100k entries: up to 3 addresses;
    1 address: from ~12k entries; the table's own size stands in for the global one.)"""
    walks = 4 * addresses * (WALK_FIXED_S + WALK_PER_ENTRY_S * entries)
    return walks < DUMP_PER_ENTRY_S * entries


_ERRNO_TEXT: Final = {
    errno.EEXIST: "entry already exists",
    errno.ENOENT: "no such entry",
    errno.EBUSY: "status refused (needs CONFIRMED; SEEN_REPLY/ASSURED cannot be cleared)",
    errno.EINVAL: "invalid entry (timeout, both tuples and status are required)",
    errno.EOPNOTSUPP: "not supported (NAT attributes only at creation?)",
    errno.ENOMEM: "conntrack table full (nf_conntrack_max) or out of memory",
    errno.ENOSPC: "no space (labels need a ruleset using ct label)",
    errno.EPERM: "permission denied (needs CAP_NET_ADMIN in the namespace)",
    errno.ENOBUFS: "netlink receive buffer overrun",
    errno.EAFNOSUPPORT: "address family not supported",
}


def netlink_error(err: int, action: str, netns: str | None) -> NetlinkError:
    """errno -> readable error, in one place."""
    text = _ERRNO_TEXT.get(err) or os.strerror(err)
    where = f"netns {netns}" if netns else "current netns"
    return NetlinkError(f"conntrack {action} in {where}: {text} [{errno.errorcode.get(err, err)}]")


@dataclass(frozen=True, slots=True)
class EntryError:
    """One entry the kernel refused, with the errno it answered."""

    entry: Entry | Key
    errno: int

    @property
    def reason(self) -> str:
        return _ERRNO_TEXT.get(self.errno) or os.strerror(self.errno)

    def __str__(self) -> str:
        what = self.entry if isinstance(self.entry, Entry) else self.entry[0]
        return f"{what}: {self.reason}"


@dataclass(slots=True)
class PushResult:
    created: int = 0
    updated: int = 0  # existed, same direction: changed in place (``set``)
    replaced: int = 0  # existed pointing the other way: deleted and created
    errors: list[EntryError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(slots=True)
class BatchResult:
    done: int = 0
    errors: list[EntryError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class Overrun:
    """Yielded by an event stream when the kernel dropped events (ENOBUFS): resync by dump."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OVERRUN"


OVERRUN: Final = Overrun()


class AddressMatch:
    """Does an entry name one of these addresses (any tuple position)? Pre-checked on the int
    inside each address (hashing an ``ipaddress`` object costs ~300 ns), confirmed on the
    objects (an IPv4 and an IPv6 address can share the int)."""

    def __init__(self, addresses: Iterable[str | IPAddress]) -> None:
        self.addresses = frozenset(ip_address(a) for a in addresses)
        self._ints = frozenset(int(a) for a in self.addresses)

    def __call__(self, e: Entry) -> bool:
        o, r, ints = e.tuple_orig, e.tuple_reply, self._ints
        return (
            o.src._ip in ints or o.dst._ip in ints or r.src._ip in ints or r.dst._ip in ints  # type: ignore[union-attr]
        ) and not self.addresses.isdisjoint(e.addresses())

    def __bool__(self) -> bool:
        return bool(self.addresses)


# --- sockets -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(netns: str) -> None:
    """Move the calling thread (only) into ``netns``; sockets it opens stay there."""
    try:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetlinkError(f"network namespace {netns!r} does not exist") from None
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetlinkError(f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a fresh thread that entered ``netns`` (directly when None), so no
    pooled or caller thread ever moves; sockets it opens stay in ``netns``. Its result, or
    its exception raised here."""
    if netns is None:
        return fn(*args)
    box: list[Any] = []

    def run() -> None:
        try:
            enter_netns(netns)
            box.append((True, fn(*args)))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    t = threading.Thread(target=run, name=f"setns-{netns}", daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    result: _T = value
    return result


def _force_buf(sock: socket.socket, force_opt: int, plain_opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.[rw]mem_max
        sock.setsockopt(socket.SOL_SOCKET, plain_opt, size)


def _new_socket(groups: int, rcvbuf: int, sndbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
    try:
        _force_buf(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        _force_buf(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)
        # errors echo only the failing header, not the whole message
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def open_socket(
    netns: str | None, groups: int = 0, rcvbuf: int = CMD_RCVBUF, sndbuf: int = CMD_SNDBUF
) -> socket.socket:
    """A ctnetlink socket living in ``netns`` (the caller's thread does not move)."""
    return in_netns(netns, _new_socket, groups, rcvbuf, sndbuf)


# --- the table -----------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., object])


def _netlink_op(action: str) -> Callable[[_F], _F]:
    """Socket errors leave a public method as a readable ``NetlinkError``."""

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def run(self: ConntrackTable, *args: object, **kwargs: object) -> object:
            try:
                return method(self, *args, **kwargs)
            except NetlinkError:
                raise
            except OSError as exc:
                raise self._error(exc.errno or errno.EIO, action) from exc

        return run  # type: ignore[return-value]

    return wrap


class ConntrackTable:
    """The conntrack table of one namespace (``None``: the caller's).

    Sync methods serve the CLI and benchmarks; in the agent run them with
    ``asyncio.to_thread`` (one operation at a time per table: they share a socket) and use
    ``events()`` for the live stream. Nothing runs in the background between calls."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._lock = threading.RLock()
        self._next_seq = 1

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> ConntrackTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = open_socket(self.netns)
        return self._sock

    def _seqs(self, n: int) -> int:
        """First of ``n`` consecutive sequence numbers (kept below 2**31: no wrap inside)."""
        if self._next_seq + n >= 1 << 31:
            self._next_seq = 1
        seq0 = self._next_seq
        self._next_seq += n + 1
        return seq0

    def _error(self, err: int, action: str) -> NetlinkError:
        return netlink_error(err, action, self.netns)

    # --- batches ---------------------------------------------------------------------------

    def _run(
        self,
        items: Sequence[_T],
        encode: Callable[[_T, int], bytes],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> _BatchRun:
        """Send one message per item; errors (and GET replies) come back keyed by index."""
        run = _BatchRun(self._socket(), self._seqs(len(items)), len(items))
        chunks = _chunks(items, encode, run.seq0, chunk_bytes)
        if len(items) * 200 < 2 * chunk_bytes:  # one or two chunks: no thread worth starting
            for chunk in chunks:
                run.send(chunk)
        else:
            run.send_pipelined(chunks)
        if run.lost:
            raise self._error(errno.ENOBUFS, "batch (error reports lost)")
        return run

    @_netlink_op("push")
    def push(self, entries: Iterable[Entry], policy: Policy = "update") -> PushResult:
        """Create ``entries`` (``NLM_F_CREATE|NLM_F_EXCL``). For those that exist: ``update``
        changes them in place (``set``), ``replace`` deletes and re-creates those pointing the
        other way (reply tuple differs) and updates the rest, ``fail`` reports EEXIST.
        An ``update`` whose reply tuple is held by another entry is reported as EEXIST."""
        if policy not in ("update", "replace", "fail"):
            raise ValueError(f"unknown push policy {policy!r}")
        items = list(entries)
        result = PushResult()
        with self._lock:
            run = self._run(items, nl.encode_create)
            exists = [items[i] for i, err in sorted(run.errors.items()) if err == errno.EEXIST]
            result.errors += [
                EntryError(items[i], err) for i, err in run.errors.items() if err != errno.EEXIST
            ]
            result.created = len(items) - len(run.errors)
            if policy == "fail":
                result.errors += [EntryError(e, errno.EEXIST) for e in exists]
            elif policy == "update":
                self._update(exists, result)
            elif exists:
                self._replace(exists, result)
        return result

    def _update(self, entries: list[Entry], result: PushResult) -> None:
        run = self._run(entries, _encode_set)
        for i, err in run.errors.items():
            # ENOENT: the clash was on our reply tuple, held by an entry pointing elsewhere
            result.errors.append(
                EntryError(entries[i], errno.EEXIST if err == errno.ENOENT else err)
            )
        result.updated += len(entries) - len(run.errors)

    def _replace(self, entries: list[Entry], result: PushResult) -> None:
        """Find who holds our orig or reply tuple; same direction: update, else delete+add."""
        n = len(entries)
        lookups = [(e.tuple_orig, e.zone) for e in entries] + [
            (e.tuple_reply, e.zone) for e in entries
        ]
        found = self._run(lookups, nl.encode_get, chunk_bytes=CHUNK_BYTES // 8).replies
        same, stale, recreate = [], {}, []
        for i, e in enumerate(entries):
            holders = {h.key: h for h in (found.get(i), found.get(n + i)) if h is not None}
            if list(holders) == [e.key] and holders[e.key].tuple_reply == e.tuple_reply:
                same.append(e)
                continue
            stale.update(holders)
            recreate.append(e)
        self._run(list(stale), nl.encode_delete)  # ENOENT: gone meanwhile, fine
        run = self._run(recreate, nl.encode_create)
        result.errors += [EntryError(recreate[i], err) for i, err in run.errors.items()]
        result.replaced += len(recreate) - len(run.errors)
        self._update(same, result)

    @_netlink_op("batch")
    def _batch(
        self, entries: Iterable[Entry | Key], encode: Callable[[Key, int], bytes], ignore: int = 0
    ) -> BatchResult:
        """One message per entry, addressed by key; errors report what the caller passed."""
        given = list(entries)
        with self._lock:
            run = self._run([_key(e) for e in given], encode)
        errors = [EntryError(given[i], err) for i, err in run.errors.items() if err != ignore]
        return BatchResult(len(given) - len(errors), errors)

    def set_mark(self, entries: Iterable[Entry | Key], mark: int) -> BatchResult:
        return self._batch(entries, _changer(nl.encode_mark(mark)))

    def set_timeout(self, entries: Iterable[Entry | Key], timeout: int) -> BatchResult:
        return self._batch(entries, _changer(nl.encode_timeout(timeout)))

    def set_liberal(self, entries: Iterable[Entry | Key]) -> BatchResult:
        """TCP ``BE_LIBERAL`` in both directions, other flags untouched; non-TCP skipped."""
        lib = (int(TcpFlag.BE_LIBERAL), int(TcpFlag.BE_LIBERAL))
        tcp = [e for e in entries if _key(e)[0].proto == Proto.TCP]
        return self._batch(tcp, _changer(nl.encode_tcp_flags(lib, lib)))

    def delete(self, entries: Iterable[Entry | Key], missing_ok: bool = True) -> BatchResult:
        return self._batch(entries, nl.encode_delete, errno.ENOENT if missing_ok else 0)

    @_netlink_op("get")
    def get(self, entry: Entry | Key) -> Entry | None:
        with self._lock:
            run = self._run([_key(entry)], nl.encode_get)
        if run.errors and run.errors[0] != errno.ENOENT:
            raise self._error(run.errors[0], "get")
        return run.replies.get(0)

    @_netlink_op("flush")
    def flush(self, mark: int | None = None, mark_mask: int = 0xFFFFFFFF) -> None:
        """Delete every entry (or those whose mark matches) of this namespace."""
        with self._lock:
            run = _BatchRun(self._socket(), self._seqs(1), 1)
            run.send(nl.encode_flush(run.seq0, mark, mark_mask))
        if run.errors.get(0):
            raise self._error(run.errors[0], "flush")

    @_netlink_op("count")
    def count(self) -> int:
        """Entries in this namespace's table (``IPCTNL_MSG_CT_GET_STATS``)."""
        with self._lock:
            run = _BatchRun(self._socket(), self._seqs(1), 1)
            run.send(nl.encode_get_stats(run.seq0))
        if run.errors.get(0):
            raise self._error(run.errors[0], "count")
        return run.stats_entries

    # --- dumps -----------------------------------------------------------------------------

    @_netlink_op("dump")
    def dump(
        self,
        addresses: Iterable[str | IPAddress] = (),
        mark: int | None = None,
        mark_mask: int = 0xFFFFFFFF,
        status: int | None = None,
        status_mask: int | None = None,
        zone: int | None = None,
        family: int = 0,
    ) -> list[Entry]:
        """Entries matching every given filter, filtered by the kernel.

        ``addresses``: entries naming any of them in any of the four tuple positions. The
        kernel ANDs filter fields, so that is one filtered dump per address and position,
        each a walk of the whole (global) hash table that sends only the matches; or one
        full dump checked here. ``_filtered_is_cheaper`` picks by the table size."""
        base = nl.DumpFilter(
            family=family, mark=mark, mark_mask=mark_mask, status=status,
            status_mask=status_mask, zone=zone,
        )  # fmt: skip
        addrs = [ip_address(a) for a in addresses]
        with self._lock:
            size = self.count()
            by_address = bool(addrs) and _filtered_is_cheaper(len(addrs), size)
            if by_address:
                entries = self._dump_addresses(base, addrs)
            elif base == nl.DumpFilter(family=family) and size >= HELPER_MIN_ENTRIES:
                entries = self._dump_via_helper(base)
            else:
                entries = self._dump(base)
        if addrs and not by_address:
            match = AddressMatch(addrs)
            entries = [e for e in entries if match(e)]
        if zone is not None:  # the kernel cannot filter "zone 0 only"
            entries = [e for e in entries if e.zone == zone]
        return entries

    def _dump_addresses(self, base: nl.DumpFilter, addrs: list[IPAddress]) -> list[Entry]:
        merged: dict[int | Key, Entry] = {}
        for a in addrs:
            fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
            for f in (
                replace(base, family=fam, orig_src=a),
                replace(base, family=fam, orig_dst=a),
                replace(base, family=fam, reply_src=a),
                replace(base, family=fam, reply_dst=a),
            ):
                for e in self._dump(f):
                    merged.setdefault(e.id if e.id is not None else e.key, e)
        return list(merged.values())

    def _dump(self, f: nl.DumpFilter) -> list[Entry]:
        """One dump: a receiver thread pulls skbs (``recv`` releases the GIL while the kernel
        fills the next one), this thread decodes them."""
        sock = self._socket()
        seq = self._seqs(1)
        sock.send(nl.encode_dump(seq, f))
        return self._finish_dump_in_thread(sock, seq)

    def _dump_via_helper(self, f: nl.DumpFilter) -> list[Entry]:
        """A big dump: a helper interpreter runs the ``recv`` loop (the kernel fills skbs on
        one core) and pipes the raw skbs here, where they are decoded on the other. A thread
        needs the GIL back after every 32 KiB ``recv``; measured: 15-25% slower."""
        sock = self._socket()
        seq = self._seqs(1)
        sock.send(nl.encode_dump(seq, f))
        try:
            helper = _spawn_dump_helper(sock, seq)
        except OSError:
            return self._finish_dump_in_thread(sock, seq)
        out: list[Entry] = []
        try:
            status = _decode_from_helper(helper, seq, out)
        except BaseException:
            self._drop_socket()  # the dump may still be running on it
            raise
        finally:
            _stop(helper)
        if status == nl.DUMP_MORE:
            self._drop_socket()
            raise NetlinkError(f"conntrack dump in netns {self.netns}: receiver helper failed")
        if status > 0:
            raise self._error(status, "dump")
        return out

    def _finish_dump_in_thread(self, sock: socket.socket, seq: int) -> list[Entry]:
        out: list[Entry] = []
        status = _collect(sock, seq, out)
        if status > 0:
            raise self._error(status, "dump")
        return out

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- events ----------------------------------------------------------------------------

    def events(
        self,
        rcvbuf: int = EVENTS_RCVBUF,
        groups: int = nl.ALL_CT_GROUPS,
        addresses: Iterable[str | IPAddress] = (),
    ) -> EventStream:
        """A live stream of this namespace's conntrack events, subscribed now (so a dump taken
        after this call misses nothing). ``addresses``: keep only events naming one of them."""
        return EventStream(self.netns, rcvbuf, groups, addresses)

    def subscribe_and_dump(
        self, addresses: Iterable[str | IPAddress] = (), **filters: Any
    ) -> tuple[EventStream, list[Entry]]:
        """Subscribe, then dump (``dump``'s filters): the dump and the stream's events
        together miss no change. The stream keeps only events naming ``addresses``."""
        addrs = list(addresses)
        stream = self.events(addresses=addrs)
        try:
            return stream, self.dump(addrs, **filters)
        except BaseException:
            stream.close()
            raise


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a dump builds ~4 tracked objects per entry: collections triggered by
    the growing heap cost ~40% of decoding. Nothing built here forms cycles. Refcounted so
    concurrent dumps in several threads restore the caller's setting once."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _collect(sock: socket.socket, seq: int, out: list[Entry]) -> int:
    """Decode dump ``seq`` from ``sock`` as a receiver thread pulls it; the final status."""
    chunks: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()
    reader = threading.Thread(target=_read_dump, args=(sock, seq, chunks), daemon=True)
    reader.start()
    status = nl.DUMP_MORE
    try:
        with _gc_paused():
            while (chunk := chunks.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise chunk
                if status == nl.DUMP_MORE:
                    status = nl.decode_dump(chunk, len(chunk), seq, out)
    finally:
        reader.join()
    return status


# The helper's whole program: recv skbs from the inherited socket, write them length-framed
# to stdout, stop after the skb ending the dump (the same test as ``_dump_ends``).
_DUMP_HELPER: Final = """\
import os, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
wseq = int(sys.argv[2])
buf = bytearray(4 + 65536)
view = memoryview(buf)
hdr = struct.Struct("=IHHI")
def ends(n):
    if n >= 256:
        ln, typ, _f, seq = hdr.unpack_from(buf, 4 + n - 20)
        return ln == 20 and typ == 3 and seq == wseq
    off = 4
    while off + 16 <= 4 + n:
        ln, typ, _f, seq = hdr.unpack_from(buf, off)
        if seq == wseq and typ in (2, 3):
            return True
        off += max(16, (ln + 3) & ~3)
    return False
while True:
    n = sock.recv_into(view[4:])
    struct.pack_into("=I", buf, 0, n)
    done = 0
    while done < 4 + n:
        done += os.write(1, view[done : 4 + n])
    if ends(n):
        break
"""
_F_SETPIPE_SZ: Final = 1031


def _spawn_dump_helper(sock: socket.socket, seq: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _DUMP_HELPER, str(sock.fileno()), str(nl.wire_seq(seq))],
        pass_fds=(sock.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    with contextlib.suppress(OSError):  # a bigger pipe: fewer wake-ups (capped by the system)
        fcntl.fcntl(proc.stdout.fileno(), _F_SETPIPE_SZ, 1 << 20)
    return proc


def _decode_from_helper(proc: subprocess.Popen[bytes], seq: int, out: list[Entry]) -> int:
    """Decode the framed skbs the helper writes; ``DUMP_MORE`` if it stopped early."""
    assert proc.stdout is not None
    read = proc.stdout.read
    status = nl.DUMP_MORE
    with _gc_paused():
        while status == nl.DUMP_MORE and len(head := read(4)) == 4:
            (n,) = _FRAME.unpack(head)
            chunk = read(n)
            if len(chunk) != n:
                break
            status = nl.decode_dump(chunk, n, seq, out)
    return status


_FRAME: Final = struct.Struct("=I")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _read_dump(
    sock: socket.socket, seq: int, out: queue.SimpleQueue[bytes | BaseException | None]
) -> None:
    """Receiver thread: ``recv`` releases the GIL while the kernel fills the next skb."""
    try:
        while True:
            data = sock.recv(DUMP_RECV)
            out.put(data)
            if _dump_ends(data, seq):
                break
    except BaseException as exc:
        out.put(exc)
    out.put(None)


def _dump_ends(data: bytes, seq: int) -> bool:
    """Whether this recv ends dump ``seq``. NLMSG_DONE (20 bytes) is always the last message
    of its skb, so only the tail is read; an error (dump refused) comes alone, in a small
    chunk, which is walked."""
    if len(data) < 256:
        return any(
            mseq == seq and mtype in (nl.NLMSG_DONE, nl.NLMSG_ERROR)
            for mtype, _flags, mseq, _a, _b in nl.iter_messages(data)
        )
    mlen, mtype, _flags, mseq, _pid = nl.NLMSG_HDR.unpack_from(data, len(data) - 20)
    return mlen == 20 and mtype == nl.NLMSG_DONE and nl.wire_seq(mseq) == seq


# --- batch plumbing ------------------------------------------------------------------------



class _BatchRun:
    """Errors and replies of one batch on one socket, keyed by message index (seq - seq0)."""

    def __init__(self, sock: socket.socket, seq0: int, n: int) -> None:
        self.sock, self.seq0, self.n = sock, seq0, n
        self.errors: dict[int, int] = {}
        self.replies: dict[int, Entry] = {}
        self.stats_entries = 0
        self.lost = False
        self._buf = bytearray(DUMP_RECV)

    def send(self, chunk: bytes) -> None:
        self.sock.send(chunk)
        self.drain()

    def send_pipelined(self, chunks: Iterator[bytes]) -> None:
        """The caller's thread encodes the next chunk while this sender thread's ``send``
        (GIL released) has the kernel insert the previous one."""
        q: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        failure: list[BaseException] = []

        def sender() -> None:
            try:
                while (chunk := q.get()) is not None:
                    self.send(chunk)
            except BaseException as exc:
                failure.append(exc)
                while q.get() is not None:  # unblock the producer
                    pass

        t = threading.Thread(target=sender, name="ct-batch-sender", daemon=True)
        t.start()
        try:
            for chunk in chunks:
                if failure:
                    break
                q.put(chunk)
        finally:
            q.put(None)
            t.join()
        if failure:
            raise failure[0]

    def drain(self) -> None:
        """Everything the kernel queued for us (it answers synchronously within ``send``)."""
        buf, sock = self._buf, self.sock
        while True:
            try:
                n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.lost = True
                continue
            self._absorb(buf, n)

    def _absorb(self, buf: bytearray, n: int) -> None:
        for mtype, _flags, seq, start, end in nl.iter_messages(buf, n):
            i = seq - self.seq0
            if not 0 <= i < self.n:
                continue  # a late reply of an earlier request
            if mtype == nl.NLMSG_ERROR:
                err = nl.error_code(buf, start)
                if err:
                    self.errors[i] = err
            elif mtype in (nl.MSG_NEW, nl.MSG_GET):
                self.replies[i] = nl.decode_entry(buf, start, end)
            elif mtype == nl.MSG_GET_STATS:
                self.stats_entries = nl.decode_stats_entries(buf, start, end)


def _chunks(
    items: Sequence[_T], encode: Callable[[_T, int], bytes], seq0: int, chunk_bytes: int
) -> Iterator[bytes]:
    """Encoded messages joined into sends of about ``chunk_bytes``."""
    parts: list[bytes] = []
    size = 0
    for i, item in enumerate(items):
        msg = encode(item, seq0 + i)
        parts.append(msg)
        size += len(msg)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def _key(e: Entry | Key) -> Key:
    return e.key if isinstance(e, Entry) else e


def _encode_set(e: Entry, seq: int) -> bytes:
    return nl.encode_create(e, seq, flags=0)


def _changer(extra: bytes) -> Callable[[Key, int], bytes]:
    def encode(key: Key, seq: int) -> bytes:
        return nl.encode_change(key, seq, extra)

    return encode


# --- events --------------------------------------------------------------------------------


class EventStream:
    """Conntrack events of one namespace, as ``Event`` (or ``OVERRUN`` after a loss).

    Subscribed on construction. Async: ``async for ev in stream`` (reads on the running loop,
    never blocks it). Sync: ``read(timeout)``. An overrun does not end the stream: the socket
    keeps delivering, the caller resyncs with a dump and carries on."""

    # what one recv becomes; a subclass may decode to something else (the replicator's
    # ``RecordStream`` goes straight to wire records)
    decode_messages = staticmethod(nl.decode_events)

    def __init__(
        self,
        netns: str | None,
        rcvbuf: int = EVENTS_RCVBUF,
        groups: int = nl.ALL_CT_GROUPS,
        addresses: Iterable[str | IPAddress] = (),
    ) -> None:
        self.netns = netns
        self._sock = open_socket(netns, groups=groups, rcvbuf=rcvbuf)
        self._sock.setblocking(False)
        self._buf = bytearray(DUMP_RECV)
        self._pending: deque[Event | Overrun] = deque()
        self._only = AddressMatch(addresses)
        self.received = 0
        self.overruns = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Event | Overrun]:
        return self

    async def __anext__(self) -> Event | Overrun:
        while not self._pending:
            await self._readable()
            self._read_available()
        return self._pending.popleft()

    async def batches(self) -> AsyncIterator[list[Event | Overrun]]:
        """Everything available per wake-up: cheaper than one await per event."""
        while True:
            if not self._pending:
                await self._readable()
                self._read_available()
            if self._pending:
                batch = list(self._pending)
                self._pending.clear()
                yield batch

    async def wait(self) -> None:
        """Until events are pending. Cancel-safe: consumes nothing (``take`` does)."""
        while not self._pending:
            await self._readable()
            self._read_available()

    def take(self) -> list[Event | Overrun]:
        """What is pending now, without waiting."""
        batch = list(self._pending)
        self._pending.clear()
        return batch

    def read(self, timeout: float | None = None, limit: int = 65536) -> list[Event | Overrun]:
        """Sync: what is available now, waiting up to ``timeout`` for the first message."""
        if not self._pending:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if ready:
                self._read_available(limit)
        batch = list(self._pending)
        self._pending.clear()
        return batch

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self._sock.fileno(), wake)
        try:
            await fut
        finally:
            loop.remove_reader(self._sock.fileno())

    def _read_available(self, limit: int = 8192) -> None:
        """Drain up to ``limit`` datagrams without blocking (bounded: the loop stays fair)."""
        sock, buf = self._sock, self._buf
        got: list[Event] = []
        for _ in range(limit):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._flush(got)
                self.overruns += 1
                self._pending.append(OVERRUN)
                continue
            self.decode_messages(buf, n, got)
        self._flush(got)

    def _flush(self, got: list[Event]) -> None:
        self.received += len(got)
        if self._only:
            only = self._only
            got[:] = [ev for ev in got if only(ev.entry)]
        self._pending.extend(got)
        got.clear()
