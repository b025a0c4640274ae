"""The project's own exceptions: every one names the file (or config key) and the problem."""

from __future__ import annotations

import os


class AvsegError(Exception):
    """Base class of avseg's own errors."""


class PathError(AvsegError, ValueError):
    """Base of the errors about one file: ``path`` and ``problem``, the message ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuild from (path, problem), not from the formatted message: submitit and DDP send
        # exceptions between processes by pickling them.
        return (type(self), (self.path, self.problem))


class DataError(PathError):
    """A data file is missing, unreadable or malformed. The message starts with the file's path."""


class UnsafePickleError(DataError):
    """A pickle asks for something other than a plain tensor (it may try to run code)."""


class CheckpointError(PathError):
    """A checkpoint or weights file cannot be used: truncated, wrong format, or keys that do not fit."""


class ConfigError(AvsegError, ValueError):
    """A config value is out of range. The message names the key and the allowed values."""


class UsageError(ConfigError):
    """A command line that cannot be read: a malformed argument, a key the command does not have, no
    or an unknown subcommand (exit status 2 where a command distinguishes it from other errors)."""
