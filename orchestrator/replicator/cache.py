"""The external cache: what one sender (one stream) has told us, key -> Entry (kept as
the records' validated bytes; objects are built when read).

Every entry carries the *version* of the record that set it: the datagram's seq for an
original, the sender's next seq at rebuild time (``as_of``) for a resend. Seqs here are
unbounded ints (see ``wire.unwrap``), so comparisons never wrap.

The rule that keeps a stale record from overwriting newer state: a record is applied only
if its version is >= the version stored for its key (or for the key's tombstone). The
receiver applies datagrams in seq order, and a record's version is never below its
datagram's seq, so versions only matter for keys a resend moved ahead of the frontier;
tombstones are kept only while they are ahead of it and pruned as it passes.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, ValuesView

from orchestrator.model.conntrack import Entry, Event, EventType, Key

from .wire import EncodeError, Record, WireKey, key_to_wire

Listener = Callable[[Event], None]
_DESTROY = EventType.DESTROY


class Outcome(enum.Enum):
    APPLIED = "applied"
    SUPERSEDED = "superseded"  # a newer version of the key is already here
    DESTROY_UNKNOWN = "destroy_unknown"  # nothing to destroy (harmless)


_APPLIED = Outcome.APPLIED.value


class EntriesView(Mapping[Key, Entry]):
    """Read-only ``Entry.key -> Entry`` over the records kept by wire key; entries are built
    from a record's bytes when first read."""

    def __init__(self, records: dict[WireKey, Record]) -> None:
        self._records = records

    def __getitem__(self, key: Key) -> Entry:
        try:
            return _entry(self._records[key_to_wire(key)])
        except EncodeError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[Key]:
        return (r.key for r in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def values(self) -> ValuesView[Entry]:
        return _Entries(self._records)


class _Entries(ValuesView[Entry]):
    def __init__(self, records: dict[WireKey, Record]) -> None:
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Entry]:
        return map(_entry, self._records.values())

    def __contains__(self, entry: object) -> bool:
        return any(e == entry for e in self)


def _entry(record: Record) -> Entry:
    entry = record.entry
    assert entry is not None, "the cache holds NEW/UPDATE records only"
    return entry


class ExternalCache:
    """key -> Entry for one sender stream, with per-key versions and ahead-tombstones.
    Kept by wire key (bytes, hashed once) since every record touches these dicts."""

    def __init__(self, listener: Listener | None = None) -> None:
        self._entries: dict[WireKey, Record] = {}
        self._versions: dict[WireKey, int] = {}
        self._tombs: dict[WireKey, int] = {}
        self._listener = listener
        self.entries: Mapping[Key, Entry] = EntriesView(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.entries)

    def version(self, key: WireKey) -> int | None:
        v = self._versions.get(key)
        return self._tombs.get(key) if v is None and self._tombs else v

    def apply(self, record: Record, version: int, frontier: int) -> Outcome:
        """Apply one record of version ``version``; ``frontier`` is the lowest version a
        later record can still have (the seq after the datagram being applied)."""
        key = record.wkey
        stored = self.version(key)
        if stored is not None and version < stored:
            return Outcome.SUPERSEDED
        if record.op != EventType.DESTROY:
            return self._upsert(key, record, version, stored is not None)
        return self._destroy(key, version, frontier)

    def apply_all(self, records: Iterable[Record], version: int, frontier: int,
                  tally: Counter[str]) -> None:  # fmt: skip
        """``apply`` for each record of one datagram, outcomes counted into ``tally``. Upserts
        of keys with no tombstone are done inline: that is nearly every record."""
        entries, versions, get = self._entries, self._versions, self._versions.get
        applied = 0
        for record in records:
            key = record.wkey
            stored = get(key)
            if record.op != _DESTROY and not self._tombs and self._listener is None and (
                stored is None or version >= stored
            ):
                entries[key] = record
                versions[key] = version
                applied += 1
            else:
                tally[self.apply(record, version, frontier).value] += 1
        if applied:
            tally[_APPLIED] += applied

    def _upsert(self, key: WireKey, record: Record, version: int, known: bool) -> Outcome:
        if self._tombs:
            known = self._tombs.pop(key, None) is None and known
        self._entries[key] = record
        self._versions[key] = version
        if self._listener is not None:
            self._listener(Event(EventType.UPDATE if known else EventType.NEW, _entry(record)))
        return Outcome.APPLIED

    def _destroy(self, key: WireKey, version: int, frontier: int) -> Outcome:
        old = self._entries.pop(key, None)
        self._versions.pop(key, None)
        if version > frontier:
            self._tombs[key] = version
        else:
            self._tombs.pop(key, None)
        if old is None:
            return Outcome.DESTROY_UNKNOWN
        if self._listener is not None:
            self._listener(Event(EventType.DESTROY, _entry(old)))
        return Outcome.APPLIED

    def prune(self, frontier: int) -> None:
        """Forget tombstones no later record can be older than."""
        if self._tombs:
            for key in [k for k, v in self._tombs.items() if v <= frontier]:
                del self._tombs[key]

    def sweep(self, begin: int) -> int:
        """End of a resync whose snapshot was taken at seq ``begin``: every key the sender
        still had got a record of version >= begin; drop the rest. Returns how many."""
        gone = [k for k, v in self._versions.items() if v < begin]
        for key in gone:
            self._destroy(key, begin, begin)
        return len(gone)

    def forget_versions(self) -> None:
        """The sender rebooted: its seqs mean nothing any more. Entries stay (a failover may
        still need them) but any new record overrides them and the next resync sweeps them."""
        for key in self._versions:
            self._versions[key] = -1
        self._tombs.clear()
