"""The adapter's I/O: xenstore-utils and xl, run as commands (the same in the lab, where
stand-ins of the same names are on PATH). One small seam: ``Tools.run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.hypervisor import HypervisorError

from .xllist import XlDomain, XlState, parse_list, parse_list_long

_HOME = re.compile(r"/local/domain/(\d+)(/name)?")


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


@dataclass(frozen=True)
class Tools:
    xl: tuple[str, ...] = ("xl",)
    timeout_s: float = 30.0
    env: Mapping[str, str] | None = None  # added to the agent's own environment

    def environ(self) -> dict[str, str] | None:
        return None if not self.env else {**os.environ, **self.env}

    async def run(self, argv: Sequence[str]) -> Result:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self.environ())
        except OSError as exc:
            raise HypervisorError(f"{argv[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HypervisorError(f"{' '.join(argv)}: no answer in {self.timeout_s} s") from None
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(errors="replace"),
                      err.decode(errors="replace"))

    # xenstore -------------------------------------------------------------
    async def xs_read(self, path: str) -> str | None:
        res = await self.run(["xenstore-read", path])
        return res.out.rstrip("\n") if res.rc == 0 else None

    async def xs_list(self, path: str) -> list[str]:
        res = await self.run(["xenstore-list", path])
        if res.rc != 0:
            raise HypervisorError(f"xenstore-list {path}: {_last(res.err)}")
        return res.out.split()

    async def domain_names(self) -> dict[int, str]:
        """domid -> current name, for every domain but dom0."""
        names = {}
        for entry in await self.xs_list("/local/domain"):
            if entry.isdigit() and entry != "0":
                name = await self.xs_read(f"/local/domain/{entry}/name")
                if name is not None:
                    names[int(entry)] = name
        return names

    async def watch_domains(self) -> AsyncIterator[int | None]:
        """``xenstore-watch /local/domain``: the domid whose home or name changed, None for
        "anything may have" (the first event, fired on registration). Ends when the watch
        process does."""
        proc = await asyncio.create_subprocess_exec(
            "xenstore-watch", "/local/domain", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=self.environ(), start_new_session=True)
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                path = line.decode(errors="replace").strip()
                if path == "/local/domain":
                    yield None
                    continue
                m = _HOME.fullmatch(path)
                if m is not None:
                    yield int(m.group(1))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # the watch and what it runs (the stand-in's tail)
            await proc.wait()

    # xl -------------------------------------------------------------------
    async def list_long(self) -> list[XlDomain]:
        res = await self.run([*self.xl, "list", "-l"])
        if res.rc != 0:
            raise HypervisorError(f"xl list -l: {_last(res.err)}")
        try:
            return parse_list_long(res.out)
        except ValueError as exc:
            raise HypervisorError(str(exc)) from None

    async def state(self, domid: int) -> XlState | None:
        """The domain's flags, None if it no longer exists."""
        res = await self.run([*self.xl, "list", str(domid)])
        if res.rc != 0:
            return None
        try:
            rows = parse_list(res.out)
        except ValueError as exc:
            raise HypervisorError(str(exc)) from None
        return next((r for r in rows if r.domid == domid), None)


def _last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"
