"""The agent as a service: signals, systemd notifications, reloads.

SIGTERM / SIGINT stop it (``STOPPING=1`` at once, an ``agent.stop`` audit record naming the
signal); SIGHUP re-reads the cluster file: a file that does not parse or cannot be taken
live is refused with its reasons (log and ``agent.reload`` audit record, outcome failed)
and the running configuration stays. ``READY=1`` goes out once the agent serves its API,
and again after each reload; with ``WatchdogSec=`` the event loop pings systemd, so a hung
agent is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import structlog

from orchestrator.agent.daemon import Agent
from orchestrator.agent.notify import Notifier
from orchestrator.config.loader import load
from orchestrator.errors import ConvergentError

log = structlog.get_logger("convergent.agent")


async def serve(agent: Agent, config_path: Path, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()

    def on_stop(sig: signal.Signals) -> None:
        agent.stop_reason = f"signal {sig.name}"
        if not stop.is_set():
            _quietly(notifier.stopping, f"stopping on {sig.name}")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
    run = asyncio.create_task(agent.run(stop))
    helpers: list[asyncio.Task[None]] = []
    try:
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if agent.ready.is_set():
            _quietly(notifier.ready, _status(agent))
            helpers.append(asyncio.create_task(_reload_loop(agent, config_path, notifier,
                                                            reloads)))
            if notifier.watchdog_s:
                helpers.append(asyncio.create_task(_watchdog(notifier)))
        await run
    finally:
        for t in helpers:
            t.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def reload(agent: Agent, config_path: Path) -> list[str]:
    """One SIGHUP: the reasons the file was refused, or [] when it now runs."""
    try:
        new = await asyncio.to_thread(load, config_path)
    except ConvergentError as exc:
        problems = str(exc).splitlines()
    else:
        problems = await agent.reload(new)
    if problems:
        log.error("config.reload_refused", file=str(config_path), problems=problems)
    else:
        log.info("config.reloaded", file=str(config_path))
    with contextlib.suppress(Exception):
        await agent.audit.arecord("agent.reload", outcome="failed" if problems else "ok",
                                  detail="; ".join(problems) or f"{config_path} applied")
    return problems


async def _reload_loop(agent: Agent, config_path: Path, notifier: Notifier,
                       reloads: asyncio.Queue[None]) -> None:
    while True:
        await reloads.get()
        _quietly(notifier.reloading)
        problems = await reload(agent, config_path)
        status = f"reload refused: {problems[0]}" if problems else _status(agent)
        _quietly(notifier.ready, status)


async def _watchdog(notifier: Notifier) -> None:
    assert notifier.watchdog_s
    while True:
        _quietly(notifier.watchdog)
        await asyncio.sleep(notifier.watchdog_s / 2)


def _status(agent: Agent) -> str:
    return f"serving {agent.node} on {agent.settings.socket(agent.node)}"


def _quietly(send: Callable[..., bool], *args: str) -> None:
    """systemd gone or its socket full is no reason to stop serving."""
    try:
        send(*args)
    except OSError as exc:
        log.warning("systemd.notify_failed", error=str(exc))
