"""The kernel's conntrack table of one namespace: :class:`ConntrackTable`.

Every operation is a batch of netlink messages on one socket (``batch.py``); dumps receive
beside decoding (``dump.py``); the live stream has its own socket (``events.py``). Sockets
are opened inside the namespace (``sockets.py``), so the caller's thread never moves.
"""

from __future__ import annotations

import errno
import functools
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from ipaddress import ip_address
from typing import Any, TypeVar

from orchestrator.errors import NetlinkError
from orchestrator.model.conntrack import Entry, IPAddress, Key, Proto, TcpFlag
from orchestrator.netfilter import ctnetlink as nl

from . import dump as receive
from .base import (
    ALL_MARK,
    POLICIES,
    AddressMatch,
    BatchResult,
    Conntrack,
    EntryError,
    Policy,
    PushResult,
    key_of,
    netlink_error,
)
from .batch import CHUNK_BYTES, BatchRun, changer, encode_set
from .events import EventStream
from .sockets import EVENTS_RCVBUF, open_socket

_T = TypeVar("_T")
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
    """The conntrack table of one namespace (``None``: the caller's); a :class:`Conntrack`.

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
            self._drop_socket()

    def __enter__(self) -> ConntrackTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = open_socket(self.netns)
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _seqs(self, n: int) -> int:
        """First of ``n`` consecutive sequence numbers (kept below 2**31: no wrap inside)."""
        if self._next_seq + n >= 1 << 31:
            self._next_seq = 1
        seq0 = self._next_seq
        self._next_seq += n + 1
        return seq0

    def _error(self, err: int, action: str) -> NetlinkError:
        return netlink_error(err, action, self.netns)

    def _run(self, items: Sequence[_T], encode: Callable[[_T, int], bytes],
             chunk_bytes: int = CHUNK_BYTES) -> BatchRun:  # fmt: skip
        """One message per item; errors (and GET replies) come back keyed by index."""
        run = BatchRun(self._socket(), self._seqs(len(items)), len(items))
        run.run(items, encode, chunk_bytes)
        if run.lost:
            raise self._error(errno.ENOBUFS, "batch (error reports lost)")
        return run

    def _one(self, message: Callable[[int], bytes], action: str) -> BatchRun:
        run = BatchRun(self._socket(), self._seqs(1), 1)
        run.send(message(run.seq0))
        if run.errors.get(0):
            raise self._error(run.errors[0], action)
        return run

    # --- writes ----------------------------------------------------------------------------

    @_netlink_op("push")
    def push(self, entries: Iterable[Entry], policy: Policy = "update") -> PushResult:
        """Create ``entries`` (``NLM_F_CREATE|NLM_F_EXCL``); those that exist per ``policy``
        (see :meth:`Conntrack.push`)."""
        if policy not in POLICIES:
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

    @_netlink_op("push")
    def push_snat(self, entries: Iterable[Entry]) -> PushResult:
        """Create SNAT entries with their binding (``reply.dst`` is the NAT address). One
        that exists already is left as it is (``EEXIST`` counts as unchanged): a binding
        cannot be changed on a live entry."""
        items = list(entries)
        result = PushResult()
        with self._lock:
            run = self._run(items, nl.encode_create_snat)
        result.errors += [EntryError(items[i], err) for i, err in run.errors.items()
                          if err != errno.EEXIST]
        result.created = len(items) - len(run.errors)
        return result

    def _update(self, entries: list[Entry], result: PushResult) -> None:
        run = self._run(entries, encode_set)
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
            run = self._run([key_of(e) for e in given], encode)
        errors = [EntryError(given[i], err) for i, err in run.errors.items() if err != ignore]
        return BatchResult(len(given) - len(errors), errors)

    def set_mark(self, entries: Iterable[Entry | Key], mark: int) -> BatchResult:
        return self._batch(entries, changer(nl.encode_mark(mark)))

    def set_liberal(self, entries: Iterable[Entry | Key]) -> BatchResult:
        """TCP ``BE_LIBERAL`` in both directions, other flags untouched; non-TCP skipped."""
        lib = (int(TcpFlag.BE_LIBERAL), int(TcpFlag.BE_LIBERAL))
        tcp = [e for e in entries if key_of(e)[0].proto == Proto.TCP]
        return self._batch(tcp, changer(nl.encode_tcp_flags(lib, lib)))

    def delete(self, entries: Iterable[Entry | Key], missing_ok: bool = True) -> BatchResult:
        return self._batch(entries, nl.encode_delete, errno.ENOENT if missing_ok else 0)

    @_netlink_op("flush")
    def flush(self, mark: int | None = None, mark_mask: int = ALL_MARK) -> None:
        """Delete every entry (or those whose mark matches) of this namespace."""
        with self._lock:
            self._one(lambda seq: nl.encode_flush(seq, mark, mark_mask), "flush")

    # --- reads -----------------------------------------------------------------------------

    @_netlink_op("get")
    def get(self, entry: Entry | Key) -> Entry | None:
        with self._lock:
            run = self._run([key_of(entry)], nl.encode_get)
        if run.errors and run.errors[0] != errno.ENOENT:
            raise self._error(run.errors[0], "get")
        return run.replies.get(0)

    @_netlink_op("count")
    def count(self) -> int:
        """Entries in this namespace's table (``IPCTNL_MSG_CT_GET_STATS``)."""
        with self._lock:
            return self._one(nl.encode_get_stats, "count").stats_entries

    @_netlink_op("dump")
    def dump(
        self,
        addresses: Iterable[str | IPAddress] = (),
        mark: int | None = None,
        mark_mask: int = ALL_MARK,
        status: int | None = None,
        status_mask: int | None = None,
        zone: int | None = None,
        family: int = 0,
    ) -> list[Entry]:
        """Entries matching every given filter, filtered by the kernel.

        ``addresses``: entries naming any of them in any of the four tuple positions. The
        kernel ANDs filter fields, so that is one filtered dump per address and position,
        each a walk of the whole (global) hash table that sends only the matches; or one
        full dump checked here. ``dump.filtered_is_cheaper`` picks by the table size."""
        base = nl.DumpFilter(
            family=family, mark=mark, mark_mask=mark_mask, status=status,
            status_mask=status_mask, zone=zone,
        )  # fmt: skip
        addrs = [ip_address(a) for a in addresses]
        with self._lock:
            size = self.count()
            by_address = bool(addrs) and receive.filtered_is_cheaper(len(addrs), size)
            if by_address:
                entries = self._dump_addresses(base, addrs)
            elif base == nl.DumpFilter(family=family) and size >= receive.HELPER_MIN_ENTRIES:
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

    def _start_dump(self, f: nl.DumpFilter) -> tuple[socket.socket, int]:
        sock = self._socket()
        seq = self._seqs(1)
        sock.send(nl.encode_dump(seq, f))
        return sock, seq

    def _dump(self, f: nl.DumpFilter) -> list[Entry]:
        """One dump: a receiver thread pulls skbs, this thread decodes them."""
        sock, seq = self._start_dump(f)
        return self._finish_in_thread(sock, seq)

    def _finish_in_thread(self, sock: socket.socket, seq: int) -> list[Entry]:
        out: list[Entry] = []
        status = receive.receive_in_thread(sock, seq, out)
        if status > 0:
            raise self._error(status, "dump")
        return out

    def _dump_via_helper(self, f: nl.DumpFilter) -> list[Entry]:
        """A big dump: a helper interpreter runs the ``recv`` loop (the kernel fills skbs on
        one core) and pipes the raw skbs here, where they are decoded on the other. A thread
        needs the GIL back after every 32 KiB ``recv``; measured: 15-25% slower."""
        sock, seq = self._start_dump(f)
        try:
            helper = receive.spawn_helper(sock, seq)
        except OSError:
            return self._finish_in_thread(sock, seq)
        out: list[Entry] = []
        try:
            status = receive.receive_from_helper(helper, seq, out)
        except BaseException:
            self._drop_socket()  # the dump may still be running on it
            raise
        if status == nl.DUMP_MORE:
            self._drop_socket()
            raise NetlinkError(f"conntrack dump in netns {self.netns}: receiver helper failed")
        if status > 0:
            raise self._error(status, "dump")
        return out

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


_held_to_the_protocol: type[Conntrack] = ConntrackTable  # checked by mypy
