"""Run the lab's hook (``hooks/lab``) as a hypervisor runs its own: a process of its own,
``python3 -I -S``, a bare environment, the node's hook settings (``hook.json``). The lab
hypervisor runs it at each moment of a move; ``lab up`` at each guest's start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.config.schema import AgentSettings
from orchestrator.errors import LabError

DEFAULT_TIMEOUT_S = 1.5


def hook_path() -> Path:
    """The lab's hook executable (installed with the hooks as ``orchestrator/hooks/lab``)."""
    return Path(str(resources.files("orchestrator.hooks") / "lab"))


def hook_conf(lab_dir: Path, node: str, agent: AgentSettings,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> Path:
    """The node's hook settings (an installed hook's ``hook.json``), written again only
    when they change (the hook reads its timeout there: a caller's own must not be lost to
    whichever caller came first)."""
    path = lab_dir / "hooks" / f"{node}.json"
    conf = {"socket": str(agent.socket(node)), "spool_dir": str(agent.spool(node)),
            "timeout_s": timeout_s, "node": node}
    try:
        if json.loads(path.read_text()) == conf:
            return path
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(conf))
    tmp.replace(path)
    return path


async def run_hook(conf: Path, argv: list[str], timeout_s: float) -> dict[str, Any]:
    """The verdict the hook printed (what the agent answered, or that it spooled), with
    ``hook``: its exit status and wall time."""
    cmd = [sys.executable, "-I", "-S", str(hook_path()), *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "CONVERGENT_HOOK_CONF": str(conf)}
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s + 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"the lab hook {' '.join(argv)} ran past its timeout") from None
    except asyncio.CancelledError:
        # a hypervisor does not kill its hook half-way: let it deliver (it is bounded by
        # its own timeout), so what the caller sends next (failed) comes after it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout_s + 5)
        raise
    try:
        verdict: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LabError(f"the lab hook {' '.join(argv)} answered nothing readable (exit "
                       f"{proc.returncode}): {err.decode()[-300:]}") from None
    verdict["hook"] = {"exit": proc.returncode,
                       "ms": round((time.monotonic() - start) * 1000, 1)}
    return verdict
