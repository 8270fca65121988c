"""Errors a user can fix, with the exit code of each kind.

Every failure a user can act on is one of these: its message names the key, file or sample and the fix, and the
command-line entry points print it as one ``error: ...`` line (no traceback) and exit with :attr:`exit_code`:

====  ==========================================================================================
 2    usage and configuration (bad key or value, unknown option, a file that is not UTF-8)
 3    data (a path that does not exist, an unreadable image or shard member, a bad pairs file)
 4    checkpoints and run folders (missing or corrupt checkpoint, a run folder that already holds a run,
      a resume whose config differs from the checkpoint's)
 5    the run itself stopped (non-finite losses in a row)
130   interrupted by SIGINT (Ctrl-C), after writing a checkpoint
143   terminated by SIGTERM (what schedulers send before a kill), after writing a checkpoint
====  ==========================================================================================
"""
from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "DualEMC2Error", "RunStopped", "UsageError", "exit_code_of"]


class DualEMC2Error(Exception):
    """Base of the errors a user can fix; ``exit_code`` is what the command line exits with."""

    exit_code = 2


class UsageError(DualEMC2Error, ValueError):
    """A bad command line, configuration key or value."""

    exit_code = 2


class DataError(DualEMC2Error, ValueError):
    """Data that cannot be read: the message names the file or sample and the fix (e.g. ``data.on_bad_sample``)."""

    exit_code = 3


class CheckpointError(DualEMC2Error, ValueError):
    """A missing or corrupt checkpoint, a run folder that already holds a run, or a resume that does not match."""

    exit_code = 4


class RunStopped(DualEMC2Error, RuntimeError):
    """Training stopped itself (e.g. non-finite losses); the message says what was kept."""

    exit_code = 5


def exit_code_of(err: BaseException) -> int:
    """The exit code of ``err``: its ``exit_code`` for project errors, 2 for anything else reported to the user."""
    return int(getattr(err, "exit_code", 2))
