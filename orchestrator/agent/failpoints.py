"""Named fault-injection points for the crash tests (etcd's gofail, in small).

``CONVERGENT_FAILPOINTS="cutover.claimed=kill,precopy.synced=sleep:2"``: at ``kill`` the agent
SIGKILLs itself right there (a crash at an exact point of a phase); ``sleep:S`` stalls it so
a test can kill it from outside. Unset in production, where every point is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import signal

from orchestrator.errors import ConfigError

ENV = "CONVERGENT_FAILPOINTS"


def parse(spec: str) -> dict[str, tuple[str, float]]:
    points: dict[str, tuple[str, float]] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = item.partition("=")
        kind, _, arg = action.partition(":")
        if kind not in ("kill", "sleep") or (kind == "sleep" and not arg):
            raise ConfigError(f"{ENV}: {item!r}: want NAME=kill or NAME=sleep:SECONDS")
        try:
            points[name] = (kind, float(arg or 0))
        except ValueError:
            raise ConfigError(f"{ENV}: {item!r}: {arg!r} is not a number") from None
    return points


class Failpoints:
    def __init__(self, spec: str | None = None) -> None:
        self.points = parse(os.environ.get(ENV, "") if spec is None else spec)

    async def __call__(self, name: str) -> None:
        kind, arg = self.points.get(name, ("", 0.0))
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sleep":
            await asyncio.sleep(arg)
