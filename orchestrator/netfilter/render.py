"""Render a node's whole nftables ruleset from the cluster topology (pure).

The tables follow DESIGN §1 and the seed rulesets (seeds/000, seeds/001). Every table we
own is named ``convergent*`` so apply never touches anyone else's rules, and carries a
comment with the ruleset digest so an unchanged re-apply is a no-op.

Dynamic state (guests hosted here, guests whose handover is in flight) lives in named sets
the agent fills in one transaction; rendering never depends on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from orchestrator.config.schema import Mode, Node, Service, Topology

IP_TABLE = "convergent"
NETDEV_TABLE = "convergent_pipes"

# Named sets in the ip table the agent owns at run time.
SET_LOCAL_GUESTS = "local_guests"  # guest addresses hosted on this node
SET_RACE_GATE = "race_gate"  # guests arriving here whose entries are not committed yet
# failover: public addresses of dead nodes this node answers for (pub ip -> their tag), the
# tags of those nodes, and (netdev) the MAC their frames carry on the pipes (tag -> MAC)
MAP_ADOPTED = "adopted_entry"
SET_ADOPTED_TAGS = "adopted_tags"
MAP_ADOPTED_MACS = "adopted_macs"

# Hook priorities. The stateless DNAT must run before conntrack (-200) so conntrack only
# ever sees client<->guest tuples (the seed found -150 too late); the spoof runs before
# the stateful SNAT (100) so established SNAT flows keep their binding.
PRIO_DNAT = -300
PRIO_RACE_GATE = -150
PRIO_ADOPTED = -140  # after conntrack (-200), before the reply is un-SNATed (dstnat -100)
PRIO_SPOOF = 90
PRIO_PIPES = -500


@dataclass(frozen=True)
class Ruleset:
    node: str
    text: str  # without the digest comment
    digest: str

    def script(self) -> str:
        """The nft script with the digest stamped into each table's comment."""
        return self.text.replace("@DIGEST@", self.digest)


def render(topology: Topology, node_name: str) -> Ruleset:
    node = topology.node(node_name)
    body = "\n".join([_ip_table(topology, node), _netdev_table(topology, node)])
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return Ruleset(node=node.name, text=body, digest=digest)


def table_names() -> list[tuple[str, str]]:
    return [("ip", IP_TABLE), ("netdev", NETDEV_TABLE)]


def _hex(v: int) -> str:
    return f"0x{v:08x}"


def _ip_table(t: Topology, me: Node) -> str:
    c = t.cluster
    net = str(c.guest_subnet)
    lines = [
        f"table ip {IP_TABLE} {{",
        '\tcomment "convergent @DIGEST@"',
        "",
        f"\tset {SET_LOCAL_GUESTS} {{",
        "\t\ttype ipv4_addr",
        '\t\tcomment "guest addresses hosted on this node (agent)"',
        "\t}",
        "",
        f"\tset {SET_RACE_GATE} {{",
        "\t\ttype ipv4_addr",
        '\t\tcomment "guests arriving here, handover not committed yet (agent)"',
        "\t}",
        "",
        f"\tmap {MAP_ADOPTED} {{",
        "\t\ttype ipv4_addr : mark",
        '\t\tcomment "public addresses of dead nodes adopted here -> their tag (failover)"',
        "\t}",
        "",
        f"\tset {SET_ADOPTED_TAGS} {{",
        "\t\ttype mark",
        '\t\tcomment "tags of the nodes whose public address this node adopted (failover)"',
        "\t}",
        "",
        *_notrack_chains(t),
        "\t# stateless DNAT: published services, tagged with this node as the entry",
        "\tchain stateless_dnat {",
        f"\t\ttype filter hook prerouting priority {PRIO_DNAT}; policy accept;",
        *[f"\t\t{r}" for r in _dnat_rules(t, me)],
        "\t}",
        "",
        "\t# replies to an adopted node's SNAT flows (their committed entries carry its tag)",
        "\t# leave on the pipes tagged as that node, so the hosting node keeps spoofing it",
        "\tchain adopted_replies {",
        f"\t\ttype filter hook prerouting priority {PRIO_ADOPTED}; policy accept;",
        f'\t\tiifname "{c.uplink}" meta mark and {_hex(c.tag_mask)} == 0 ct mark and '
        f"{_hex(c.tag_mask)} @{SET_ADOPTED_TAGS} meta mark set ct mark and {_hex(c.tag_mask)}",
        "\t}",
        "",
        "\t# a packet from an arriving guest that would open a new entry before its",
        "\t# handover is committed is dropped (TCP retransmits it), never SNATed",
        "\tchain race_gate {",
        f"\t\ttype filter hook prerouting priority {PRIO_RACE_GATE}; policy accept;",
        f"\t\tip saddr @{SET_RACE_GATE} ct state new tcp flags & (syn | ack) != syn "
        'counter drop comment "race gate: tcp"',
        f"\t\tip saddr @{SET_RACE_GATE} ct state new meta l4proto != tcp "
        'counter drop comment "race gate: other"',
        "\t}",
        "",
        "\t# D-UN-NAT: replies leave with the public address of the node the flow entered",
        "\tchain dunnat_spoof {",
        f"\t\ttype filter hook postrouting priority {PRIO_SPOOF}; policy accept;",
        *[f"\t\t{r}" for r in _port_unrewrite_rules(t, me)],
        *[
            f'\t\toifname "{c.uplink}" ip saddr {net} ct mark and {_hex(c.tag_mask)} == '
            f"{_hex(n.tag)} ip saddr set {n.pub_ip}"
            for n in t.nodes
        ],
        "\t}",
        "",
        "\t# br_netfilter: frames tagged on a pipe (or by our DNAT) name their entry node",
        "\tchain bridge_state {",
        "\t\ttype filter hook postrouting priority 0; policy accept;",
        f'\t\toifname "{c.guest_bridge}" ip daddr {net} meta mark != 0 ct mark set meta mark',
        "\t}",
        "",
        *_nat_chains(t, me),
        "}",
    ]
    return "\n".join(lines)


def _notrack_chains(t: Topology) -> list[str]:
    """Replicator datagrams (DESIGN §4, ct_sync's NOTRACK) on the sync interface never become
    conntrack entries: they would be tracked, evented and (marked) replicated themselves."""
    s = t.sync
    return [
        "\t# replicator traffic is never tracked (ct_sync: NOTRACK on the sync interface)",
        "\tchain sync_notrack_prerouting {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f'\t\tiifname "{s.interface}" udp dport {s.port} notrack comment "replicator"',
        "\t}",
        "",
        "\tchain sync_notrack_output {",
        "\t\ttype filter hook output priority raw; policy accept;",
        f'\t\toifname "{s.interface}" udp dport {s.port} notrack comment "replicator"',
        "\t}",
        "",
    ]


def _l4(svc: Service) -> str:
    return svc.proto


def _dnat_rules(t: Topology, me: Node) -> list[str]:
    rules = []
    for svc in t.services:
        if svc.mode is not Mode.STATELESS:
            continue
        target = t.service_address(svc)
        rewrite = f" {_l4(svc)} dport set {svc.target_port}" if svc.guest_port else ""
        rules.append(
            f'iifname "{t.cluster.uplink}" ip daddr {me.pub_ip} {_l4(svc)} dport {svc.port} '
            f"meta mark set {_hex(me.tag)} ip daddr set {target}{rewrite} "
            f'comment "service {svc.name}"'
        )
        # an adopted address keeps its node's tag (a miss in the map ends the rule)
        rules.append(
            f'iifname "{t.cluster.uplink}" {_l4(svc)} dport {svc.port} '
            f"meta mark set ip daddr map @{MAP_ADOPTED} ip daddr set {target}{rewrite} "
            f'comment "service {svc.name} (adopted)"'
        )
    return rules


def _port_unrewrite_rules(t: Topology, me: Node) -> list[str]:
    """A stateless service that rewrote the port needs the reply's source port put back."""
    rules = []
    for svc in t.services:
        if svc.mode is Mode.STATELESS and svc.guest_port and svc.guest_port != svc.port:
            rules.append(
                f'oifname "{t.cluster.uplink}" ip saddr {t.service_address(svc)} '
                f"{_l4(svc)} sport {svc.guest_port} {_l4(svc)} sport set {svc.port} "
                f'comment "service {svc.name}"'
            )
    return rules


def _nat_chains(t: Topology, me: Node) -> list[str]:
    c = t.cluster
    net = str(c.guest_subnet)
    fullnat = [s for s in t.services if s.mode is Mode.FULLNAT]
    pre = [
        f'\t\tiifname "{c.uplink}" ip daddr {me.pub_ip} {_l4(s)} dport {s.port} '
        f'dnat to {t.service_address(s)}:{s.target_port} comment "service {s.name}"'
        for s in fullnat
    ]
    post_fullnat = [
        f'\t\toifname "{c.guest_bridge}" ip daddr {t.service_address(s)} {_l4(s)} dport '
        f'{s.target_port} ct status dnat snat to {me.guest_ip} comment "service {s.name}"'
        for s in fullnat
    ]
    lines = [
        "\t# FULL-NAT services (seeds/001): replies return through the entry node itself",
        "\tchain fullnat_prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        *pre,
        "\t}",
        "",
        "\t# guest-initiated flows: stateful SNAT, and the mark names this node",
        "\tchain guest_snat {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        *post_fullnat,
        # the replication bit too: every node's receiver keeps these, so a survivor can
        # commit them (with this binding) if this node dies (failover)
        f'\t\toifname "{c.uplink}" ip saddr {net} ct mark set ct mark and '
        f"{_hex(~c.tag_mask & 0xFFFFFFFF)} or {_hex(me.tag | t.sync.mark_bit)} "
        f"snat to {me.pub_ip}",
        "\t}",
    ]
    return lines


def _netdev_table(t: Topology, me: Node) -> str:
    c = t.cluster
    devices = ", ".join(f'"{p}"' for p in me.pipes)
    tag_rules = [
        f"\t\tether saddr & {n.mac_mask} == {n.mac_match} meta mark set {_hex(n.tag)} "
        f'comment "node {n.name}"'
        for n in t.nodes
    ]
    return "\n".join(
        [
            f"table netdev {NETDEV_TABLE} {{",
            '\tcomment "convergent @DIGEST@"',
            "",
            f"\tmap {MAP_ADOPTED_MACS} {{",
            "\t\ttype mark : ether_addr",
            '\t\tcomment "adopted node tag -> its bridge MAC, for frames of its flows"',
            "\t}",
            "",
            "\t# frames from another node's guest bridge carry its MAC prefix: tag them",
            "\tchain pipe_ingress {",
            f"\t\ttype filter hook ingress devices = {{ {devices} }} priority {PRIO_PIPES}; "
            "policy accept;",
            *tag_rules,
            "\t}",
            "",
            "\t# every node answers for the shared gateway itself: keep its ARP off the pipes",
            "\tchain pipe_egress {",
            f"\t\ttype filter hook egress devices = {{ {devices} }} priority {PRIO_PIPES}; "
            "policy accept;",
            f"\t\tarp saddr ip {c.gateway} drop",
            f"\t\tarp daddr ip {c.gateway} drop",
            "\t\t# flows of an adopted node leave as its frames (failover): the hosting node",
            "\t\t# tags them as that node and keeps answering as its public address",
            f"\t\tether type ip ether saddr set meta mark and {_hex(c.tag_mask)} map "
            f"@{MAP_ADOPTED_MACS}",
            "\t}",
            "}",
        ]
    )
