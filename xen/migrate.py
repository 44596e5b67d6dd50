"""``xl migrate`` as convergent runs it (pure): the command line and what each line xl
prints means.

xl prints its handshake on stderr, and the receiver's lines come back through the ssh
transport on the same stderr (tools/xl/xl_migrate.c). In order:

    migration target: Ready to receive domain.                          (D)
    migration target: Transfer complete, requesting permission to start domain.   (D)
    migration sender: Target has acknowledged transfer.                 (S: suspended, D has it all)
    migration sender: Giving target permission to start.                (S renamed itself away)
    migration target: Got permission, starting domain.                  (D)
    migration target: Domain started successsfully.                     (D: renamed, unpaused)
    migration sender: Target reports successful startup.               (S)
    Migration successful.                                               (S destroyed its copy)

(sic: "successsfully" is xl's spelling.) A failure ends with one of the ``Migration
failed`` lines or ``Target reports startup failure``; after "Giving target permission" a
cancellation can no longer keep the guest on the source.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.hypervisor import Progress

GO_LINE = "migration sender: Giving target permission to start."
_PERCENT = re.compile(r"(\d{1,3})%")

# (substring, phase) in the order xl prints them; the first match wins
_MARKS: tuple[tuple[str, str], ...] = (
    ("migration target: Ready to receive domain", "starting"),
    ("migration target: Transfer complete", "paused"),
    ("migration sender: Target has acknowledged transfer", "paused"),
    ("migration target: Domain started succ", "resumed"),  # any number of s
    ("migration sender: Target reports successful startup", "resumed"),
    ("Migration successful", "done"),
    ("Target reports startup failure", "aborted"),
    ("Migration failed", "aborted"),
    ("Migration failed during final handshake", "aborted"),
    ("migration target: Domain creation failed", "aborted"),
    ("migration target: Failure, destroying our copy", "aborted"),
)
_ORDER = ("starting", "memory", "paused", "resumed", "done")


@dataclass(frozen=True)
class MigrateOptions:
    """What ``xl migrate`` takes from the operator: ``-C`` (the config the destination
    uses), ``-p`` (leave it paused there), ``--debug``, ``-s`` (the ssh command)."""

    config: str | None = None
    pause: bool = False
    debug: bool = False
    ssh: str | None = None
    extra: tuple[str, ...] = ()


def migrate_argv(xl: Sequence[str], domain: str, host: str, opts: MigrateOptions) -> list[str]:
    argv = [*xl, "migrate"]
    if opts.ssh is not None:
        argv += ["-s", opts.ssh]
    if opts.config:
        argv += ["-C", opts.config]
    if opts.pause:
        argv.append("-p")
    if opts.debug:
        argv.append("--debug")
    return [*argv, *opts.extra, domain, host]


def classify(line: str) -> Progress | None:
    """The phase a line of xl's output marks, if any."""
    text = line.strip()
    for mark, phase in _MARKS:
        if mark in text:
            return Progress(phase, text)
    m = _PERCENT.search(text)
    if m and int(m.group(1)) <= 100:  # libxc's stream progress
        return Progress("memory", text, int(m.group(1)) / 100)
    return None


class ProgressTracker:
    """Passes on each phase once and in order (the receiver's and the sender's lines both
    mark some), memory fractions as they grow; remembers whether GO was given."""

    def __init__(self) -> None:
        self.reached = -1
        self.go_given = False
        self.aborted: str | None = None
        self.tail: list[str] = []

    def feed(self, line: str) -> Progress | None:
        text = line.strip()
        if text:
            self.tail = [*self.tail[-7:], text]
        if text == GO_LINE:
            self.go_given = True
        p = classify(text)
        if p is None:
            return None
        if p.phase == "aborted":
            if self.aborted is None:
                self.aborted = text
                return p
            return None
        rank = _ORDER.index(p.phase)
        if rank < self.reached or (rank == self.reached and p.phase != "memory"):
            return None
        self.reached = rank
        return p
