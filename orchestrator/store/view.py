"""The cluster as the store sees it (``convergent status``): nodes alive or dead by their
lease, who holds which public address, guests and their owners, migrations in flight."""

from __future__ import annotations

from typing import Any

from orchestrator.store.base import Store


async def cluster_view(store: Store) -> dict[str, Any]:
    snap = await store.snapshot()
    live = {v.node: v for v in await store.list_liveness()}
    nodes = {}
    for n in snap.nodes:
        v = live.get(n.name)
        nodes[n.name] = {"alive": bool(v and v.alive), "tag": n.tag, "pub_ip": str(n.pub_ip),
                         "lease_ttl_s": v.ttl if v else 0.0,
                         "lease_left_s": v.remaining if v else 0.0}
    public = {p.node: {"address": str(p.ip), "holder": p.holder, "epoch": p.epoch,
                       "adopted": p.adopted} for p in snap.public}
    guests: dict[str, dict[str, Any]] = {}
    for o in snap.ownership:
        g = guests.setdefault(o.guest, {"addresses": {}, "owners": set()})
        g["addresses"][str(o.ip)] = {"node": o.node, "epoch": o.epoch}
        g["owners"].add(o.node)
    for g in guests.values():
        g["owners"] = sorted(g["owners"])
    migrations = [{"id": m.id, "guest": m.guest, "from": m.src, "to": m.dst,
                   "phase": str(m.phase), "started": m.started} for m in snap.migrations]
    return {"revision": snap.revision, "nodes": nodes, "public": public, "guests": guests,
            "migrations": migrations}


def render_view(view: dict[str, Any]) -> list[str]:
    lines = ["nodes:"]
    for name, n in sorted(view["nodes"].items()):
        state = (f"alive ({n['lease_left_s']:g} s of {n['lease_ttl_s']:g} s left)"
                 if n["alive"] else "DEAD (no lease)")
        pub = view["public"].get(name)
        held = ""
        if pub is not None:
            held = (f", {pub['address']} adopted by {pub['holder']} (epoch {pub['epoch']})"
                    if pub["adopted"] else f", holds {pub['address']}")
        lines.append(f"  {name:<8} tag {n['tag']:<3} {state}{held}")
    lines.append("guests:")
    for guest, g in sorted(view["guests"].items()):
        addrs = ", ".join(f"{ip}@{a['node'] or '-'}" for ip, a in sorted(g["addresses"].items()))
        lines.append(f"  {guest:<12} {addrs}")
    for m in view["migrations"]:
        lines.append(f"  migrating {m['guest']} {m['from']} -> {m['to']} ({m['phase']})")
    rep = view.get("replicator")
    if rep:
        peers = [str(p.get("node", p)) if isinstance(p, dict) else str(p)
                 for p in rep.get("peers", [])]
        lines.append("replicator peers: " + (", ".join(peers) or "none"))
    return lines
