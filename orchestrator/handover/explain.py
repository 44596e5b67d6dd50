"""A handover plan as operator-readable text: one line per action, then each rule it used
once (from :data:`orchestrator.handover.rules.RULES`). Nothing prints it yet: it is the
rendering a ``migrate --explain`` would show, and what the planner's tests read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from orchestrator.handover.planner import AbortAction, DestAction, Plan, SourceAction
from orchestrator.handover.rules import PUSHED_FORM, RULES, Rule

_PUSH_RULES = {Rule.INBOUND_COPY, Rule.OUTBOUND_COPY, Rule.SNAT_UNNAT, Rule.FULLNAT_LEG,
               Rule.EAST_WEST_COPY}


def render_plan(plan: Plan) -> str:
    """Operator-readable lines: a summary, one line per action, then the rules used."""
    lines = [_summary(plan)]
    lines += [_dest_line(a) for a in plan.dest]
    lines += [_source_line(a) for a in plan.source]
    used = [r for a in plan.dest for r in a.rules] + [a.rule for a in plan.source]
    lines.append("rules:")
    lines += _legend(used)
    return "\n".join(lines)


def render_abort(actions: list[AbortAction]) -> str:
    lines = [f"abort: delete {len(actions)} entries on the destination"]
    lines += [f"D  DELETE   {a.rule.value:<26} {a.key[0]} zone={a.key[1]}" for a in actions]
    lines.append("rules:")
    lines += _legend([a.rule for a in actions])
    return "\n".join(lines)


def _summary(plan: Plan) -> str:
    dest = Counter(a.kind.value for a in plan.dest)
    src = Counter(a.kind.value for a in plan.source)
    return (
        f"handover {plan.guest}: {plan.src} -> {plan.dst}: {len(plan.source)} entries of the "
        f"guest, {plan.ignored} others ignored; D: "
        + ", ".join(f"{n} {k}" for k, n in sorted(dest.items()))
        + "; S: "
        + ", ".join(f"{n} {k}" for k, n in sorted(src.items()))
    )


def _dest_line(a: DestAction) -> str:
    tag = "/".join(r.value for r in a.rules)
    line = f"D  {a.kind.value:<8} {tag:<26} {a.origin.tuple_orig}"
    if a.entry is not None and a.writes:
        line += f"\n     write  {a.entry}"
    line += "".join(f"\n     delete {x}" for x in a.delete)
    return line


def _source_line(a: SourceAction) -> str:
    return f"S  {a.kind.value:<8} {a.rule.value:<26} {a.origin.tuple_orig}"


def _legend(used: Iterable[Rule]) -> list[str]:
    seen = list(dict.fromkeys(used))
    out = [f"  {r.value:<16} {RULES[r]}" for r in seen]
    if _PUSH_RULES & set(seen):
        out.append(f"  {'(written form)':<16} {PUSHED_FORM}")
    return out
