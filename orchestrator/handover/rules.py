"""Why the handover planner decides what it decides: the one table of rules.

Every action the planner returns names rules from :data:`RULES`; nothing else in the planner
carries prose. ``explain.render_plan`` turns a plan into lines an operator reads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Rule(enum.Enum):
    # how one of S's entries translates for D (or why D gets nothing)
    INBOUND_COPY = "inbound-copy"
    OUTBOUND_COPY = "outbound-copy"
    SNAT_UNNAT = "snat-unnat"
    FULLNAT_LEG = "fullnat-leg"
    EAST_WEST_COPY = "east-west-copy"
    DYING = "dying"
    TCP_CLOSED = "tcp-closed"
    HALF_OPEN = "half-open"
    SNAT_REMAPPED = "snat-remapped"
    SNAT_ELSEWHERE = "snat-elsewhere"
    SNAT_HOME_BINDING = "snat-home-binding"
    GATEWAY_LOCAL = "gateway-local"
    UNSUPPORTED_NAT = "unsupported-nat"
    DUPLICATE = "duplicate"
    # how the translated entry meets what D already has
    D_ABSENT = "d-absent"
    D_SAME = "d-same"
    D_DIFFERS = "d-differs"
    D_CLASH = "d-clash"
    D_HOMECOMING = "d-homecoming"
    D_OWNS_NAT = "d-owns-nat"
    # what S does with its own entry
    S_LIBERAL = "s-liberal"
    S_KEEP = "s-keep"
    S_KEEP_SNAT = "s-keep-snat"
    S_ENDING = "s-ending"
    # undoing D's side
    ABORT_PUSHED = "abort-pushed"


PUSHED_FORM = (
    "every entry D writes: status SEEN_REPLY|ASSURED|CONFIRMED (the kernel refuses an add "
    "without CONFIRMED; NAT, DYING and the other bits are dropped), zone and timeout copied "
    "with a floor of min_timeout (default 30 s: covers the cutover, then expires like the "
    "kernel's own UDP/ICMP default if the flow stays idle), TCP state and window scales "
    "copied, of the TCP flags only WINDOW_SCALE, SACK_PERM, CLOSE_INIT (the companions of "
    "MAXACK_SET and friends do not travel) plus BE_LIBERAL both ways"
)

RULES: dict[Rule, str] = {
    Rule.INBOUND_COPY: (
        "client -> guest flow (stateless DNAT): same tuples, same mark; the mark names the "
        "entry node whose public address D's spoof rule writes on the replies"
    ),
    Rule.OUTBOUND_COPY: (
        "guest -> outside flow already un-NATed by an earlier handover: same tuples, same "
        "mark; the mark names the node that still holds the SNAT binding"
    ),
    Rule.SNAT_UNNAT: (
        "guest-initiated SNAT flow: reply = original reversed, mark tag = S; D spoofs the "
        "source to S's public address, the peer's replies still reach S, which de-SNATs and "
        "bridges them to D (copying the binding as NAT kills the flow, FACTS.md)"
    ),
    Rule.FULLNAT_LEG: (
        "full-NAT flow entered through S: the NAT binding stays on S; D gets the bridged leg "
        "(S's guest-side address <-> guest), exactly what it holds for flows full-NATed by "
        "any other entry node, so it never picks the leg up mid-stream"
    ),
    Rule.EAST_WEST_COPY: (
        "flow inside the guest subnet (guests, node guest-side addresses, full-NAT legs of "
        "other entry nodes): D only bridges it; a copy spares a mid-stream pickup, which "
        "fails with tcp_loose=0"
    ),
    Rule.DYING: "DYING on S: the kernel is destroying it; a copy would resurrect a dead flow",
    Rule.TCP_CLOSED: (
        "TCP CLOSE or TIME_WAIT: the connection is over; a copy only holds its tuple on D"
    ),
    Rule.HALF_OPEN: (
        "TCP opened towards the guest, never answered: the client's SYN retransmit recreates "
        "it on D within a second; skipping keeps SYN floods out of the handover and out of "
        "ASSURED on D"
    ),
    Rule.SNAT_REMAPPED: (
        "S's SNAT changed the port or ICMP id: D's spoof rule rewrites the address only, so "
        "the peer would see another port (maybe another flow's); it cannot survive the move; "
        "S keeps the binding"
    ),
    Rule.SNAT_ELSEWHERE: (
        "SNAT to an address that is not S's public address: no spoof rule can reproduce it; "
        "S keeps the binding"
    ),
    Rule.SNAT_HOME_BINDING: (
        "SNAT binding anchored at D's own public address, held by S while S answered for it "
        "(a failover): D takes the binding back as it is (NATed reply, SRC_NAT, D's tag), "
        "exactly what D's SNAT rule made; D un-SNATs the replies itself once its address is "
        "back (a failback)"
    ),
    Rule.GATEWAY_LOCAL: (
        "peer is the shared gateway address, i.e. S's own stack; after cutover the gateway "
        "answers on D, whose stack has no socket for this flow"
    ),
    Rule.UNSUPPORTED_NAT: (
        "a NAT shape convergent's ruleset does not produce (or asymmetric tuples without NAT "
        "status): nothing D could translate; S keeps it"
    ),
    Rule.DUPLICATE: (
        "an earlier entry of this plan already claims this tuple (dumps can repeat entries); "
        "the kernel would refuse the second one"
    ),
    Rule.D_ABSENT: "D has nothing on these tuples: add",
    Rule.D_SAME: "D already has it (timeout at least min_timeout is good enough): nothing to do",
    Rule.D_DIFFERS: (
        "D has this flow the same way round but with other state, mark or an expiring timeout: "
        "update in place (set)"
    ),
    Rule.D_CLASH: (
        "D holds entries on these tuples that set cannot fix (the reply the other way, a NAT "
        "binding of D's own, DYING, the opposite orientation): delete them, then add"
    ),
    Rule.D_HOMECOMING: (
        "the flow's public address is D's and D still holds its SNAT binding (the guest comes "
        "back): keep D's binding, refresh its TCP state, timeout and BE_LIBERAL from S"
    ),
    Rule.D_OWNS_NAT: (
        "the flow entered through D, whose full-NAT binding already carries it; the guest is "
        "now local to D's stack, so the bridged leg must not be added (it would clash)"
    ),
    Rule.S_LIBERAL: (
        "S sees only one direction once the guest left; without BE_LIBERAL the other one is "
        "INVALID and the flow dies (FACTS.md); set the flag only, keep the entry and any SNAT "
        "binding"
    ),
    Rule.S_KEEP: "never deleted on S: it expires on its own, and an aborted move needs it",
    Rule.S_KEEP_SNAT: (
        "SNAT binding: S stays on the return path (the peer answers S's address) until the "
        "flow ends"
    ),
    Rule.S_ENDING: "DYING or closed: nothing to adjust, left to expire",
    Rule.ABORT_PUSHED: (
        "written by this migration (add or delete-then-add): removed on abort. Entries D had "
        "before and only updated stay (set cannot take back ASSURED; they are valid for D as "
        "an entry node); entries a clash deleted are not restored (D's own artifacts of a "
        "flow that now stays on S; a NAT binding cannot be re-created by copy)"
    ),
}


def reason(rules: Iterable[Rule]) -> str:
    return "; ".join(RULES[r] for r in rules)
