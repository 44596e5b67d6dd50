"""Read a cluster TOML file into a validated :class:`Topology`, or explain every problem.

Each problem is one line naming the file, the key path and the reason, so an operator can
fix the file without reading a traceback.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config.schema import Parts, Topology, cross_check
from orchestrator.errors import ConfigError


def load(path: str | Path) -> Topology:
    return parse(read_text(path), str(path))


def read_text(path: str | Path) -> str:
    """The file's text; a file that is not UTF-8 (TOML's only encoding) is a ConfigError
    naming where the first bad byte is."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte {raw[exc.start]:#04x} at "
                          f"offset {exc.start}); TOML files are UTF-8") from None


def parse(text: str, source: str = "<config>") -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(problems(source, exc.errors(), data))) from None


def problems(source: str, errors: Iterable[Any], data: Any = None) -> list[str]:
    """One line per problem. When some fields are invalid the cross-field checks did not
    run; they are run here on every part that did validate, so one run names it all."""
    lines: list[str] = []
    crossed = False
    for err in errors:
        ctx = err.get("ctx") or {}
        if err["type"] == "topology":
            lines += [f"{source}: {loc}: {msg}" for loc, msg in ctx["problems"]]
            crossed = True
            continue
        lines.append(f"{source}: {_path(err['loc']) or '(top level)'}: {_reason(err)}")
    if not crossed and data is not None:
        lines += [f"{source}: {loc}: {msg}" for loc, msg in cross_check(Parts.salvage(data))]
    return list(dict.fromkeys(lines))  # in order, each once


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_branch(part):
            out += f".{part}" if out else str(part)
    return out


def _is_union_branch(part: str) -> bool:
    # pydantic adds the branch type to loc for unions ("IPv4Address", "function-after[...]")
    return part[:1].isupper() or "[" in part or part in {"int", "str", "none"}


def _reason(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg: str = err["msg"]
    for noise in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(noise)
    if "input" in err and kind not in {"topology"} and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    return msg
