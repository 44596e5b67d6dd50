"""Ownership store figures: ``python -m bench.store --json``.

claim        one compare-and-swap claim of a guest's address (moving it between two nodes
             at its current epoch), p50/p99 over ``--claims`` claims, on SQLite (a file,
             fsync'd: synchronous=FULL) and on a real 3-member etcd cluster (Debian's
             etcd-server, members on Unix sockets in one directory, fsync'd), same run
claim_4      the same for a guest with 4 addresses (one transaction)
contended    two clients claiming one address at once, each round exactly one wins:
             rounds/s and the check that every round had one winner
failover     (root) a dead node n1 holding 1,000 guest addresses (its guests, lost) and
             10,000 replicated SNAT entries anchored at its address (of guests now on n2),
             failed over to n3 by the agent's real code: plan from the store and the cache,
             the adoption CAS, the 10,000 entries into a real kernel table in a namespace
             with n3's ruleset (with their binding), maps + address + gratuitous ARP, the
             1,000 addresses released; timed from the call to its return, every entry then
             checked in the kernel. On each store.
failback     (root) then n1 back (its own namespace and ruleset, an empty table, fenced):
             the agents' own failback takes the 10,000 entries (with their binding) and the
             address back from n3; timed from the call to its return, every entry then
             checked in n1's kernel and gone from n3's (n3's side called in process)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from orchestrator.errors import StoreError
from orchestrator.lab.etcd import EtcdCluster
from orchestrator.logs import configure as configure_logs
from orchestrator.store import EpochConflict, Store, open_store


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples_s]
    return {"p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


async def register(store: Store) -> None:
    for i in (1, 2):
        await store.upsert_node(f"n{i}", i, f"0{2 * i}:00", f"192.168.122.1{i}")


async def claims(store: Store, n: int, width: int, net: int) -> dict[str, float]:
    ips = [f"10.9.{net}.{i}" for i in range(width)]
    samples = []
    for epoch in range(n):  # each claim at the epoch the previous one left
        t = time.perf_counter()
        await store.claim_all(dict.fromkeys(ips, epoch), f"n{epoch % 2 + 1}", "web")
        samples.append(time.perf_counter() - t)
    return summary(samples)


async def contended(url: str, rounds: int) -> dict[str, Any]:
    """Two stores (two connections) claim the same address at the same epoch each round."""
    async with await open_store(url) as a, await open_store(url) as b:
        ip, one_winner, start = "10.9.99.1", 0, time.perf_counter()
        for r in range(rounds):
            results = await asyncio.gather(a.claim(ip, "n1", "web", r),
                                           b.claim(ip, "n2", "web", r), return_exceptions=True)
            wins = [x for x in results if not isinstance(x, BaseException)]
            lost = [x for x in results if isinstance(x, EpochConflict)]
            one_winner += len(wins) == 1 and len(lost) == 1
        took = time.perf_counter() - start
    return {"rounds": rounds, "rounds_per_s": round(rounds / took, 1),
            "every_round_one_winner": one_winner == rounds}


async def backend(url: str, n: int, rounds: int) -> dict[str, Any]:
    async with await open_store(url) as store:
        await register(store)
        await claims(store, 20, 1, 0)  # warm up: connections, WAL, leader
        out = {"claim": await claims(store, n, 1, 1), "claim_4": await claims(store, n, 4, 2)}
    out["contended"] = await contended(url, rounds)
    return out


def run_failover(url: str, tmp: Path) -> dict[str, Any]:
    from bench.failover_setup import failover_once

    return asyncio.run(failover_once(url, tmp))


def run(main: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    return asyncio.run(main())


def measure(n: int, rounds: int, failover: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="cvb-store-") as tmp:
        url = f"sqlite://{Path(tmp) / 'store.db'}"
        result["sqlite"] = run(lambda: backend(url, n, rounds))
        if failover:
            result["sqlite"]["failover"] = run_failover(f"sqlite://{Path(tmp) / 'fo.db'}",
                                                        Path(tmp))
    with EtcdCluster.create(["m1", "m2", "m3"]) as cluster, \
            tempfile.TemporaryDirectory(prefix="cvb-store-") as tmp:
        cluster.start()
        cluster.wait_ready()
        result["etcd"] = run(lambda: backend(cluster.url("/bench"), n, rounds))
        result["etcd"]["members"] = 3
        if failover:
            result["etcd"]["failover"] = run_failover(cluster.url("/bench-fo"), Path(tmp))
    result["load_after"] = os.getloadavg()[0]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--claims", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-failover", action="store_true", help="skip the failover (root)")
    args = ap.parse_args(argv)
    configure_logs("warning")  # stdout is the JSON; the agent code's logs go to stderr
    try:
        result = measure(args.claims, args.rounds,
                         not args.no_failover and os.geteuid() == 0)
    except StoreError as exc:
        print(f"bench.store: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("sqlite", "etcd"):
            r = result[name]
            print(f"{name:7} claim p50 {r['claim']['p50_ms']} ms p99 {r['claim']['p99_ms']} ms;"
                  f" 4 addresses p50 {r['claim_4']['p50_ms']} ms; contended "
                  f"{r['contended']['rounds_per_s']} rounds/s")
            if "failover" in r:
                f = r["failover"]
                print(f"        failover {f['total_ms']} ms ({f['steps_ms']}), "
                      f"{f['in_kernel']}/{f['entries']} entries in the kernel")
                b = f["failback"]
                print(f"        failback {b['total_ms']} ms ({b['steps_ms']}), "
                      f"{b['in_kernel_with_binding']}/{f['entries']} entries back in n1's kernel")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
