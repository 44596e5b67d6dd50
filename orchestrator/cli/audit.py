"""``convergent audit show|follow|verify|export``: review and check the audit log.

Logs are named with ``--log`` (repeatable; a file or a directory of several nodes'
logs), else ``$CONVERGENT_AUDIT_LOG``, else /var/log/convergent/audit.log. A file
stands for its chain: ``audit.log`` reads ``audit.log.1 .. audit.log.N, audit.log``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from orchestrator.audit.chain import Report
from orchestrator.audit.chain import verify as verify_chain
from orchestrator.audit.errors import AuditError
from orchestrator.audit.files import Chain, default_path, discover
from orchestrator.audit.follow import Follower
from orchestrator.audit.query import Filter, Row, Scanner, parse_ip, parse_when
from orchestrator.audit.render import HEADER, csv_header, csv_row, table_row, timeline
from orchestrator.store.base import AuditAnchor

F = Callable[..., Any]


def _when(_: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return parse_when(value) if value else None
    except AuditError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _ip(_: click.Context, param: click.Parameter, value: str | None) -> Any:
    try:
        return parse_ip(value) if value else None
    except AuditError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def log_option(func: F) -> F:
    return click.option(
        "--log",
        "logs",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Log file or directory (repeatable). "
        "Default: $CONVERGENT_AUDIT_LOG or /var/log/convergent/audit.log.",
    )(func)


def filter_options(func: F) -> F:
    options = [
        click.option("--guest", help="Only this guest."),
        click.option("--ip", callback=_ip, help="Only records naming this address or prefix."),
        click.option("--node", help="Only records written on this node."),
        click.option(
            "--action",
            "actions",
            multiple=True,
            help="Action or prefix: 'migration' matches migration.*; repeatable.",
        ),
        click.option("--since", callback=_when, help="ISO time (UTC if no zone) or age: 10m, 2h."),
        click.option("--until", callback=_when, help="ISO time (UTC if no zone) or age: 10m, 2h."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(migration: str | None = None, **opts: Any) -> Filter:
    actions = tuple(a for item in opts.pop("actions", ()) for a in item.split(",") if a)
    return Filter(actions=actions, migration=migration, **opts)


def _chains(logs: Iterable[Path]) -> list[Chain]:
    return discover(list(logs) or [default_path()])


class _Out:
    """Buffered stdout that ends quietly when the reader goes away (``| head``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)

    def raw(self, data: bytes) -> None:
        buffer = getattr(self.stream, "buffer", None)
        if buffer is None:
            self.write(data.decode("utf-8", "replace"))
            return
        try:
            self.stream.flush()
            buffer.write(data)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)


def _emit(out: _Out, rows: Iterable[Row], as_json: bool) -> int:
    count = 0
    for row in rows:
        count += 1
        if as_json:
            out.raw(row.raw + b"\n")
        else:
            out.write(table_row(row.record) + "\n")
    return count


def _warn_unreadable(scanner: Scanner) -> None:
    if scanner.unreadable:
        click.echo(
            f"convergent: warning: skipped {scanner.unreadable} unreadable line(s); "
            "run `convergent audit verify`",
            err=True,
        )


@click.group()
def audit() -> None:
    """Review and check the tamper-evident audit log."""


@audit.command()
@log_option
@filter_options
@click.option(
    "--migration", help="One migration's phases as a timeline (all nodes); --json: its records."
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines: each record as stored.")
@click.option("-n", "--last", type=click.IntRange(min=1), help="Only the last N matches.")
def show(logs: tuple[Path, ...], as_json: bool, last: int | None, **opts: Any) -> None:
    """Records matching all filters, in time order across all the logs."""
    scanner = Scanner(_filter(**opts))
    rows: Iterable[Row] = scanner.merged(_chains(logs))
    if last:
        rows = deque(rows, maxlen=last)
    out = _Out()
    if opts["migration"] and not as_json:
        for line in timeline(opts["migration"], [row.record for row in rows]):
            out.write(line + "\n")
    else:
        if not as_json:
            out.write(HEADER + "\n")
        _emit(out, rows, as_json)
    _warn_unreadable(scanner)


@audit.command()
@log_option
@filter_options
@click.option("--json", "as_json", is_flag=True, help="JSON lines: each record as stored.")
@click.option(
    "-n",
    "--last",
    "backlog",
    default=10,
    show_default=True,
    help="Show the last N matching records of the live files first.",
)
@click.option("--interval", default=0.25, show_default=True, help="Poll period in seconds.")
def follow(
    logs: tuple[Path, ...], as_json: bool, backlog: int, interval: float, **opts: Any
) -> None:
    """Print new matching records as they are written (Ctrl-C stops); follows rotation."""
    scanner = Scanner(_filter(**opts))
    followers = [Follower(chain.live) for chain in _chains(logs)]
    out = _Out()
    if not as_json:
        out.write(HEADER + "\n")
    first = sorted(_poll(scanner, followers), key=lambda r: (r.time, r.node, r.seq))
    _emit(out, first[-backlog:] if backlog else [], as_json)
    while True:
        out.stream.flush()
        time.sleep(interval)
        _emit(out, _poll(scanner, followers), as_json)


def _poll(scanner: Scanner, followers: list[Follower]) -> Iterator[Row]:
    for follower in followers:
        lines = ((lineno, raw, True) for lineno, raw in follower.poll())
        yield from scanner.lines(follower.path, lines)


@audit.command()
@log_option
@click.option("--partial", is_flag=True, help="Older rotated files were removed on purpose.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: every chain's result.")
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SEQ:HASH",
    help="A head printed by an earlier verify; catches a rewritten chain "
    "or deleted last lines (repeatable).",
)
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False),
              metavar="FILE", help="The audit key: every line's mac is checked with it.  "
              "[default: $CONVERGENT_AUDIT_KEY, else the cluster config's [agent] "
              "audit_key_file when it exists]")
@click.option("--no-key", is_flag=True, help="Check the hash chain only, not the macs.")
@click.option("--no-store", is_flag=True, help="Do not check against the chain heads the "
              "agents anchor in the cluster config's store (the default without --anchor).")
@click.pass_context
def verify(
    ctx: click.Context, logs: tuple[Path, ...], partial: bool, as_json: bool,
    anchors: tuple[str, ...], key_file: Path | None, no_key: bool, no_store: bool,
) -> None:
    """Check the hash chains: exit 0 intact, 1 tampered, 3 crash-truncated.

    1: a line edited, deleted, inserted, reordered or forged (its mac does not check out
    under the audit key), or a rotated file missing; every bad line is named as
    file:line. 3: intact except a last line cut short by a crash (not tampering). On
    success each chain's head is printed as SEQ:HASH, to pass back later with --anchor.
    Without --anchor, each chain is checked against the heads its agents anchored in the
    store the cluster config names (a deleted tail or a rewritten chain shows there)."""
    chains = _chains(logs)
    noted = _anchors(anchors)
    if noted and len(chains) > 1:
        raise click.UsageError("--anchor needs exactly one chain")
    # the anchors are read before the logs: a log is never behind what was anchored
    stored = None if noted or no_store else store_anchors()
    if stored is not None and stored.error and not as_json:
        click.echo(f"convergent: warning: the store {stored.url} cannot be read "
                   f"({stored.error}): no anchor checked", err=True)
    key = None if no_key else _audit_key(key_file)
    worst = 0
    results = []
    for chain in chains:
        used = _ChainAnchors.given(noted) if noted else _ChainAnchors.of(chain, stored)
        report = verify_chain(chain.files, partial, used.heads, key, used.source)
        if as_json:
            results.append({**_report_dict(chain, report), "anchor": used.phrase or None})
        else:
            _say(chain, report, used)
        worst = max(worst, report.exit_code, key=lambda code: {0: 0, 3: 1, 1: 2}[code])
    if as_json:
        click.echo(json.dumps({"chains": results, "exit_code": worst}, indent=2))
    ctx.exit(worst)


def _audit_key(explicit: Path | None) -> bytes | None:
    """The key to check macs with: the one named, else the one this host's config names,
    if it exists (a chain written without a key is then checked as unkeyed: --no-key)."""
    import os

    from orchestrator.audit.key import load_audit_key

    if explicit is not None:
        return load_audit_key(explicit)
    env = os.environ.get("CONVERGENT_AUDIT_KEY")
    if env:
        return load_audit_key(Path(env))
    from orchestrator.config.defaults import config_path
    from orchestrator.config.loader import load
    from orchestrator.errors import ConfigError

    try:
        key_file = load(config_path(None)).agent.audit_key_file
    except ConfigError:  # no config here, or one that does not load: the hash chain only
        return None
    return load_audit_key(key_file) if key_file.exists() else None


def _report_dict(chain: Chain, report: Report) -> dict[str, Any]:
    return {"log": str(chain.live), "files": [str(f) for f in chain.files],
            "intact": report.problem is None, "records": report.records,
            "first_seq": report.first_seq, "last_seq": report.last_seq,
            "head": f"{report.last_seq}:{report.head}" if report.head else None,
            "problem": str(report.problem) if report.problem else None,
            "problems": [str(p) for p in report.problems],
            "truncated": str(report.truncated) if report.truncated else None,
            "exit_code": report.exit_code}


@dataclass(frozen=True)
class StoredAnchors:
    """The store's anchors, read once for every chain."""

    url: str
    anchors: list[AuditAnchor] = field(default_factory=list)
    error: str | None = None  # the store could not be read


@dataclass(frozen=True)
class _ChainAnchors:
    """What one chain is checked against, and how to say so."""

    heads: dict[int, str]
    source: str  # "" when there is nothing to check against
    phrase: str  # "the anchor(s) from the store URL: n1 at seq 57, n2 at seq 55"

    @classmethod
    def given(cls, noted: dict[int, str]) -> _ChainAnchors:
        named = ", ".join(f"seq {seq}" for seq in sorted(noted))
        return cls(noted, "--anchor", f"the anchor(s) from --anchor: {named}")

    @classmethod
    def of(cls, chain: Chain, stored: StoredAnchors | None) -> _ChainAnchors:
        if stored is None:
            return cls({}, "", "")
        source = f"the store {stored.url}"
        if stored.error:
            return cls({}, source, f"no anchor: {source} cannot be read ({stored.error})")
        live = str(chain.live.resolve())
        mine = [a for a in stored.anchors if a.path == live]
        if not mine:
            return cls({}, source, f"no anchor: {source} holds none for this log")
        named = ", ".join(f"{a.node} at seq {a.seq}" for a in mine)
        return cls({a.seq: a.hash for a in mine}, source, f"the anchor(s) from {source}: {named}")


def store_anchors() -> StoredAnchors | None:
    """The anchors in the store this host's cluster config names; None without a config
    (or a SQLite store whose file does not exist: nothing was anchored there)."""
    import asyncio
    import sqlite3

    from orchestrator.config.defaults import config_path
    from orchestrator.config.loader import load
    from orchestrator.errors import ConfigError, ConvergentError
    from orchestrator.store import open_store, sqlite_path

    try:
        url = load(config_path(None)).agent.store
    except ConfigError:
        return None
    path = sqlite_path(url)
    if path is not None and not Path(path).exists():
        return None

    async def read() -> list[AuditAnchor]:
        store = await open_store(url)
        try:
            return await store.list_audit_anchors()
        finally:
            await store.close()

    try:
        return StoredAnchors(url, asyncio.run(asyncio.wait_for(read(), 15)))
    except (ConvergentError, OSError, TimeoutError, sqlite3.Error) as exc:
        return StoredAnchors(url, error=str(exc) or type(exc).__name__)


def _anchors(values: Iterable[str]) -> dict[int, str]:
    noted = {}
    for value in values:
        seq, _, digest = value.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise click.BadParameter(f"{value!r} is not SEQ:HASH", param_hint="--anchor")
        noted[int(seq)] = digest.lower()
    return noted


def _say(chain: Chain, report: Report, used: _ChainAnchors) -> None:
    if report.problems:
        for problem in report.problems:  # every one, each with its line
            click.echo(f"convergent: {problem}", err=True)
        if used.heads:  # what the problems above were found against
            click.echo(f"convergent: {chain.live}: checked against {used.phrase}", err=True)
        if report.truncated:
            click.echo(f"convergent: warning: {report.truncated}", err=True)
        return
    checked = f"; checked against {used.phrase}" if used.source else ""
    click.echo(  # the head stays the last word: scripts pass it back with --anchor
        f"{chain.live}: ok: {report.records} records, seq {report.first_seq}..{report.last_seq}"
        f" in {len(chain.files)} file(s){checked}; head {report.last_seq}:{report.head}"
    )
    if report.truncated:
        click.echo(f"convergent: warning: {report.truncated}", err=True)


@audit.command()
@log_option
@filter_options
@click.option("--migration", help="Only this migration's records.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
    help="JSON lines (each record as stored) or CSV.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File (default stdout).")
@click.option("--no-verify", is_flag=True, help="Export even if a chain does not verify.")
def export(
    logs: tuple[Path, ...], fmt: str, output: Path | None, no_verify: bool, **opts: Any
) -> None:
    """Matching records, time-ordered, as JSON lines or CSV; chains are verified first."""
    chains = _chains(logs)
    if not no_verify:
        _require_intact(chains)
    scanner = Scanner(_filter(**opts))
    rows = scanner.merged(chains)
    if output is None:
        _export(_Out(), rows, fmt)
    else:
        with open(output, "w", encoding="utf-8", newline="") as fh:
            _export(_Out(fh), rows, fmt)
    _warn_unreadable(scanner)


def _require_intact(chains: list[Chain]) -> None:
    for chain in chains:
        report = verify_chain(chain.files)
        if report.problem:
            raise AuditError(f"{report.problem}; not exporting (--no-verify to export anyway)")
        if report.truncated:
            click.echo(f"convergent: warning: {report.truncated}", err=True)


def _export(out: _Out, rows: Iterable[Row], fmt: str) -> None:
    if fmt == "csv":
        out.write(csv_header())
        for row in rows:
            out.write(csv_row(row.record))
    else:
        _emit(out, rows, as_json=True)
