"""Helpers shared by the command-line entry points: the checkout's root folder, the ``error: ...`` exit with the
exit code of :mod:`dual_emc2.errors`, and the one way every tool reads a checkpoint argument."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from dual_emc2.errors import CheckpointError, DualEMC2Error, exit_code_of

__all__ = ["ROOT", "USER_ERRORS", "CheckpointNotFound", "fail", "resolve_checkpoint_arg", "run_folder_of"]

# The repository checkout (the package is installed editable: ``pip install -e .``): default configs live in
# ROOT/configs.  User tools never write into ROOT/experiments/results by default (only the experiments do).
ROOT = Path(__file__).resolve().parents[2]

# what the tools report as one ``error: ...`` line instead of a traceback (each tool may add its own)
USER_ERRORS: tuple[type[BaseException], ...] = (DualEMC2Error, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, IsADirectoryError, PermissionError)

_LATEST = "latest"  # the pointer file dual_emc2.train.checkpoint writes beside the checkpoints
_CKPT_NAME = re.compile(r"^ckpt-\d{8,}\.pt$")


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint argument that names no checkpoint: the message names the folder and what it holds."""


def fail(err: BaseException | str, code: int | None = None) -> int:
    """Print ``error: <err>`` on stderr and return the exit code: ``code`` when given, else the error's own
    (:func:`dual_emc2.errors.exit_code_of`: 2 usage, 3 data, 4 checkpoint, 5 run stopped; 2 for a plain message or
    any other exception)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err  # KeyError's str() is a repr
    print(f"error: {text}", file=sys.stderr)
    if code is not None:
        return int(code)
    return exit_code_of(err) if isinstance(err, BaseException) else 2


def _holds(folder: Path) -> str:
    """A short description of what ``folder`` holds, for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "nothing (empty)"
    ckpts = [n for n in names if _CKPT_NAME.match(n)]
    if ckpts:
        return f"{len(ckpts)} checkpoint file(s), none intact ({', '.join(ckpts[-3:])}; see the warnings above)"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _latest_in(folder: Path, arg: str) -> Path:
    from dual_emc2.train.checkpoint import find_latest_valid

    found = find_latest_valid(folder)
    if found is None:
        raise CheckpointNotFound(f"{arg}: no intact checkpoint (ckpt-*.pt) in {folder}; it holds {_holds(folder)}. "
                                 "Pass a checkpoint file, a run folder or its checkpoints/ folder")
    return found


def _from_pointer(pointer: Path, arg: str) -> Path:
    """The checkpoint a ``latest`` pointer names (a text file holding a checkpoint's name, or a symlink); the newest
    intact checkpoint of its folder when the named one is missing or damaged, or the pointer names none."""
    from dual_emc2.train.checkpoint import MAGIC, CheckpointCorrupt, verify_checkpoint

    if pointer.is_symlink():
        target = pointer.resolve()
    else:
        head = pointer.read_bytes()[:256]
        if head.startswith(MAGIC):  # a checkpoint file that happens to be called "latest"
            return pointer
        name = head.decode("utf-8", errors="replace").strip()
        target = pointer.parent / name if _CKPT_NAME.match(name) else None
    if target is not None:
        try:
            verify_checkpoint(target)
            return target
        except (OSError, CheckpointCorrupt):
            pass
    return _latest_in(pointer.parent, arg)


def resolve_checkpoint_arg(arg: str | os.PathLike[str]) -> Path:
    """The checkpoint file a tool's checkpoint argument means.

    ``arg`` may be a checkpoint file (``ckpt-00000375.pt``), a run folder (its ``checkpoints/``), a checkpoints
    folder, or ``checkpoints/latest`` (the pointer file the trainer writes, or a symlink); a folder or pointer
    gives the newest intact checkpoint (:func:`dual_emc2.train.checkpoint.find_latest_valid`: damaged ones are
    skipped with a warning).  Anything else is a :class:`CheckpointNotFound` (exit code 4) naming the folder and
    what it holds.  The file returned is not verified here; :func:`~dual_emc2.train.checkpoint.load_checkpoint`
    does that.
    """
    text = os.fspath(arg)
    p = Path(text).expanduser()
    if p.is_dir():
        return _latest_in(p / "checkpoints" if (p / "checkpoints").is_dir() else p, text)
    if p.is_file():
        return _from_pointer(p, text) if p.name == _LATEST else p
    if p.name == _LATEST and p.parent.is_dir():
        return _latest_in(p.parent, text)
    parent = next((q for q in p.parents if q.is_dir()), None)
    where = f"; {parent} holds {_holds(parent)}" if parent is not None and parent != Path(".") else ""
    raise CheckpointNotFound(f"checkpoint {text} does not exist{where}. Pass a checkpoint file (ckpt-*.pt), a run "
                             "folder or its checkpoints/ folder")


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the parent of its ``checkpoints/`` folder (else the checkpoint's folder)."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder
