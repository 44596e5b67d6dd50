"""One base error with a readable message; the CLI prints it as one line and exits non-zero."""


class ConvergentError(Exception):
    """Anything an operator should read instead of a traceback."""


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
