"""The nft seam: run scripts and read tables inside a namespace (``None`` = this one).

pyroute2's nftables support cannot do namespaces or set elements (FACTS.md) and there is
no nftables binding on PyPI, so we drive ``nft`` itself; a batch is atomic in the kernel.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.errors import RulesetError


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def run(script: str, netns: str | None = None, check_only: bool = False) -> None:
    """Load ``script`` as one transaction; on rejection nothing changes and we say why."""
    argv = [*netns_prefix(netns), "nft", *(["-c"] if check_only else []), "-f", "-"]
    try:
        proc = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RulesetError("nft is not installed (apt-get install nftables)") from None
    if proc.returncode != 0:
        raise RulesetError(f"nft rejected the ruleset: {_first_error(proc.stderr)}")


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "Error:" in ln:
            context = lines[i + 1] if i + 1 < len(lines) and "Error:" not in lines[i + 1] else ""
            return f"{ln} {('[' + context + ']') if context else ''}".strip()
    return lines[0] if lines else "unknown error"


def query(args: Sequence[str], netns: str | None = None) -> list[dict[str, Any]]:
    """``nft -j ARGS`` as a list of objects (metainfo dropped); [] when the object is absent."""
    proc = subprocess.run(
        [*netns_prefix(netns), "nft", "-j", *args], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return []
        raise RulesetError(f"nft {' '.join(args)}: {_first_error(proc.stderr)}")
    items: list[dict[str, Any]] = json.loads(proc.stdout or '{"nftables": []}')["nftables"]
    return [i for i in items if "metainfo" not in i]


_COMMENT = re.compile(r'^\s*comment "convergent ([0-9a-f]+)"', re.MULTILINE)


def table_digest(family: str, table: str, netns: str | None = None) -> str | None:
    """The digest stamped in one of our tables, or None if the table is absent."""
    proc = subprocess.run(
        [*netns_prefix(netns), "nft", "list", "table", family, table],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        return None
    m = _COMMENT.search(proc.stdout)
    return m.group(1) if m else ""


def set_elements(family: str, table: str, name: str, netns: str | None = None) -> list[str]:
    for obj in query(["list", "set", family, table, name], netns):
        return _elements(obj.get("set", {}))
    return []


def sets_elements(family: str, table: str, names: Sequence[str],
                  netns: str | None = None) -> dict[str, list[str]]:
    """Several sets' elements from one ``nft -j list sets FAMILY`` (one process, not one
    per set: an agent reads its sets on every reconcile pass); a set absent is empty."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for obj in query(["list", "sets", family], netns):
        s = obj.get("set", {})
        if s.get("table") == table and s.get("name") in found:
            found[s["name"]] = _elements(s)
    return found


def _elements(s: dict[str, Any]) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in s.get("elem", [])]


def update_set(
    family: str,
    table: str,
    name: str,
    add: Sequence[str] = (),
    delete: Sequence[str] = (),
    netns: str | None = None,
) -> None:
    """Add and remove elements in one transaction (never a reload); see ``update_sets``."""
    update_sets(family, table, {name: (add, delete)}, netns)


def update_sets(family: str, table: str,
                changes: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                netns: str | None = None) -> None:
    """Several sets' (add, delete) in one nft transaction. Idempotent: a removal adds the
    element first in the same transaction, so a missing one is no error (nft 1.0.6 has no
    ``destroy element``) and concurrent writers (agent reconcile, coordinator) never trip
    over each other."""
    lines = []
    for name, (add, delete) in changes.items():
        if delete:
            elems = ", ".join(delete)
            lines.append(f"add element {family} {table} {name} {{ {elems} }}")
            lines.append(f"delete element {family} {table} {name} {{ {elems} }}")
        if add:
            lines.append(f"add element {family} {table} {name} {{ {', '.join(add)} }}")
    if lines:
        run("\n".join(lines) + "\n", netns)
