"""Helpers shared by the command-line entry points: the ``error: ...`` exit with the exit code of
:mod:`dual_emc2.errors`, and the run folder of a checkpoint.  A tool's checkpoint argument is read with
:func:`dual_emc2.train.checkpoint.resolve_checkpoint` (the same reading as the trainer's ``train.resume``); default
configs are the ones packaged in ``dual_emc2/configs`` (:func:`dual_emc2.train.config.find_config`), so nothing here
depends on a repository checkout."""
from __future__ import annotations

import sys
from pathlib import Path

from dual_emc2.errors import DualEMC2Error, exit_code_of

__all__ = ["USER_ERRORS", "fail", "run_folder_of"]

# what the tools report as one ``error: ...`` line instead of a traceback (each tool may add its own)
USER_ERRORS: tuple[type[BaseException], ...] = (DualEMC2Error, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError, PermissionError)


def fail(err: BaseException | str, code: int | None = None) -> int:
    """Print ``error: <err>`` on stderr and return the exit code: ``code`` when given, else the error's own
    (:func:`dual_emc2.errors.exit_code_of`: 2 usage, 3 data, 4 checkpoint, 5 run stopped; 2 for a plain message or
    any other exception)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err  # KeyError's str() is a repr
    print(f"error: {text}", file=sys.stderr)
    if code is not None:
        return int(code)
    return exit_code_of(err) if isinstance(err, BaseException) else 2


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the parent of its ``checkpoints/`` folder (else the checkpoint's folder)."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder
