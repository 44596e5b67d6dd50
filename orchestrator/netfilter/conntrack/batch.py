"""The batch pipeline: thousands of pre-built messages per ``send``, errors keyed by index.

No ACK is requested, so the kernel only answers failures, each carrying the failing
message's sequence number (= index in the batch). Netlink delivers to the kernel
synchronously, so once ``send`` returns every error of that chunk is queued on our socket:
a non-blocking drain after each chunk collects them all. Encoding of the next chunk
overlaps the kernel's work on the previous one (a sender thread: ``send`` releases the GIL
while the kernel inserts). Measured in ``bench/conntrack.py``.
"""

from __future__ import annotations

import errno
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

from orchestrator.model.conntrack import Entry, Key
from orchestrator.netfilter import ctnetlink as nl

from .sockets import RECV_BYTES

_T = TypeVar("_T")
CHUNK_BYTES: Final = 64 << 10  # per send: ~320 entries; smaller chunks start the kernel sooner


class BatchRun:
    """Errors and replies of one batch on one socket, keyed by message index (seq - seq0)."""

    def __init__(self, sock: socket.socket, seq0: int, n: int) -> None:
        self.sock, self.seq0, self.n = sock, seq0, n
        self.errors: dict[int, int] = {}
        self.replies: dict[int, Entry] = {}
        self.stats_entries = 0
        self.lost = False
        self._buf = bytearray(RECV_BYTES)

    def run(self, items: Sequence[_T], encode: Callable[[_T, int], bytes],
            chunk_bytes: int = CHUNK_BYTES) -> BatchRun:  # fmt: skip
        """Send one message per item (message i carries seq0 + i)."""
        chunks = _chunks(items, encode, self.seq0, chunk_bytes)
        if len(items) * 200 < 2 * chunk_bytes:  # one or two chunks: no thread worth starting
            for chunk in chunks:
                self.send(chunk)
        else:
            self.send_pipelined(chunks)
        return self

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


def encode_set(e: Entry, seq: int) -> bytes:
    """``set``: the create message without ``NLM_F_CREATE|NLM_F_EXCL`` changes in place."""
    return nl.encode_create(e, seq, flags=0)


def changer(extra: bytes) -> Callable[[Key, int], bytes]:
    """An encoder changing ``extra``'s attributes of the entry found by key."""

    def encode(key: Key, seq: int) -> bytes:
        return nl.encode_change(key, seq, extra)

    return encode
