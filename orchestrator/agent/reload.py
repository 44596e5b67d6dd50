"""What a running agent can take from a re-read cluster file (SIGHUP), and what needs a
restart. Pure: the agent asks ``reload_problems`` and applies the new topology only when
the answer is empty; otherwise the old one keeps running and the reasons are logged and
audited.

Live: services, guests, the nodes' bridges, pipes and addresses the ruleset is made of,
and the agent's timers. Restart: what processes, sockets and kernel marks were set up from
at start (the store, paths, ports, the key, the whole ``[sync]`` section, the mark bits,
the replicator's peers: the nodes' names, tags and sync/peer addresses). A key not named
live is restart-only, so a setting added later is safe by default.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from orchestrator.config.schema import Topology

LIVE_AGENT_KEYS = frozenset({"reconcile_interval_s", "migration_timeout_s", "peer_retry_s",
                             "recovery_settle_s"})
# marks already in the kernel's entries; bridge names the node's seams were built on
RESTART_CLUSTER_KEYS = ("tag_mask", "handover_bit", "guest_bridge", "uplink")
# sections taken live (nodes: except the peers, below); agent: only LIVE_AGENT_KEYS; any
# other section ([sync], [hypervisor], one added later) needs a restart
LIVE_SECTIONS = frozenset({"cluster", "nodes", "services", "guests", "lab", "agent"})


def reload_problems(old: Topology, new: Topology, node: str,
                    migrating: Collection[str] = ()) -> list[str]:
    """Why ``new`` cannot replace ``old`` in the running agent of ``node`` (empty: it can)."""
    if node not in {n.name for n in new.nodes}:
        return [f"nodes: this node {node!r} is no longer in the file"]
    problems = []
    if migrating:
        problems.append(f"migrations in flight ({', '.join(sorted(migrating))}): reload once "
                        f"they are done")
    restart = [f"agent.{k}" for k in _changed(old.agent.model_dump(), new.agent.model_dump())
               if k not in LIVE_AGENT_KEYS]
    old_sections, new_sections = old.model_dump(), new.model_dump()
    for section in sorted(old_sections.keys() - LIVE_SECTIONS):
        restart += [f"{section}.{k}" for k in _changed(old_sections[section] or {},
                                                        new_sections[section] or {})]
    restart += [f"cluster.{k}" for k in RESTART_CLUSTER_KEYS
                if getattr(old.cluster, k) != getattr(new.cluster, k)]
    if _peers(old) != _peers(new):
        restart.append("nodes (names, tags, sync_ip or pub_ip: the replicator's and the "
                       "peer channel's peers)")
    if restart:
        problems.append(f"{', '.join(restart)} changed: restart the agent to apply")
    return problems


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _peers(t: Topology) -> set[tuple[str, int, str, str]]:
    return {(n.name, n.tag, str(n.sync_ip), str(n.pub_ip)) for n in t.nodes}
