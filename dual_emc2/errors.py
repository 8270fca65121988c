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

import re

__all__ = ["CheckpointError", "DataError", "DualEMC2Error", "Interrupted", "RunStopped", "UsageError", "exit_code_of"]


class DualEMC2Error(Exception):
    """Base of the errors a user can fix; ``exit_code`` is what the command line exits with.

    Raised in a DataLoader worker process, such an error reaches the main process re-built by torch as
    ``type(err)("Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...")``; the constructor
    recognises that text and keeps only the original message (the worker's traceback stays in
    :attr:`worker_traceback`), so the user still sees one line naming the file and the fix.

    Args:
        *args: the message (one string), as for :class:`Exception`.

    Example::

        try:
            run()
        except DualEMC2Error as err:
            print(f"error: {err}")
            raise SystemExit(err.exit_code)
    """

    exit_code = 2
    worker_traceback: str | None = None

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            original = _original_message(args[0], type(self))
            if original is not None:
                self.worker_traceback = args[0]
                args = (original,)
        super().__init__(*args)


class UsageError(DualEMC2Error, ValueError):
    """A bad command line, configuration key or value (exit code 2).

    Example::

        raise UsageError("--k must be an int >= 1, got 0")
    """

    exit_code = 2


class DataError(DualEMC2Error, ValueError):
    """Data that cannot be read: the message names the file or sample and the fix (e.g. ``data.on_bad_sample``);
    exit code 3.

    Example::

        raise DataError("pairs.tsv:12: expected 2 tab-separated columns, got 1")
    """

    exit_code = 3


class CheckpointError(DualEMC2Error, ValueError):
    """A missing or corrupt checkpoint, a run folder that already holds a run, or a resume that does not match
    (exit code 4).

    Example::

        raise CheckpointError("train.resume must be 'latest' or a checkpoint path, got 3")
    """

    exit_code = 4


class RunStopped(DualEMC2Error, RuntimeError):
    """Training stopped itself (e.g. non-finite losses); the message says what was kept (exit code 5).

    Example::

        raise RunStopped("5 non-finite losses in a row at step 1200; checkpoint ckpt-00001000.pt kept")
    """

    exit_code = 5


class Interrupted(DualEMC2Error, KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was written; exit code 128 + the signal number.

    Args:
        message: what was written and how to resume.
        signum: the signal number (``signal.SIGINT`` → exit code 130, ``signal.SIGTERM`` → 143).

    Example::

        raise Interrupted("interrupted at step 1200; resume with train.resume=latest", signal.SIGTERM)
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


_RERAISED = re.compile(r"\ACaught (\w+) (.*?)\.\nOriginal Traceback", re.S)


def _original_message(text: str, cls: type) -> str | None:
    """The message of the original error inside torch's re-raise text of an exception from a worker, or None."""
    m = _RERAISED.match(text)
    if m is None or m.group(1) != cls.__name__:
        return None
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    cut = text.rfind(marker)
    if cut < 0:
        marker = f"\n{cls.__qualname__}: "
        cut = text.rfind(marker)
    return text[cut + len(marker):].rstrip("\n") if cut >= 0 else None


def exit_code_of(err: BaseException) -> int:
    """The exit code of ``err``: its ``exit_code`` for project errors, 2 for anything else reported to the user."""
    return int(getattr(err, "exit_code", 2))
