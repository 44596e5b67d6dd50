"""The peer handshake's parser and proofs (pure): any bytes give fields or a HandshakeError
with a counter name, never another exception; proofs are bound to role, nonces and names."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.agent import handshake as hs

KEY = b"k" * 32
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)


@given(st.binary(max_size=hs.HANDSHAKE_MAX))
def test_any_bytes_parse_or_raise_handshake_error(body: bytes) -> None:
    try:
        hs.parse(body, "node", "nonce")
    except hs.HandshakeError as exc:
        assert exc.reason in {"bad_handshake", "bad_version", "refused"}


@given(JSONISH)
def test_any_json_parses_or_raises_handshake_error(obj: object) -> None:
    with pytest.raises(hs.HandshakeError):
        hs.parse(json.dumps(obj).encode(), "node", "nonce")


def test_a_good_hello_and_what_binds_a_proof() -> None:
    got = hs.parse(hs.encode({"node": "n2", "nonce": "ab" * 16}), "node", "nonce")
    assert got == {"node": "n2", "nonce": b"\xab" * 16}
    nc, ns = b"c" * 16, b"s" * 16
    base = hs.proof(KEY, b"S", nc, ns, "n2", "n1")
    others = {hs.proof(KEY, b"C", nc, ns, "n2", "n1"), hs.proof(KEY, b"S", ns, nc, "n2", "n1"),
              hs.proof(KEY, b"S", nc, ns, "n1", "n2"), hs.proof(b"x" * 32, b"S", nc, ns, "n2", "n1"),
              hs.proof(KEY, b"S", nc, ns, "n2-", "n1")}  # fmt: skip
    assert base not in others and len(others) == 5
    assert hs.session_key(KEY, nc, ns, "n2", "n1") != hs.session_key(KEY, ns, nc, "n2", "n1")
