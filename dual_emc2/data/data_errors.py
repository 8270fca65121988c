"""The data errors a user can fix (:class:`~dual_emc2.errors.DataError`, exit code 3), torch-free.

* :class:`UnreadableSample`: an image file or shard member that does not decode; the message names the file (or
  shard and sample key), the sample id and the fix ``data.on_bad_sample=skip``.
* :class:`DataNotFound`: a dataset, shard folder or pairs file that is not where the config says; the message names
  the config key (``data.root``, ``pairs.path``, ``pairs.eval_path``) and what was looked for.  It is also a
  FileNotFoundError, so callers that caught that before still do.

Both keep their message when raised in a DataLoader worker process (:class:`~dual_emc2.errors.DualEMC2Error`).
"""
from __future__ import annotations

from dual_emc2.errors import DataError

__all__ = ["BAD_SAMPLE_FIX", "DataNotFound", "UnreadableSample", "unreadable_image"]

BAD_SAMPLE_FIX = "data.on_bad_sample=skip"


class UnreadableSample(DataError, RuntimeError):
    """A sample whose file cannot be decoded; the message names the file, the sample id and the fix
    (``data.on_bad_sample=skip``).  Build it with :func:`unreadable_image`, which also sets :attr:`what`.

    Example::

        raise unreadable_image("stl10 train", "img/00042.png", 42, OSError("truncated file"))
    """

    what: str | None = None  # the message without the fix (for the warning when samples are skipped)


class DataNotFound(DataError, FileNotFoundError):
    """Data that is not where the user said (``data.root``, ``pairs.path``, ...); the message names the key.

    Example::

        raise DataNotFound("pairs.path=data/pairs.tsv: pairs file not found (a .csv, .tsv or .jsonl file of pairs)")
    """


def unreadable_image(where: str, path: object, sample_id: int, err: BaseException) -> UnreadableSample:
    """The :class:`UnreadableSample` of image file ``path`` (sample ``sample_id`` of ``where``) that raised ``err``."""
    what = f"{where}: cannot read image {path} (sample id {sample_id}: {type(err).__name__}: {err})"
    exc = UnreadableSample(f"{what}; replace or delete the file, or set {BAD_SAMPLE_FIX} to skip unreadable samples "
                           "and count them")
    exc.what = what
    return exc
