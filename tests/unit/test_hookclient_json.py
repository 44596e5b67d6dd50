"""hooks/hookclient.py's JSON codec (json's C half, driven directly so a hook need not
import re) gives what the json module gives, and refuses what json.loads refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.hooks import hookclient

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(JSON_VALUES)
def test_dumps_is_json_dumps(value: object) -> None:
    assert hookclient.dumps(value) == json.dumps(value, separators=(",", ":"))


@given(JSON_VALUES, st.sampled_from(["", " ", "\n", " \t\r\n"]))
def test_loads_is_json_loads(value: object, pad: str) -> None:
    text = pad + json.dumps(value, indent=1) + pad
    assert hookclient.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a":1}x', "[1,]", "NaN", '{"a":Infinity}',
                                  "'a'", '"\x01"', "{1:2}", "[1] [2]"])  # fmt: skip
def test_loads_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        hookclient.loads(text)


def test_dumps_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        hookclient.dumps({"a": {1, 2}})
    with pytest.raises(ValueError):  # a circular reference, as json refuses it
        loop: list[object] = []
        loop.append(loop)
        hookclient.dumps(loop)
    assert hookclient.dumps([1]) == "[1]"  # a failed call leaves no state behind


def test_a_hook_imports_neither_json_nor_re() -> None:
    """What the codec is for: a hook's start-up stays near the bare interpreter's."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import hookclient; "
             "print(sorted({'json', 're', 'enum', 'socket', 'subprocess'} & set(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe,
                          str(hookclient.__file__).rsplit("/", 1)[0]],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out
