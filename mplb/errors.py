"""Exceptions raised by library code; only mplb.cli turns them into messages and exit codes."""


class MplbError(Exception):
    """Base of every error mplb reports to the operator."""


class ConfigError(MplbError):
    """A configuration problem, reported as ``FILE:LINE: message``."""

    def __init__(self, message, file=None, line=None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line

    def __str__(self):
        if self.file and self.line:
            return f"{self.file}:{self.line}: {self.message}"
        if self.file:
            return f"{self.file}: {self.message}"
        return self.message


class StartupError(MplbError):
    """The master could not start (bind failure, shared memory, worker boot failure)."""
