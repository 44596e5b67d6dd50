"""The peer channel's handshake (pure): who may open a session, and its key.

Both agents hold the cluster key K (the same trust the replicator's HMAC rests on). C opens
with ``{v, node, nonce_c}``; S answers ``{v, node, nonce_s, proof_s}``; C answers
``{v, proof_c}``, where

    proof_r   = HMAC-SHA256(K, "convergent-peer/1" | r | nonce_c | nonce_s | C | S)[:16]
    session   = HMAC-SHA256(K, "convergent-peer/1" | "session" | nonce_c | nonce_s | C | S)

every field length-prefixed (no two transcripts encode alike) and ``r`` the prover's role.
What that buys, each tested in tests/functional/test_agent.py:
- reflection: S's proof is for role S, so it is never a valid proof for C (or back);
- replay: each side's fresh nonce is in every proof, so a recorded handshake fails;
- downgrade: the protocol label is inside every MAC and ``v`` must be exactly ours, so a
  peer cannot be talked into an older or weaker exchange (there is no other to pick);
- a stolen session key opens nothing else: it is an HMAC output (K does not follow from
  it) bound to both nonces and names, so it neither forges frames on another connection
  nor proves anything in a new handshake.
It does not hide the frames (no encryption: they carry flow tuples on the sync segment),
and it names a node by the key plus the connection's source address (``addresses``), not
by a key of its own: any holder of K is a cluster member, as for the replicator.

Everything before the session is bounded (``HANDSHAKE_MAX`` bytes a frame) and checked
field by field; a malformed hello is a :class:`HandshakeError` with a counter name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

from orchestrator.errors import ConvergentError

PROTOCOL = "convergent-peer/1"
HANDSHAKE_MAX = 1024  # bytes in one frame before the session; a hello is ~120
NONCE = 16
PROOF = 16
_NODE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")  # the config's node names
_HEX = re.compile(r"^[0-9a-f]*$")


class HandshakeError(ConvergentError):
    """A hello that is malformed, from the wrong place, or does not prove the key.
    ``reason`` names the counter it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(fields: dict[str, str]) -> bytes:
    return json.dumps({"v": PROTOCOL, **fields}, separators=(",", ":")).encode()


def parse(body: bytes, *want: str) -> dict[str, Any]:
    """The hello's fields: ``node`` a node name, ``nonce`` and ``proof`` 16 bytes in hex
    (returned as bytes); an ``error`` from the other side is raised as such."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        raise HandshakeError("bad_handshake", "handshake is not JSON") from None
    if not isinstance(obj, dict):
        raise HandshakeError("bad_handshake", f"handshake is a JSON {type(obj).__name__}, "
                                              "not an object")
    if isinstance(obj.get("error"), str):
        raise HandshakeError("refused", f"refused: {obj['error'][:200]}")
    if obj.get("v") != PROTOCOL:
        raise HandshakeError("bad_version", f"unsupported peer protocol {obj.get('v')!r} "
                                            f"(this agent speaks {PROTOCOL})")
    out: dict[str, Any] = {}
    for name in want:
        value = obj.get(name)
        if not isinstance(value, str):
            raise HandshakeError("bad_handshake", f"handshake field {name!r} is missing or "
                                                  "not a string")
        out[name] = _field(name, value)
    return out


def _field(name: str, value: str) -> str | bytes:
    if name == "node":
        if not _NODE.match(value):
            raise HandshakeError("bad_handshake", f"{value[:40]!r} is not a node name")
        return value
    size = NONCE if name == "nonce" else PROOF
    if len(value) != 2 * size or not _HEX.match(value):
        raise HandshakeError("bad_handshake", f"handshake field {name!r} is not {size} bytes "
                                              "of hex")
    return bytes.fromhex(value)


def _transcript(*parts: bytes) -> bytes:
    return PROTOCOL.encode() + b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def proof(key: bytes, role: bytes, nc: bytes, ns: bytes, client: str, server: str) -> bytes:
    msg = _transcript(role, nc, ns, client.encode(), server.encode())
    return hmac.new(key, msg, hashlib.sha256).digest()[:PROOF]


def session_key(key: bytes, nc: bytes, ns: bytes, client: str, server: str) -> bytes:
    msg = _transcript(b"session", nc, ns, client.encode(), server.encode())
    return hmac.new(key, msg, hashlib.sha256).digest()


def check_proof(got: bytes, want: bytes, who: str) -> None:
    if not hmac.compare_digest(got, want):
        raise HandshakeError("auth_failed", f"{who} does not hold the cluster key")
