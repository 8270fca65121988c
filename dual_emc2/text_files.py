"""Reading UTF-8 text files with an error that points at the first bad byte (config YAML, pairs files)."""
from __future__ import annotations

import os
from pathlib import Path

from dual_emc2.errors import DualEMC2Error

__all__ = ["decode_utf8", "read_utf8"]


def decode_utf8(data: bytes, source: str, error: type[DualEMC2Error], what: str = "file") -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); otherwise ``error`` naming ``source`` and the
    line, column and byte offset of the first byte that is not UTF-8, and how to convert the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        bad = " ".join(f"0x{b:02x}" for b in data[start:err.end])
        raise error(f"{source}: the {what} is not UTF-8: byte{'s' if err.end - start > 1 else ''} {bad} at line "
                    f"{line}, column {column} (byte offset {start}) ({err.reason}); save it as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {source} > converted` for a Latin-1 file") from None


def read_utf8(path: str | os.PathLike[str], error: type[DualEMC2Error], what: str = "file") -> str:
    """The text of the UTF-8 file ``path`` (see :func:`decode_utf8`)."""
    return decode_utf8(Path(path).read_bytes(), str(path), error, what)
