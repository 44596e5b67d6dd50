"""What the core needs of a conntrack table: the :class:`Conntrack` protocol and its values.

The migration coordinator, the source side of a handover and the failover commit program
a table only through these methods. :class:`~.table.ConntrackTable` is the kernel's table
of one namespace, :class:`~.fake.FakeConntrack` an in-memory one for unit tests; one
contract suite (``tests/functional/test_conntrack_contract.py``) runs against both.

The methods are synchronous, as the kernel's are (the agent runs them with
``asyncio.to_thread``); a live :class:`Events` stream is read from the event loop.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Final, Literal, Protocol

from orchestrator.errors import NetlinkError
from orchestrator.model.conntrack import Entry, Event, IPAddress, Key

Policy = Literal["update", "replace", "fail"]
POLICIES: Final = ("update", "replace", "fail")
ALL_MARK: Final = 0xFFFFFFFF

ERRNO_TEXT: Final = {
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
    text = ERRNO_TEXT.get(err) or os.strerror(err)
    where = f"netns {netns}" if netns else "current netns"
    return NetlinkError(f"conntrack {action} in {where}: {text} [{errno.errorcode.get(err, err)}]")


def key_of(e: Entry | Key) -> Key:
    return e.key if isinstance(e, Entry) else e


@dataclass(frozen=True, slots=True)
class EntryError:
    """One entry the kernel refused, with the errno it answered."""

    entry: Entry | Key
    errno: int

    @property
    def reason(self) -> str:
        return ERRNO_TEXT.get(self.errno) or os.strerror(self.errno)

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


class Events(Protocol):
    """A live stream of one table's changes, subscribed when it was made. ``wait`` is
    cancel-safe (it consumes nothing); ``take`` and ``read`` hand over what is pending. An
    ``OVERRUN`` in a batch means events were lost: the truth is a fresh dump."""

    overruns: int

    async def wait(self) -> None: ...

    def take(self) -> list[Event | Overrun]: ...

    def read(self, timeout: float | None = None) -> list[Event | Overrun]: ...

    def close(self) -> None: ...


class Conntrack(Protocol):
    """One conntrack table. Entries are found by key (orig tuple, zone); as in the kernel a
    tuple also finds the entry holding it as its reply tuple."""

    def dump(self, addresses: Iterable[str | IPAddress] = (), mark: int | None = None,
             mark_mask: int = ALL_MARK, status: int | None = None,
             status_mask: int | None = None, zone: int | None = None,
             family: int = 0) -> list[Entry]:
        """Entries matching every given filter: naming one of ``addresses`` (any tuple
        position), ``mark & mark_mask == mark``, ``status & status_mask == status``
        (``status_mask`` defaults to ``status``), ``zone``, ``family`` (4 or 6 as AF_*)."""
        ...

    def push(self, entries: Iterable[Entry], policy: Policy = "update") -> PushResult:
        """Create ``entries``. For those that exist: ``update`` changes them in place (the
        entry found keeps its direction), ``replace`` deletes and re-creates those pointing
        the other way and updates the rest, ``fail`` reports EEXIST. An ``update`` whose
        reply tuple is held by another entry is reported as EEXIST."""
        ...

    def push_snat(self, entries: Iterable[Entry]) -> PushResult:
        """Create SNAT entries *with* their binding (a failover: this node un-SNATs the
        replies itself). ``tuple_reply`` is the NATed reply (its destination the NAT address
        and port); the stored entry holds that reply and the SRC_NAT bits. One that exists
        already counts as neither created nor an error (a binding cannot change live)."""
        ...

    def delete(self, entries: Iterable[Entry | Key], missing_ok: bool = True) -> BatchResult:
        ...

    def set_mark(self, entries: Iterable[Entry | Key], mark: int) -> BatchResult: ...

    def set_liberal(self, entries: Iterable[Entry | Key]) -> BatchResult:
        """TCP ``BE_LIBERAL`` in both directions, other flags untouched; non-TCP skipped."""
        ...

    def get(self, entry: Entry | Key) -> Entry | None: ...

    def count(self) -> int: ...

    def flush(self, mark: int | None = None, mark_mask: int = ALL_MARK) -> None: ...

    def events(self, rcvbuf: int = ..., *, addresses: Iterable[str | IPAddress] = ()
               ) -> Events:  # fmt: skip
        """Subscribe now to changes naming ``addresses`` (all when empty)."""
        ...

    def subscribe_and_dump(self, addresses: Iterable[str | IPAddress] = (), **filters: Any
                           ) -> tuple[Events, list[Entry]]:  # fmt: skip
        """Subscribe, then dump: the dump and the stream's events together miss nothing."""
        ...

    def close(self) -> None: ...
