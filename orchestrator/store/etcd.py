"""The cluster store on etcd v3 (DESIGN §3), through etcd3aio's gRPC API.

Layout under the URL's prefix P:

    P/meta          written when the store is first opened: its revision is this store's 0
    P/own/<ip>      Ownership JSON. The key's etcd version *is* the epoch: the key is never
                    deleted and every change is one put, so a claim is one transaction
                    comparing versions, and a fencing token can never go back
    P/pub/<node>    PublicAddress JSON, versioned the same way
    P/node/<name>   NodeRecord JSON; P/tag/<tag> holds the name, so tags stay unique
    P/alive/<name>  attached to the node's lease: present while the node is alive;
                    P/lease/<name> keeps the TTL it was granted (to re-grant, and to report)
    P/mig/<id>      MigrationRecord JSON; P/active/<guest> holds the id of its active one
    P/audit/<node>  AuditAnchor JSON: the head of the node's audit chain (not a change)

Revisions are etcd's (global to the cluster); ``watch`` follows the prefix and resumes
from the last event it delivered after any disconnect, trying each member in turn.
Writes carry an operation id, so a transaction whose reply was lost is recognised as
ours when it is retried. One transaction holds at most ``max_txn_ops`` compares and as many
puts (etcd's ``--max-txn-ops``): a claim of more addresses than that is refused, never split.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
import structlog
from etcd3aio import _protobuf as pb

from orchestrator.errors import StoreError
from orchestrator.store.base import (
    Address,
    AuditAnchor,
    Change,
    Compacted,
    Kind,
    Liveness,
    MigrationRecord,
    NodeRecord,
    Ownership,
    Phase,
    PublicAddress,
    Record,
    Snapshot,
    Store,
    anchor_advances,
    check_advance,
    check_epochs,
    check_known_nodes,
    check_migration_start,
    check_public,
    expected_epochs,
    finish_target,
    from_dict,
    guest_after,
    same_migration,
    to_dict,
    to_ip,
    to_phase,
)
from orchestrator.store.etcdurl import EtcdUrl, parse_etcd_url

log = structlog.get_logger("convergent.store.etcd")
T = TypeVar("T")
# etcd answers "no leader", "request timed out" and "leader changed" as UNAVAILABLE
# and a request that outlived its deadline inside a member without quorum as UNKNOWN
# "context deadline exceeded"
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# on a TLS URL these mean the member refused our handshake; a member that is down says
# "Connection refused" or "No such file" instead (a refused client certificate is seen as
# either an alert or, racing it, the member closing the socket: a broken pipe)
_TLS_WORDS = ("SSL", "TSI_", "certificate", "handshake", "Handshake", "Broken pipe")


def _transient(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() in TRANSIENT or (exc.code() == grpc.StatusCode.UNKNOWN and (
        "deadline exceeded" in (exc.details() or "")))
KINDS: dict[str, Kind] = {"own": "ownership", "node": "node", "mig": "migration",
                          "pub": "public"}
# etcd's WithRequireLeader: a member cut off from the others answers "no leader" at once
# instead of holding the call until its own timeout, so we move on to the next member
REQUIRE_LEADER = (("hasleader", "true"),)
CAS_ROUNDS = 50  # a compare that keeps failing while the checks pass: give up, say so


def _range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _decode(kv: Any) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(kv.value))


def _encode(rec: Record, op: str) -> bytes:
    return json.dumps({**to_dict(rec), "op": op}).encode()


# --- talking to the members ---------------------------------------------------------


class _Members:
    """One channel per member; calls go to the current one and move on to the next on a
    transient failure, until the operation's deadline (the URL's ``timeout``)."""

    def __init__(self, url: EtcdUrl) -> None:
        self.url = url
        creds = _credentials(url) if url.tls else None
        self.channels = [self._channel(e, creds) for e in url.endpoints]
        # clients spread over the members; each sticks to its member until it fails
        self.current = random.randrange(len(self.channels))

    def _channel(self, endpoint: str, creds: grpc.ChannelCredentials | None
                 ) -> grpc.aio.Channel:
        opts: list[tuple[str, Any]] = [("grpc.keepalive_time_ms", 10_000),
                                       ("grpc.keepalive_timeout_ms", 5_000),
                                       ("grpc.keepalive_permit_without_calls", 1)]
        if creds is None:
            return grpc.aio.insecure_channel(endpoint, options=opts)
        if self.url.server_name:
            opts.append(("grpc.ssl_target_name_override", self.url.server_name))
        return grpc.aio.secure_channel(endpoint, creds, options=opts)

    def kv(self) -> Any:
        return pb.KVStub(self.channels[self.current])

    def lease(self) -> Any:
        return pb.LeaseStub(self.channels[self.current])

    def watch(self) -> Any:
        return pb.WatchStub(self.channels[self.current])

    async def rpc(self, what: str, service: str, method: str, req: Any) -> Any:
        """One unary call (``service`` "kv" or "lease"), requiring the member to have a
        leader, rotating as ``call`` does."""
        def once(timeout: float) -> Awaitable[Any]:
            stub = self.kv() if service == "kv" else self.lease()
            return cast(Awaitable[Any], getattr(stub, method)(req, timeout=timeout,
                                                              metadata=REQUIRE_LEADER))
        return await self.call(what, once)

    def next(self) -> None:
        self.current = (self.current + 1) % len(self.channels)

    async def call(self, what: str, fn: Callable[[float], Awaitable[T]]) -> T:
        """``fn(timeout)`` against the current member, rotating on transient errors."""
        deadline = time.monotonic() + self.url.timeout
        # a member cut off from the others hangs until its own timeout: give each try a
        # share of the deadline so the others get their turn
        share = max(1.0, self.url.timeout / max(2, len(self.channels)))
        last: grpc.aio.AioRpcError | None = None
        while (left := deadline - time.monotonic()) > 0:
            try:
                return await fn(min(left, share))
            except grpc.aio.AioRpcError as exc:
                if not _transient(exc):
                    raise _error(self.url, what, exc) from None
                last = exc
                self.next()
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        assert last is not None
        raise _error(self.url, what, last) from None

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


def _credentials(url: EtcdUrl) -> grpc.ChannelCredentials:
    def read(name: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StoreError(f"store {url.display}: {name}={path}: {exc.strerror}") from None

    return grpc.ssl_channel_credentials(root_certificates=read("ca", url.ca),
                                        private_key=read("key", url.key),
                                        certificate_chain=read("cert", url.cert))


def _error(url: EtcdUrl, what: str, exc: grpc.aio.AioRpcError) -> StoreError:
    detail = (exc.details() or exc.code().name).strip().replace("\n", " ")
    if _transient(exc) and url.tls and any(w in detail for w in _TLS_WORDS):
        return StoreError(f"store {url.display}: {what}: TLS with the members failed "
                          f"({detail}); check ca=, cert=, key= and server_name=")
    if _transient(exc):
        n = len(url.endpoints)
        # Raft may still commit a write its leader took before losing the quorum: say so
        return StoreError(f"store {url.display}: {what}: no etcd member answered within "
                          f"{url.timeout:g} s ({detail}); is a quorum of the cluster up? "
                          f"({n} member{'s' if n > 1 else ''} in the URL; a write may "
                          "still apply once it is)")
    if "too many operations" in detail:
        return StoreError(f"store {url.display}: {what}: {detail}: the members' "
                          f"--max-txn-ops is below the URL's max_txn_ops={url.max_txn_ops}")
    return StoreError(f"store {url.display}: {what}: {detail}")


# --- the store ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    revision: int
    kvs: dict[bytes, Any]  # key -> KeyValue (present keys only)


class EtcdStore(Store):
    def __init__(self, url: str) -> None:
        self.url = parse_etcd_url(url)
        self.members = _Members(self.url)
        p = self.url.prefix.encode() + b"/"
        self._p = p
        self._base = 0  # the revision before this store existed
        self._closed = False
        self._leases: dict[str, int] = {}  # node -> lease id this process granted

    @classmethod
    async def open(cls, url: str) -> EtcdStore:
        store = cls(url)
        try:
            await store._create()
        except BaseException:
            await store.members.close()
            raise
        return store

    @property
    def name(self) -> str:
        return self.url.display

    def _key(self, kind: str, name: str) -> bytes:
        return self._p + kind.encode() + b"/" + name.encode()

    def _dir(self, kind: str) -> tuple[bytes, bytes]:
        start = self._p + kind.encode() + b"/"
        return start, _range_end(start)

    async def _create(self) -> None:
        meta = self._p + b"meta"
        body = json.dumps({"created": time.time(), "layout": 1}).encode()
        resp = await self._txn("open", [pb.Compare(target=pb.Compare.VERSION, key=meta,
                                                   result=pb.Compare.EQUAL, version=0)],
                               [_put(meta, body)], [_get(meta)])
        if resp.succeeded:
            self._base = resp.header.revision - 1
        else:
            self._base = resp.responses[0].response_range.kvs[0].create_revision - 1

    # --- raw operations -------------------------------------------------------------

    async def _txn(self, what: str, compare: list[Any], success: list[Any],
                   failure: Iterable[Any] = ()) -> Any:
        req = pb.TxnRequest(compare=compare, success=success, failure=list(failure))
        return await self.members.rpc(what, "kv", "Txn", req)

    async def _range(self, what: str, key: bytes, end: bytes = b"", *, revision: int = 0,
                     count_only: bool = False, keys_only: bool = False) -> Any:
        req = pb.RangeRequest(key=key, range_end=end, revision=revision,
                              count_only=count_only, keys_only=keys_only)
        return await self.members.rpc(what, "kv", "Range", req)

    async def _read(self, what: str, keys: Iterable[bytes], dirs: Iterable[str] = ()) -> _Read:
        """Several keys and whole directories at one revision (one transaction)."""
        ops = [_get(k) for k in keys] + [_get(*self._dir(d)) for d in dirs]
        resp = await self._txn(what, [], ops)
        kvs = {kv.key: kv for r in resp.responses for kv in r.response_range.kvs}
        return _Read(resp.header.revision, kvs)

    # --- ownership ------------------------------------------------------------------

    def _own_of(self, kv: Any) -> Ownership:
        return cast(Ownership, from_dict("ownership", _decode(kv)))

    async def get_ownership(self, ip: Address) -> Ownership | None:
        key = self._key("own", str(to_ip(ip)))
        resp = await self._range("get ownership", key)
        return self._own_of(resp.kvs[0]) if resp.kvs else None

    async def list_ownership(self, *, node: str | None = None, guest: str | None = None,
                             include_released: bool = False) -> list[Ownership]:
        resp = await self._range("list ownership", *self._dir("own"))
        out = [self._own_of(kv) for kv in resp.kvs]
        out = [o for o in out if (node is None or o.node == node)
               and (guest is None or o.guest == guest) and (include_released or o.node)]
        return sorted(out, key=lambda o: o.ip)

    async def claim_all(self, expected: Mapping[Address, int], node: str,
                        guest: str) -> list[Ownership]:
        return await self._swap(expected_epochs(expected), node, guest)

    async def release_all(self, expected: Mapping[Address, int]) -> list[Ownership]:
        return await self._swap(expected_epochs(expected), None, None)

    async def release_each(self, groups: Sequence[Mapping[Address, int]]
                           ) -> list[list[Ownership] | StoreError]:
        """Groups packed into transactions of up to ``max_txn_ops`` addresses; a packed
        transaction that conflicts is split until the stale groups stand alone."""
        wants: list[dict[IPv4Address, int] | StoreError] = []
        for g in groups:
            try:
                wants.append(expected_epochs(g))
            except StoreError as exc:
                wants.append(exc)
        out: list[list[Ownership] | StoreError | None] = [
            w if isinstance(w, StoreError) else None for w in wants]
        batch: list[int] = []
        size = 0
        for i, w in enumerate(wants):
            if isinstance(w, StoreError):
                continue
            if batch and size + len(w) > self.url.max_txn_ops:
                await self._release_batch(batch, wants, out)
                batch, size = [], 0
            batch.append(i)
            size += len(w)
        if batch:
            await self._release_batch(batch, wants, out)
        return [r if r is not None else StoreError("not released") for r in out]

    async def _release_batch(self, batch: list[int],
                             wants: Sequence[dict[IPv4Address, int] | StoreError],
                             out: list[list[Ownership] | StoreError | None]) -> None:
        if len(batch) == 1:
            w = wants[batch[0]]
            assert not isinstance(w, StoreError)
            try:
                out[batch[0]] = await self._swap(w, None, None)
            except StoreError as exc:
                out[batch[0]] = exc
            return
        groups = [cast(dict[IPv4Address, int], wants[i]) for i in batch]
        keys = {ip: self._key("own", str(ip)) for g in groups for ip in g}
        read = await self._read("release", list(keys.values()))
        now, op = time.time(), uuid.uuid4().hex
        compare, puts, news = [], [], []
        for g in groups:
            new = []
            for ip in sorted(g):
                kv = read.kvs.get(keys[ip])
                old = self._own_of(kv) if kv is not None else None
                if old is None or old.epoch != g[ip]:
                    break  # stale or never claimed: split, so release_all says which
                rec = Ownership(ip, None, old.guest, g[ip] + 1, now)
                compare.append(_version_is(keys[ip], g[ip]))
                puts.append(_put(keys[ip], _encode(rec, op)))
                new.append(rec)
            news.append(new if len(new) == len(g) else None)
        if all(n is not None for n in news):
            resp = await self._txn("release", compare, puts)
            if resp.succeeded:
                for i, n in zip(batch, news, strict=True):
                    out[i] = n
                return
        half = len(batch) // 2
        await self._release_batch(batch[:half], wants, out)
        await self._release_batch(batch[half:], wants, out)

    def _check_size(self, ops: int, what: str) -> None:
        if ops > self.url.max_txn_ops:
            raise StoreError(
                f"store {self.name}: {what} needs {ops} operations in one transaction, more "
                f"than max_txn_ops={self.url.max_txn_ops} (etcd's --max-txn-ops): raise "
                "both, or move fewer addresses at once")

    async def _swap(self, want: dict[IPv4Address, int], node: str | None,
                    guest: str | None) -> list[Ownership]:
        """One transaction: every address's version (= epoch) must still be the expected
        one, and the claiming node must be registered (once any node is)."""
        self._check_size(len(want) + 1, f"{'a claim' if node else 'a release'} of "
                         f"{len(want)} addresses")
        ips = sorted(want)
        keys = [self._key("own", str(ip)) for ip in ips]
        op = uuid.uuid4().hex
        check_node = node is not None
        previous: dict[IPv4Address, Ownership | None] = {}
        for _ in range(CAS_ROUNDS):
            if guest is None:  # a release keeps the last guest: read it first
                read = await self._read("release", keys)
                previous = {ip: self._own_of(read.kvs[k]) if k in read.kvs else None
                            for ip, k in zip(ips, keys, strict=True)}
            now = time.time()
            new = [Ownership(ip, node, guest_after(ip, previous.get(ip), guest), want[ip] + 1,
                             now) for ip in ips]
            compare = [_version_is(k, want[ip]) for ip, k in zip(ips, keys, strict=True)]
            if check_node and node is not None:
                compare.append(pb.Compare(target=pb.Compare.VERSION, result=pb.Compare.GREATER,
                                          key=self._key("node", node), version=0))
            puts = [_put(k, _encode(o, op)) for k, o in zip(keys, new, strict=True)]
            resp = await self._txn("claim" if node else "release", compare, puts,
                                   [_get(k) for k in keys] + [_get(*self._dir("node"))])
            if resp.succeeded:
                return new
            got = {kv.key: kv for r in resp.responses for kv in r.response_range.kvs}
            known = {kv.key.rsplit(b"/", 1)[1].decode() for kv in got.values()
                     if kv.key.startswith(self._dir("node")[0])}
            current = {ip: self._own_of(got[k]) if k in got else None
                       for ip, k in zip(ips, keys, strict=True)}
            if all(k in got and _decode(got[k]).get("op") == op for k in keys):
                return [c for c in current.values() if c is not None]  # ours, reply was lost
            if node is not None:
                check_known_nodes(known, node)
                check_node = bool(known)  # no node registered yet: anything goes
            check_epochs(want, current)
            # epochs fine, node fine: a release saw the guest change under it; go again
        raise StoreError(f"store {self.name}: claim kept conflicting for {CAS_ROUNDS} rounds")

    # --- nodes ----------------------------------------------------------------------

    def _node_of(self, kv: Any) -> NodeRecord:
        return cast(NodeRecord, from_dict("node", _decode(kv)))

    async def _node_names(self) -> set[str]:
        resp = await self._range("list nodes", *self._dir("node"), keys_only=True)
        return {kv.key.rsplit(b"/", 1)[1].decode() for kv in resp.kvs}

    async def get_node(self, name: str) -> NodeRecord | None:
        resp = await self._range("get node", self._key("node", name))
        return self._node_of(resp.kvs[0]) if resp.kvs else None

    async def list_nodes(self) -> list[NodeRecord]:
        resp = await self._range("list nodes", *self._dir("node"))
        return sorted((self._node_of(kv) for kv in resp.kvs), key=lambda n: n.name)

    async def upsert_node(self, name: str, tag: int, mac_prefix: str,
                          pub_ip: Address) -> NodeRecord:
        new = NodeRecord(name, tag, mac_prefix.lower(), to_ip(pub_ip), time.time())
        nkey, tkey = self._key("node", name), self._key("tag", str(tag))
        for _ in range(CAS_ROUNDS):
            read = await self._read("register node", [nkey, tkey])
            holder = read.kvs.get(tkey)
            if holder is not None and holder.value.decode() != name:
                raise StoreError(f"node {name}: tag {tag} already belongs to node "
                                 f"{holder.value.decode()}")
            old = self._node_of(read.kvs[nkey]) if nkey in read.kvs else None
            if old is not None and replace(old, heartbeat=new.heartbeat) == new:
                return old  # a restart with the same values: not news
            success = [_put(nkey, _encode(new, "")), _put(tkey, name.encode())]
            if old is not None and old.tag != tag:
                success.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(
                    key=self._key("tag", str(old.tag)))))
            same = [_unchanged(read, nkey), _unchanged(read, tkey)]
            resp = await self._txn("register node", same, success)
            if resp.succeeded:
                return new
        raise StoreError(f"store {self.name}: registering {name} kept conflicting")

    async def heartbeat(self, name: str) -> NodeRecord:
        read = await self._read("heartbeat", [self._key("node", name), self._key("alive", name),
                                              self._key("lease", name)])
        node = read.kvs.get(self._key("node", name))
        if node is None:
            raise StoreError(f"heartbeat from unknown node {name!r}: upsert it first")
        alive, granted = read.kvs.get(self._key("alive", name)), read.kvs.get(
            self._key("lease", name))
        if alive is not None and alive.lease and await self._keep_alive(alive.lease):
            return self._node_of(node)
        if granted is not None:  # it expired (a partition longer than the TTL): alive again
            await self.grant_lease(name, float(_decode(granted)["ttl"]))
        return self._node_of(node)

    async def _keep_alive(self, lease: int) -> bool:
        async def once(timeout: float) -> bool:
            async def req() -> AsyncIterator[Any]:
                yield pb.LeaseKeepAliveRequest(ID=lease)

            call = self.members.lease().LeaseKeepAlive(req(), timeout=timeout,
                                                       metadata=REQUIRE_LEADER)
            try:
                async for resp in call:
                    return bool(resp.TTL > 0)
                return False
            finally:
                call.cancel()

        return await self.members.call("lease keep-alive", once)

    # --- liveness -------------------------------------------------------------------

    async def grant_lease(self, name: str, ttl: float) -> Liveness:
        if ttl <= 0:
            raise StoreError(f"lease of {name}: ttl must be positive, got {ttl}")
        if await self.get_node(name) is None:
            raise StoreError(f"lease for unknown node {name!r}: upsert it first")
        req = pb.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        grant = await self.members.rpc("grant lease", "lease", "LeaseGrant", req)
        alive, lkey = self._key("alive", name), self._key("lease", name)
        old = await self._range("grant lease", alive)
        await self._txn("grant lease", [], [
            pb.RequestOp(request_put=pb.PutRequest(key=alive, value=b"1", lease=grant.ID)),
            _put(lkey, json.dumps({"ttl": float(ttl), "granted": grant.TTL}).encode())])
        self._leases[name] = grant.ID
        for kv in old.kvs:
            if kv.lease and kv.lease != grant.ID:
                await self._revoke(kv.lease)
        return Liveness(name, True, float(ttl), float(grant.TTL))

    async def _revoke(self, lease: int) -> None:
        req = pb.LeaseRevokeRequest(ID=lease)
        try:
            await self.members.rpc("revoke lease", "lease", "LeaseRevoke", req)
        except StoreError as exc:
            if "not found" not in str(exc):  # already expired: that is what we wanted
                raise

    async def revoke_lease(self, name: str) -> None:
        resp = await self._range("revoke lease", self._key("alive", name))
        for kv in resp.kvs:
            await self._revoke(kv.lease)
        self._leases.pop(name, None)

    async def list_liveness(self) -> list[Liveness]:
        read = await self._read("liveness", [], ["node", "alive", "lease"])
        names = sorted(k.rsplit(b"/", 1)[1].decode() for k in read.kvs
                       if k.startswith(self._dir("node")[0]))

        async def one(name: str) -> Liveness:
            granted = read.kvs.get(self._key("lease", name))
            ttl = float(_decode(granted)["ttl"]) if granted is not None else 0.0
            alive = read.kvs.get(self._key("alive", name))
            if alive is None:
                return Liveness(name, False, ttl, 0.0)
            req = pb.LeaseTimeToLiveRequest(ID=alive.lease)
            left = await self.members.rpc("lease ttl", "lease", "LeaseTimeToLive", req)
            # whole seconds, rounded down: 0 is still alive, -1 is gone
            return Liveness(name, left.TTL >= 0, ttl, float(max(0, left.TTL)))

        return list(await asyncio.gather(*(one(n) for n in names)))

    # --- public addresses -----------------------------------------------------------

    def _pub_of(self, kv: Any) -> PublicAddress:
        return cast(PublicAddress, from_dict("public", _decode(kv)))

    async def get_public(self, node: str) -> PublicAddress | None:
        resp = await self._range("get public address", self._key("pub", node))
        return self._pub_of(resp.kvs[0]) if resp.kvs else None

    async def list_public(self) -> list[PublicAddress]:
        resp = await self._range("list public addresses", *self._dir("pub"))
        return sorted((self._pub_of(kv) for kv in resp.kvs), key=lambda p: p.node)

    async def claim_public(self, node: str, ip: Address, holder: str,
                           expected_epoch: int) -> PublicAddress:
        addr, key, op = to_ip(ip), self._key("pub", node), uuid.uuid4().hex
        for _ in range(CAS_ROUNDS):
            read = await self._read("claim public address", [key], ["node"])
            cur = read.kvs.get(key)
            if cur is not None and _decode(cur).get("op") == op:
                return self._pub_of(cur)  # ours: the reply was lost
            known = {k.rsplit(b"/", 1)[1].decode() for k in read.kvs
                     if k.startswith(self._dir("node")[0])}
            check_public(node, addr, holder, expected_epoch,
                         self._pub_of(cur) if cur is not None else None, known)
            new = PublicAddress(node, addr, holder, expected_epoch + 1, time.time())
            resp = await self._txn("claim public address", [_version_is(key, expected_epoch)],
                                   [_put(key, _encode(new, op))])
            if resp.succeeded:
                return new
        raise StoreError(f"store {self.name}: public address of {node} kept conflicting")

    # --- audit anchors --------------------------------------------------------------

    async def anchor_audit(self, anchor: AuditAnchor) -> AuditAnchor:
        key = self._key("audit", anchor.node)
        body = json.dumps(asdict(anchor)).encode()
        for _ in range(CAS_ROUNDS):
            read = await self._read("anchor audit", [key])
            cur = read.kvs.get(key)
            old = AuditAnchor(**_decode(cur)) if cur is not None else None
            if not anchor_advances(old, anchor):
                assert old is not None
                return old
            resp = await self._txn("anchor audit", [_unchanged(read, key)], [_put(key, body)])
            if resp.succeeded:
                return anchor
        raise StoreError(f"store {self.name}: audit anchor of {anchor.node} kept conflicting")

    async def list_audit_anchors(self) -> list[AuditAnchor]:
        resp = await self._range("list audit anchors", *self._dir("audit"))
        return sorted((AuditAnchor(**_decode(kv)) for kv in resp.kvs), key=lambda a: a.node)

    # --- migrations -----------------------------------------------------------------

    def _mig_of(self, kv: Any) -> MigrationRecord:
        return cast(MigrationRecord, from_dict("migration", _decode(kv)))

    async def get_migration(self, id: str) -> MigrationRecord | None:
        resp = await self._range("get migration", self._key("mig", id))
        return self._mig_of(resp.kvs[0]) if resp.kvs else None

    async def list_migrations(self, *, active: bool = True,
                              guest: str | None = None) -> list[MigrationRecord]:
        resp = await self._range("list migrations", *self._dir("mig"))
        out = [m for m in (self._mig_of(kv) for kv in resp.kvs)
               if (guest is None or m.guest == guest) and (not active or m.active)]
        return sorted(out, key=lambda m: (m.started, m.id))

    async def create_migration(self, guest: str, addresses: Iterable[Address], src: str,
                               dst: str, *, id: str | None = None) -> MigrationRecord:
        ips = tuple(sorted({to_ip(a) for a in addresses}))
        if not ips:
            raise StoreError(f"migration of {guest}: no addresses given")
        self._check_size(len(ips) + 2, f"a migration of {len(ips)} addresses")
        mid = id or uuid.uuid4().hex[:12]
        mkey, akey = self._key("mig", mid), self._key("active", guest)
        okeys = [self._key("own", str(ip)) for ip in ips]
        for _ in range(CAS_ROUNDS):
            read = await self._read("create migration", [mkey, akey, *okeys], ["node"])
            if mkey in read.kvs:
                return same_migration(self._mig_of(read.kvs[mkey]), guest, ips, src, dst)
            active = []
            if akey in read.kvs:
                running = await self.get_migration(read.kvs[akey].value.decode())
                active = [running] if running is not None and running.active else []
            owners = {ip: self._own_of(read.kvs[k]) if k in read.kvs else None
                      for ip, k in zip(ips, okeys, strict=True)}
            known = {k.rsplit(b"/", 1)[1].decode() for k in read.kvs
                     if k.startswith(self._dir("node")[0])}
            check_migration_start(guest, src, dst, active, known, owners)
            now = time.time()
            mig = MigrationRecord(
                id=mid, guest=guest, addresses=ips, src=src, dst=dst, phase=Phase.PREPARE,
                started=now, updated=now,
                epoch_before={ip: o.epoch if o else 0 for ip, o in owners.items()})
            compare = [_unchanged(read, k) for k in (mkey, akey, *okeys)]
            resp = await self._txn("create migration", compare,
                                   [_put(mkey, _encode(mig, "")), _put(akey, mid.encode())])
            if resp.succeeded:
                return mig
        raise StoreError(f"store {self.name}: creating a migration of {guest} kept conflicting")

    async def _update(self, id: str, change: Callable[[MigrationRecord], MigrationRecord | None]
                      ) -> MigrationRecord:
        key = self._key("mig", id)
        for _ in range(CAS_ROUNDS):
            read = await self._read("update migration", [key])
            if key not in read.kvs:
                raise StoreError(f"no migration {id!r}")
            mig = self._mig_of(read.kvs[key])
            new = change(mig)
            if new is None:
                return mig
            new = replace(new, updated=time.time())
            success = [_put(key, _encode(new, ""))]
            if not new.active:
                akey = self._key("active", new.guest)
                success.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=akey)))
            resp = await self._txn("update migration", [_unchanged(read, key)], success)
            if resp.succeeded:
                return new
        raise StoreError(f"store {self.name}: migration {id} kept conflicting")

    async def advance_phase(self, id: str, expected: Phase, to: Phase) -> MigrationRecord:
        was, to = to_phase(expected), to_phase(to)
        return await self._update(id, lambda m: replace(m, phase=to)
                                  if check_advance(m, was, to) else None)

    async def record_timing(self, id: str, phase: Phase, ms: float) -> MigrationRecord:
        key = to_phase(phase).value
        return await self._update(id, lambda m: replace(m, timings={**m.timings, key: float(ms)}))

    async def abort_migration(self, id: str, error: str) -> MigrationRecord:
        def change(m: MigrationRecord) -> MigrationRecord | None:
            if m.phase in (Phase.ABORT, Phase.ABORTED):
                return None
            check_advance(m, m.phase, Phase.ABORT)
            return replace(m, phase=Phase.ABORT, error=error)
        return await self._update(id, change)

    async def finish_migration(self, id: str) -> MigrationRecord:
        def change(m: MigrationRecord) -> MigrationRecord | None:
            to = finish_target(m)
            return None if to == m.phase else replace(m, phase=to)
        return await self._update(id, change)

    # --- changes --------------------------------------------------------------------

    async def revision(self) -> int:
        resp = await self._range("revision", self._p + b"meta", count_only=True)
        return int(resp.header.revision)

    async def snapshot(self) -> Snapshot:
        resp = await self._range("snapshot", self._p, _range_end(self._p))
        by: dict[str, list[Any]] = {k: [] for k in KINDS}
        for kv in resp.kvs:
            kind = kv.key[len(self._p):].split(b"/", 1)[0].decode()
            if kind in by:
                by[kind].append(kv)
        migs = [m for m in (self._mig_of(kv) for kv in by["mig"]) if m.active]
        return Snapshot(
            int(resp.header.revision),
            tuple(sorted((self._own_of(kv) for kv in by["own"]), key=lambda o: o.ip)),
            tuple(sorted((self._node_of(kv) for kv in by["node"]), key=lambda n: n.name)),
            tuple(sorted(migs, key=lambda m: (m.started, m.id))),
            tuple(sorted((self._pub_of(kv) for kv in by["pub"]), key=lambda p: p.node)))

    def _change(self, event: Any) -> Change | None:
        kv = event.kv
        kind_name, _, name = kv.key[len(self._p):].decode().partition("/")
        kind = KINDS.get(kind_name)
        if kind is None or not name:
            return None  # an index key (tag, active, alive, lease) or meta
        rec = None if event.type == event.DELETE else from_dict(kind, _decode(kv))
        return Change(int(kv.mod_revision), kind, name, rec)

    async def _check_kept(self, after: int) -> None:
        """Compacted when the revisions after ``after`` are no longer all kept."""
        if after <= 0:
            return
        try:
            await self._range("watch", self._p + b"meta", revision=after, count_only=True)
        except StoreError as exc:
            if "compacted" in str(exc):
                raise Compacted(f"store {self.name}: changes up to revision {after} or later "
                                "are compacted: relist, then watch") from None
            if "future revision" not in str(exc):
                raise

    async def watch(self, after: int = 0) -> AsyncGenerator[Change, None]:
        last = max(after, self._base)  # everything up to here has been delivered
        await self._check_kept(last)
        pause = 0.05
        while True:
            try:
                async for resp in self._watch_once(last + 1):
                    pause = 0.05
                    if resp.compact_revision:
                        raise Compacted(f"store {self.name}: changes before revision "
                                        f"{resp.compact_revision} are compacted (needed those "
                                        f"after {last}): relist, then watch")
                    if resp.canceled:
                        raise StoreError(f"store {self.name}: watch cancelled: "
                                         f"{resp.cancel_reason}")
                    for event in resp.events:
                        last = int(event.kv.mod_revision)
                        change = self._change(event)
                        if change is not None:
                            yield change
            except grpc.aio.AioRpcError as exc:
                if not _transient(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    raise _error(self.url, "watch", exc) from None
                log.info("store.watch_resume", after=last, error=exc.code().name)
            # a member went away (or never answered): resume from the next one
            self.members.next()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _watch_once(self, start: int) -> AsyncIterator[Any]:
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=self._p, range_end=_range_end(self._p), start_revision=start,
                progress_notify=True))
            await stop.wait()

        # "hasleader": a member cut off from the others cancels the watch instead of
        # going quiet (etcd's WithRequireLeader), so we move on to one that has a leader
        call = self.members.watch().Watch(requests(), metadata=REQUIRE_LEADER)
        try:
            async for resp in call:
                yield resp
        finally:
            stop.set()
            call.cancel()

    async def compact(self, revision: int) -> None:
        current = await self.revision()
        if revision > current:
            raise StoreError(f"cannot compact to revision {revision}: the store is at "
                             f"{current}")
        req = pb.CompactionRequest(revision=revision, physical=True)
        try:
            await self.members.rpc("compact", "kv", "Compact", req)
        except StoreError as exc:
            if "compacted" not in str(exc):  # already compacted further: nothing to do
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for lease in self._leases.values():  # a clean stop says "dead" at once
                await self._revoke(lease)
        except StoreError as exc:
            log.warning("store.close", error=str(exc))
        finally:
            await self.members.close()


# --- helpers -------------------------------------------------------------------------


def _get(key: bytes, end: bytes = b"") -> Any:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=end))


def _put(key: bytes, value: bytes) -> Any:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))


def _version_is(key: bytes, version: int) -> Any:
    return pb.Compare(target=pb.Compare.VERSION, result=pb.Compare.EQUAL, key=key,
                      version=version)


def _unchanged(read: _Read, key: bytes) -> Any:
    """The key is as ``read`` saw it: same modification, or still absent."""
    kv = read.kvs.get(key)
    if kv is None:
        return _version_is(key, 0)
    return pb.Compare(target=pb.Compare.MOD, result=pb.Compare.EQUAL, key=key,
                      mod_revision=kv.mod_revision)

