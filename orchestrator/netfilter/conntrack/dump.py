"""Receiving a dump beside decoding it.

The kernel fills dump skbs only inside ``recv``, so receiving runs beside decoding: for big
unfiltered tables in a helper interpreter that pipes the raw skbs (no GIL between them),
otherwise in a receiver thread (``recv`` releases the GIL). Decoding uses layouts learned
per message shape (``ctnetlink.learn_layout``) with the cyclic GC paused. Measured in
``bench/conntrack.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Final

from orchestrator.model.conntrack import Entry
from orchestrator.netfilter import ctnetlink as nl

from .sockets import RECV_BYTES

HELPER_MIN_ENTRIES: Final = 20_000  # unfiltered dumps of bigger tables use the helper process
# Cost model for address dumps, measured here (2 cores, 262144 hash buckets): a filtered
# kernel walk costs a fixed part (the buckets) plus a little per entry; a full dump costs
# the kernel's fill and our decoding per entry.
WALK_FIXED_S: Final = 0.013
WALK_PER_ENTRY_S: Final = 0.2e-6
DUMP_PER_ENTRY_S: Final = 5e-6


def filtered_is_cheaper(addresses: int, entries: int) -> bool:
    """Four filtered walks per address, or one full dump? (100k entries: up to 3 addresses;
    1 address: from ~12k entries; the table's own size stands in for the global one.)"""
    walks = 4 * addresses * (WALK_FIXED_S + WALK_PER_ENTRY_S * entries)
    return walks < DUMP_PER_ENTRY_S * entries


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


# --- in a receiver thread ------------------------------------------------------------------


def receive_in_thread(sock: socket.socket, seq: int, out: list[Entry]) -> int:
    """Decode dump ``seq`` from ``sock`` as a receiver thread pulls it; the final status
    (0, or the errno the kernel answered)."""
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


def _read_dump(
    sock: socket.socket, seq: int, out: queue.SimpleQueue[bytes | BaseException | None]
) -> None:
    """Receiver thread: ``recv`` releases the GIL while the kernel fills the next skb."""
    try:
        while True:
            data = sock.recv(RECV_BYTES)
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


# --- in a helper interpreter ---------------------------------------------------------------

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
_FRAME: Final = struct.Struct("=I")


def spawn_helper(sock: socket.socket, seq: int) -> subprocess.Popen[bytes]:
    """The helper receiving dump ``seq`` on ``sock`` (OSError: it could not start)."""
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


def receive_from_helper(proc: subprocess.Popen[bytes], seq: int, out: list[Entry]) -> int:
    """Decode the framed skbs the helper writes, then stop it; ``DUMP_MORE`` if it stopped
    early."""
    assert proc.stdout is not None
    read = proc.stdout.read
    status = nl.DUMP_MORE
    try:
        with _gc_paused():
            while status == nl.DUMP_MORE and len(head := read(4)) == 4:
                (n,) = _FRAME.unpack(head)
                chunk = read(n)
                if len(chunk) != n:
                    break
                status = nl.decode_dump(chunk, n, seq, out)
    finally:
        _stop(proc)
    return status


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
