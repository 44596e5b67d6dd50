"""Audit log figures: ``python -m bench.audit --json``.

write_per_s        records/s through ``AuditLog.record`` with an fsync per record
write_batch_per_s  the same in ``batch()`` groups of 100 (one fsync per group)
                   (write_nofsync_per_s: no fsync at all, the writer's own cost)
write_anchored_per_s  ``write_per_s`` while the agent's anchoring puts the head in a
                   SQLite store each second, as in an agent (anchor_put_ms: one put)
verify_1m_s        ``verify`` over a 1M-line chain (generated with the chaining bulk
                   writer, no fsync), in process; ``*_cli_s`` adds process start-up;
                   ``verify_1m_anchored_s`` checks it against an anchor at its head
show_filter_1m_s   ``show --guest G --action migration`` over the same 1M lines,
                   table rendered to /dev/null
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.audit import AuditLog, verify
from orchestrator.audit.files import Chain, chain_files
from orchestrator.audit.query import Filter, Scanner
from orchestrator.audit.render import table_row
from orchestrator.audit.writer import bulk_append

_ACTIONS = (
    "migration.prepare", "migration.precopy", "migration.cutover", "migration.finalize",
    "ownership.claim", "ownership.release", "ruleset.apply", "sync.resync", "guest.start",
    "hook.spooled",
)  # fmt: skip
_START = 1_714_532_400  # 2024-05-01T03:00:00Z


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _stamp(micros: int) -> str:
    return f"{_second(micros // 1_000_000)}.{micros % 1_000_000:06d}Z"


def synthetic(count: int, guests: int = 1000) -> Iterator[dict[str, Any]]:
    """Plausible events in on-disk key order, 10 ms apart, a few nodes and guests."""
    for i in range(count):
        guest = i % guests
        yield {
            "time": _stamp(_START * 1_000_000 + i * 10_000),
            "node": f"n{i % 4 + 1}",
            "actor": "agent",
            "action": _ACTIONS[i % len(_ACTIONS)],
            "outcome": "ok",
            "guest": f"g-{guest:04d}",
            "addresses": [f"10.5.{guest // 250}.{guest % 250 + 1}"],
            "from_node": f"n{i % 4 + 1}",
            "to_node": f"n{(i + 1) % 4 + 1}",
            "epoch": i // 1000,
            "entries": i % 5000,
            "duration_ms": round((i % 997) * 1.7, 3),
            "migration": f"m-{i // 10}",
        }


def bench_write(directory: Path, count: int, batch: int, fsync: bool = True) -> float:
    name = f"write-{batch}-{fsync}.log"
    log = AuditLog(directory / name, node="n1", actor="agent", fsync=fsync)
    mig = log.bind(guest="web1", addresses=["10.5.5.201"], from_node="n1", to_node="n2")
    start = time.perf_counter()
    for done in range(0, count, batch):
        with log.batch():
            for i in range(done, min(count, done + batch)):
                mig.record("migration.cutover", epoch=i, entries=i, duration_ms=1.5)
    elapsed = time.perf_counter() - start
    log.close()
    return count / elapsed


def bench_write_anchored(directory: Path, count: int) -> tuple[float, float, int]:
    """``(records/s, ms per anchor put, puts)`` with the agent's anchoring running in its
    own thread and loop, as the agent's event loop runs beside audit writes."""
    import asyncio
    import threading

    from orchestrator.agent.audit_anchor import AuditAnchoring
    from orchestrator.store import open_store

    log = AuditLog(directory / "anchored.log", node="n1", actor="agent")
    stop = threading.Event()
    puts: list[float] = []

    async def anchor() -> None:
        store = await open_store(f"sqlite://{directory}/store.db")
        anchoring = AuditAnchoring("n1", log.writer, store)
        while not stop.is_set():
            await asyncio.sleep(anchoring.interval)
            start = time.perf_counter()
            await anchoring.flush()
            puts.append(time.perf_counter() - start)
        await store.close()

    thread = threading.Thread(target=asyncio.run, args=(anchor(),))
    thread.start()
    mig = log.bind(guest="web1", addresses=["10.5.5.201"], from_node="n1", to_node="n2")
    start = time.perf_counter()
    for i in range(count):
        mig.record("migration.cutover", epoch=i, entries=i, duration_ms=1.5)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    log.close()
    put_ms = 1000 * sum(puts) / len(puts) if puts else 0.0
    return count / elapsed, put_ms, len(puts)


def _timed(func: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - start, result


def _show(path: Path, flt: Filter) -> int:
    with open(os.devnull, "w") as sink:
        rows = 0
        for row in Scanner(flt).chain(Chain(path, chain_files(path))):
            sink.write(table_row(row.record) + "\n")
            rows += 1
    return rows


def _cli(*args: str) -> float:
    exe = str(Path(sys.executable).with_name("convergent"))
    start = time.perf_counter()
    subprocess.run([exe, "audit", *args], stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def run(records: int, lines: int, directory: Path) -> dict[str, Any]:
    plain, anchored = [], []
    for round_ in range(2):  # alternated, best of two: the disk is shared and noisy
        where = directory / f"round-{round_}"
        where.mkdir()
        plain.append(bench_write(where, records, 1))
        anchored.append(bench_write_anchored(where, records))
    best = max(anchored)
    figures: dict[str, Any] = {
        "write_per_s": round(max(plain)),
        "write_anchored_per_s": round(best[0]), "anchor_put_ms": round(best[1], 2),
        "anchor_puts": best[2],
        "write_batch_per_s": round(bench_write(directory, records, 100)),
        "write_nofsync_per_s": round(bench_write(directory, records, 1, fsync=False)),
    }
    path = directory / "big" / "audit.log"
    path.parent.mkdir()
    generate_s, _ = _timed(bulk_append, path, synthetic(lines))
    verify_s, report = _timed(verify, chain_files(path))
    assert report.exit_code == 0 and report.records == lines, report
    anchored_s, checked = _timed(verify, chain_files(path), False,
                                 {report.last_seq: report.head})
    assert checked.exit_code == 0, checked
    flt = Filter(guest="g-0042", actions=("migration",))
    show_s, matches = _timed(_show, path, flt)
    figures |= {
        "verify_1m_s": round(verify_s, 2),
        "verify_1m_anchored_s": round(anchored_s, 2),
        "show_filter_1m_s": round(show_s, 2),
        "verify_1m_cli_s": round(_cli("verify", "--log", str(path)), 2),
        "show_filter_1m_cli_s": round(
            _cli("show", "--log", str(path), "--guest", "g-0042", "--action", "migration"), 2
        ),
        "show_filter_matches": matches,
        "generate_1m_s": round(generate_s, 2),
        "lines": lines,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "write_records": records,
    }
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--records", type=int, default=2000, help="records for the write figures")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines to verify and show")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=args.dir))
    try:
        figures = run(args.records, args.lines, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>22}  {value}")


if __name__ == "__main__":
    main()
