"""One base error with a readable message; the CLI prints it as one line and exits non-zero."""


class ConvergentError(Exception):
    """Anything an operator should read instead of a traceback (exit status 1)."""

    exit_code = 1


class Degraded(ConvergentError):
    """The command did its job but not all of it (exit status 3): some entries refused,
    a migration without part of its handover. What was done is printed before it."""

    exit_code = 3


class ConfigError(ConvergentError):
    pass


class RulesetError(ConvergentError):
    pass


class LabError(ConvergentError):
    pass


class NetlinkError(ConvergentError):
    pass


class StoreError(ConvergentError):
    pass


class MigrationError(ConvergentError):
    pass


class UnknownName(ConvergentError, KeyError):
    """A node or guest name that is not in the cluster config. Still a KeyError for the
    callers that look names up speculatively; its text is one readable line."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r} (known: {', '.join(known) or 'none'})")
        self.kind, self.name = kind, name

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])
