"""The error a user can fix: bad config, paths, needles, checkpoints, head lists.

Commands (rhead_jax.cli.run) print it as one line `error: ...` and exit with status 2; any other
exception is a bug and keeps its traceback. It subclasses ValueError so library callers can catch
it like any bad-argument error.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and says what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (also a FileNotFoundError for old callers)."""


class Preempted(Exception):
    """The run got a preemption notice (SIGTERM) and stopped between result writes; the same
    command resumes it. Commands (rhead_jax.cli.run) print `preempted: ...` and exit with
    `exit_status` (128 + SIGTERM, what a shell reports for a process SIGTERM ended)."""

    exit_status = 143
