"""The lab's flow client: how it names what ended a flow."""

from __future__ import annotations

from orchestrator.lab.flow_client import describe


def test_a_flow_error_names_its_cause() -> None:
    try:
        try:
            raise EOFError("connection closed while reading HTTP status line")
        except EOFError as eof:
            raise ValueError("did not receive a valid HTTP response") from eof
    except ValueError as exc:
        assert describe(exc) == ("ValueError: did not receive a valid HTTP response (EOFError: "
                                 "connection closed while reading HTTP status line)")
    assert describe(TimeoutError()) == "TimeoutError"
