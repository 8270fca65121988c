"""Atomic, self-verifying training checkpoints.

File layout of ``ckpt-{step:08d}.pt``: a 52-byte header, then the bytes of ``torch.save(payload)``::

    magic b"DEMC2CKP" | uint32 format version | uint64 body length | sha256(body), 32 bytes

so a torn, truncated or bit-flipped file is detected before anything is unpickled.  A checkpoint whose estimator state
is sharded over processes (:mod:`dual_emc2.train.checkpoint_shards`) has format version 2: its body starts with a
JSON manifest (``uint32 length | JSON``) naming each process's shard file with its length and sha256, then the
``torch.save`` bytes; each shard file has the format above.  The main file is written last, after every shard, so it
is the commit point of the whole set; verifying it verifies every shard it names.  Writing goes to a hidden
temporary file in the same folder (``.ckpt-XXXXXXXX.*.tmp``), which is flushed, fsync'ed and atomically renamed with
``os.replace``; the folder is fsync'ed after the rename.  A crash therefore leaves either the complete new checkpoint
or none (plus, at worst, a hidden temporary file that readers ignore and the next save removes).  A small text file
``latest`` names the most recent checkpoint; it is replaced atomically after each save.  Use
:func:`load_checkpoint` (not ``torch.load``) to read a checkpoint.

:func:`resolve_checkpoint` is the one reading of a checkpoint argument, for the trainer's ``train.resume`` and for
every tool: a checkpoint file, a run folder, a ``checkpoints/`` folder, a ``latest`` pointer, or the word ``latest``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dual_emc2.errors import CheckpointError

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointCorrupt",
    "CheckpointNotFound",
    "check_shard_digest",
    "checkpoint_path",
    "checkpoint_summary",
    "file_digest",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "read_manifest",
    "resolve_checkpoint",
    "resolve_resume",
    "save_checkpoint",
    "shard_file",
    "tensor_dict_sha256",
    "verify_checkpoint",
    "verify_shard",
    "write_checkpoint_file",
]


MAGIC = b"DEMC2CKP"
FORMAT_VERSION = 1
SHARDED_FORMAT_VERSION = 2  # the body starts with the JSON manifest of the state shards
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, body length, sha256
_MANIFEST_LEN = struct.Struct("<I")
LATEST = "latest"  # the pointer file beside the checkpoints; also the word that means the newest intact checkpoint
CHECKPOINTS = "checkpoints"  # a run folder's checkpoints folder
CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")  # the file name of a checkpoint (group 1: its step)
_SHARD_RE = re.compile(r"^ckpt-(\d{8,})\.shard-\d+-of-\d+\.pt$")
_TMP_RE = re.compile(r"^\.(?:ckpt-\d{8,}|latest)\..*\.tmp$")
_CHUNK = 1 << 22


class CheckpointCorrupt(CheckpointError, RuntimeError):
    """A checkpoint file that is truncated, torn, altered or not a checkpoint at all; the message names the file.

    Example::

        raise CheckpointCorrupt(f"{path}: sha256 mismatch, the file is corrupted")
    """


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint argument that names no checkpoint: the message names the folder and what it holds.

    Example::

        raise CheckpointNotFound(f"{arg}: no intact checkpoint (ckpt-*.pt) in {folder}; it holds nothing")
    """


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """Path of the checkpoint of ``step`` in ``directory``."""
    return Path(directory) / f"ckpt-{int(step):08d}.pt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt-*.pt`` in ``directory``, ascending step (temporary files excluded)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the folder (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(target: Path, chunks: list[bytes | memoryview], tmp_prefix: str) -> None:
    """Write ``chunks`` to a temp file beside ``target``, fsync, ``os.replace`` onto it, fsync the folder.

    The temp file is created like a normal file (mode 0o666 minus the umask), unlike ``tempfile.mkstemp``'s 0o600.
    """
    tmp = target.parent / f"{tmp_prefix}{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_checkpoint_file(target: Path, payload: Mapping[str, Any],
                          manifest: Mapping[str, Any] | None = None) -> Path:
    """Atomically write one checkpoint-format file (header, optional manifest, ``torch.save`` body) at ``target``."""
    buf = io.BytesIO()
    version = FORMAT_VERSION
    if manifest is not None:
        version = SHARDED_FORMAT_VERSION
        text = json.dumps(dict(manifest), sort_keys=True).encode()
        buf.write(_MANIFEST_LEN.pack(len(text)) + text)
    torch.save(dict(payload), buf)
    body = buf.getbuffer()
    header = _HEADER.pack(MAGIC, version, body.nbytes, hashlib.sha256(body).digest())
    try:
        _atomic_write(target, [header, body], tmp_prefix=f".{target.stem}.")
    finally:
        body.release()
    return target


def save_checkpoint(directory: str | os.PathLike[str], step: int, payload: dict[str, Any],
                    keep_last: int = 3, manifest: Mapping[str, Any] | None = None) -> Path:
    """Atomically write ``payload`` as ``directory/ckpt-{step:08d}.pt``, point ``latest`` at it, prune old ones.

    After the save, only the ``keep_last`` highest-step checkpoints with step <= ``step`` are kept (checkpoints of
    a later step, left by a run that was resumed from an earlier one, are left alone with a warning; they are
    overwritten when this run reaches their step).  Stale temporary files of crashed saves are removed.
    ``manifest``: the state shards already written beside it (:func:`dual_emc2.train.checkpoint_shards.
    shard_manifest`); :func:`load_checkpoint` returns it as the payload's ``state_shards``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be an int >= 1, got {keep_last!r}")
    if not isinstance(payload, Mapping):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    target = write_checkpoint_file(checkpoint_path(root, step), payload, manifest)
    _atomic_write(root / LATEST, [f"{target.name}\n".encode()], tmp_prefix=f".{LATEST}.")
    _prune(root, step, keep_last)
    return target


def _prune(root: Path, step: int, keep_last: int) -> None:
    ckpts = list_checkpoints(root)
    later = [p.name for s, p in ckpts if s > step]
    if later:
        warnings.warn(f"{root}: checkpoints of later steps than {step} are kept from an earlier run: {later}",
                      stacklevel=3)
    older = [p for s, p in ckpts if s <= step]
    for p in older[:-keep_last]:
        p.unlink(missing_ok=True)
    kept: set[str] = set()
    for p in older[-keep_last:]:
        try:
            kept |= {f["name"] for f in (read_manifest(p) or {}).get("files", [])}
        except (CheckpointCorrupt, OSError):
            continue
    for p in root.iterdir():
        m = _SHARD_RE.match(p.name)
        if _TMP_RE.match(p.name) or (m and int(m.group(1)) <= step and p.name not in kept):
            p.unlink(missing_ok=True)


def _read_header(f: Any, path: Path) -> tuple[int, int, bytes]:
    """(format version, payload length, sha256) from the header of the open checkpoint ``f``; magic and size checked."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise CheckpointCorrupt(f"{path}: truncated checkpoint ({len(head)} bytes, header needs {_HEADER.size})")
    magic, version, length, digest = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CheckpointCorrupt(f"{path}: not a dual_emc2 checkpoint (bad magic {magic!r}); torn or foreign file")
    return version, length, digest


def _verified_body(path: Path, *, keep: bool) -> tuple[int, bytes | None]:
    """Check magic, version, length and sha256 of the checkpoint at ``path``; return its format version and, if
    ``keep``, its body."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        version, length, digest = _read_header(f, path)
        if version not in (FORMAT_VERSION, SHARDED_FORMAT_VERSION):
            raise CheckpointCorrupt(f"{path}: unsupported checkpoint format version {version}")
        h, n, body = hashlib.sha256(), 0, None
        if keep:
            body = f.read(length + 1)
            h.update(body)
            n = len(body)
        else:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
    if n != length:
        what = "truncated" if n < length else "has trailing bytes"
        raise CheckpointCorrupt(f"{path}: {what}: header says {length} payload bytes, file holds {n}")
    if h.digest() != digest:
        raise CheckpointCorrupt(f"{path}: sha256 mismatch, the file is corrupted")
    return version, body


def _split_manifest(path: Path, body: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    if len(view) < _MANIFEST_LEN.size:
        raise CheckpointCorrupt(f"{path}: sharded checkpoint without its manifest")
    (n,) = _MANIFEST_LEN.unpack(view[:_MANIFEST_LEN.size])
    end = _MANIFEST_LEN.size + n
    try:
        manifest = json.loads(bytes(view[_MANIFEST_LEN.size:end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupt(f"{path}: unreadable shard manifest ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise CheckpointCorrupt(f"{path}: the shard manifest lists no files")
    return manifest, view[end:]


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The shard manifest of a checkpoint (None for a checkpoint without state shards), read without verifying
    the file (:func:`verify_checkpoint` does)."""
    p = Path(path)
    with open(p, "rb") as f:
        version, _, _ = _read_header(f, p)
        if version != SHARDED_FORMAT_VERSION:
            return None
        raw = f.read(_MANIFEST_LEN.size)
        n = _MANIFEST_LEN.unpack(raw)[0] if len(raw) == _MANIFEST_LEN.size else 0
        return _split_manifest(p, raw + f.read(n))[0]


def file_digest(path: Path) -> tuple[int, str]:
    """(body length, sha256 hex) that the header of a checkpoint-format file records (the file is not hashed)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise CheckpointCorrupt(f"{path}: truncated checkpoint ({len(head)} bytes, header needs {_HEADER.size})")
    magic, _, length, digest = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CheckpointCorrupt(f"{path}: not a dual_emc2 checkpoint (bad magic {magic!r}); torn or foreign file")
    return length, digest.hex()


def shard_file(main: Path, entry: Mapping[str, Any]) -> Path:
    """The path of a shard that the manifest of checkpoint ``main`` lists (a file beside it)."""
    name = str(entry.get("name", ""))
    if not _SHARD_RE.match(name):
        raise CheckpointCorrupt(f"{main}: the shard manifest names {name!r}, not a shard file")
    return main.parent / name


def verify_shard(main: Path, entry: Mapping[str, Any]) -> Path:
    """Check the shard file of manifest ``entry`` (present, intact, the very file the manifest names by sha256);
    returns its path.  Raises :class:`CheckpointCorrupt` naming the shard file."""
    path = shard_file(main, entry)
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: state shard missing (checkpoint {main.name} is sharded over "
                                "processes and needs every shard file beside it)")
    _verified_body(path, keep=False)
    check_shard_digest(main, entry, path)
    return path


def check_shard_digest(main: Path, entry: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointCorrupt` unless the header of shard ``path`` records the length and sha256 that the
    manifest ``entry`` of checkpoint ``main`` lists."""
    length, digest = file_digest(path)
    if digest != entry.get("sha256") or length != entry.get("bytes"):
        raise CheckpointCorrupt(f"{path}: not the shard that {main.name} was saved with (sha256 differs); a "
                                "later save overwrote it, or it was copied from another run")


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointCorrupt` (or FileNotFoundError) unless ``path`` is an intact checkpoint, and, for a
    checkpoint with state shards, every shard is too."""
    p = Path(path)
    version, _ = _verified_body(p, keep=False)
    if version == SHARDED_FORMAT_VERSION:
        for entry in read_manifest(p)["files"]:
            verify_shard(p, entry)


def _numpy_safe_globals() -> list[Any]:
    """numpy callables/types that rebuild numeric arrays and scalars (e.g. ``np.random.get_state()``); object
    arrays stay refused by ``torch.load(weights_only=True)``."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64, np.complex64, np.complex128)
    return [_reconstruct, scalar, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in numeric)]


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu",
                    weights_only: bool = True) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save_checkpoint`.

    ``weights_only`` is passed to ``torch.load``: True (the default) unpickles only tensors, plain containers and
    numeric numpy arrays/scalars (RNG states); pass False for payloads holding other objects from a trusted source.
    A checkpoint with state shards returns their manifest as ``payload["state_shards"]``; its ``estimator`` holds
    the entries common to every process (:func:`dual_emc2.train.checkpoint_shards.load_estimator_state` adds the
    shards).
    """
    p = Path(path)
    version, body = _verified_body(p, keep=True)
    manifest = None
    if version == SHARDED_FORMAT_VERSION:
        manifest, body = _split_manifest(p, body)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=weights_only)
    if not isinstance(payload, dict):
        raise CheckpointCorrupt(f"{p}: payload is a {type(payload).__name__}, expected a dict")
    if manifest is not None:
        payload["state_shards"] = manifest
    return payload


def _pointer_target(pointer: Path) -> tuple[str, Path | None]:
    """What a ``latest`` pointer names: (its text, the checkpoint file it names or None).  A symlink names its
    target; a text file (what :func:`save_checkpoint` writes) the checkpoint file name it holds, in its folder."""
    if pointer.is_symlink():
        return os.readlink(pointer), pointer.resolve()
    name = pointer.read_bytes()[:256].decode("utf-8", errors="replace").strip()
    return name, (pointer.parent / name if CHECKPOINT_NAME.match(name) else None)


def find_latest_valid(directory: str | os.PathLike[str]) -> Path | None:
    """Newest intact checkpoint in ``directory``, or None.

    Checkpoints are tried from the highest step down, except those of a higher step than the one ``latest`` names
    that were written before ``latest`` (left by a run that was later resumed from an earlier step): they are tried
    last.  So the most recent save wins, also when a crash hit between writing a checkpoint and updating
    ``latest``.  Corrupt checkpoints are skipped with a warning naming them; temporary files are ignored.
    """
    root = Path(directory)
    newest_first = list(reversed(list_checkpoints(root)))
    pointer = root / LATEST
    abandoned: list[Path] = []
    if pointer.is_file():
        name, target = _pointer_target(pointer)
        m = CHECKPOINT_NAME.match(target.name) if target is not None else None
        if m and (root / target.name).is_file():
            pointer_step, pointer_mtime = int(m.group(1)), pointer.lstat().st_mtime
            abandoned = [p for s, p in newest_first if s > pointer_step and p.stat().st_mtime <= pointer_mtime]
        else:
            warnings.warn(f"{pointer} names {name!r}, which is not a checkpoint in {root}; scanning by step",
                          stacklevel=2)
    order = [p for _, p in newest_first if p not in abandoned] + abandoned
    for p in order:
        try:
            verify_checkpoint(p)
        except (CheckpointCorrupt, OSError) as exc:
            warnings.warn(f"skipping corrupt checkpoint: {exc}" if str(p) in str(exc)
                          else f"skipping corrupt checkpoint {p}: {exc}", stacklevel=2)
            continue
        return p
    return None


# ------------------------------------------------------------------------------------ reading a checkpoint argument

_PASS = "Pass a checkpoint file (ckpt-*.pt), a run folder or its checkpoints/ folder"


def _checkpoints_of(folder: Path) -> Path:
    """A run folder's ``checkpoints/`` folder when it has one, else ``folder`` itself."""
    return folder / CHECKPOINTS if (folder / CHECKPOINTS).is_dir() else folder


def _holds(folder: Path, *, none_intact: bool = False) -> str:
    """A short description of what ``folder`` holds, for error messages (``none_intact``: its checkpoint files, if
    any, were all found damaged)."""
    if not folder.exists():
        return "nothing (it does not exist)"
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "nothing (empty)"
    ckpts = [n for n in names if CHECKPOINT_NAME.match(n)]
    if ckpts and none_intact:
        return f"{len(ckpts)} checkpoint file(s), none intact ({', '.join(ckpts[-3:])}; see the warnings above)"
    if ckpts:
        return f"{len(ckpts)} checkpoint file(s) ({', '.join(ckpts[-3:])})"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _newest(folder: Path, arg: str) -> Path:
    found = find_latest_valid(folder)
    if found is None:
        raise CheckpointNotFound(f"{arg}: no intact checkpoint (ckpt-*.pt) in {folder}; it holds "
                                 f"{_holds(folder, none_intact=True)}. {_PASS}")
    return found


def _from_pointer(pointer: Path, arg: str) -> Path:
    """The checkpoint a ``latest`` pointer names; the newest intact checkpoint of its folder when the named one is
    missing or damaged, or the pointer names none.  A checkpoint file that is called ``latest`` is itself."""
    if not pointer.is_symlink():
        with open(pointer, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return pointer
    _, target = _pointer_target(pointer)
    if target is not None:
        try:
            verify_checkpoint(target)
            return target
        except (OSError, CheckpointCorrupt):
            pass
    return _newest(pointer.parent, arg)


def resolve_checkpoint(arg: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None,
                       missing_ok: bool = False) -> Path | None:
    """The checkpoint file that a checkpoint argument means (the trainer's ``train.resume``, every tool's argument).

    ``arg`` may be

    * a checkpoint file (``ckpt-00000375.pt``, or any other name): itself, not verified here
      (:func:`load_checkpoint` verifies it);
    * a run folder (its ``checkpoints/``) or a checkpoints folder: its newest intact checkpoint
      (:func:`find_latest_valid`: damaged ones are skipped with a warning);
    * a ``latest`` pointer (the text file :func:`save_checkpoint` writes, or a symlink): the checkpoint it names, or
      the newest intact one of its folder when that one is missing or damaged; a ``latest`` path that does not
      exist in an existing folder means that folder's newest intact checkpoint;
    * with ``run_dir`` (a run folder or its checkpoints folder): the word ``latest``, the newest intact checkpoint of
      ``run_dir``; with ``missing_ok`` None when there is none yet (for the trainer: a fresh start).  A relative
      path is tried as given (from the working folder), then inside ``run_dir``'s checkpoints folder.

    Anything else is a :class:`CheckpointNotFound` (a :class:`~dual_emc2.errors.CheckpointError`, exit code 4)
    naming the folder and what it holds.
    """
    text = os.fspath(arg)
    if not text.strip():
        raise CheckpointNotFound(f"empty checkpoint argument {text!r}. {_PASS}")
    home = _checkpoints_of(Path(run_dir)) if run_dir is not None else None
    if home is not None and text == LATEST:
        found = find_latest_valid(home)
        if found is None and not missing_ok:
            raise CheckpointNotFound(f"{text}: no intact checkpoint (ckpt-*.pt) in {home}; it holds "
                                     f"{_holds(home, none_intact=True)}. {_PASS}")
        return found
    p = Path(text).expanduser()
    candidates = [p] + ([home / p] if home is not None and not p.is_absolute() else [])
    for c in candidates:
        if c.is_dir():
            return _newest(_checkpoints_of(c), text)
        if c.is_file():
            return _from_pointer(c, text) if c.name == LATEST else c
    for c in candidates:
        if c.name == LATEST and c.parent.is_dir():
            return _newest(c.parent, text)
    also = f" (nor {candidates[1]})" if len(candidates) > 1 else ""
    parent = next((q for q in p.parents if q.is_dir() and q != Path(".")), None)
    if parent is None and home is not None and home.is_dir():
        parent = home
    where = f"; {parent} holds {_holds(parent)}" if parent is not None else ""
    hint = ", or latest for the newest intact checkpoint of the run" if home is not None else ""
    raise CheckpointNotFound(f"checkpoint {text} does not exist{also}{where}. {_PASS}{hint}")


def resolve_resume(resume: str | None, directory: str | os.PathLike[str]) -> Path | None:
    """Checkpoint to resume from (``train.resume``): None -> None; otherwise :func:`resolve_checkpoint` with the
    run's checkpoints folder ``directory``: ``"latest"`` is its newest intact checkpoint (None if there is none yet, a
    fresh start), a relative path is tried as given, then inside ``directory``."""
    if resume is None:
        return None
    if not isinstance(resume, str) or not resume.strip():
        raise CheckpointError(f"train.resume must be 'latest' or a checkpoint path, got {resume!r}")
    try:
        return resolve_checkpoint(resume, run_dir=directory, missing_ok=True)
    except CheckpointNotFound as exc:
        raise CheckpointNotFound(f"train.resume: {exc}") from None


# --------------------------------------------------------------------------------------------------- summaries


def _flatten_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i), out)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def tensor_dict_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over the tensors of a (possibly nested) state dict: for each key in sorted order, the key, dtype,
    shape and raw bytes.  Independent of insertion order and device; non-tensor leaves are not hashed."""
    flat: dict[str, torch.Tensor] = {}
    _flatten_tensors(tensors, "", flat)
    h = hashlib.sha256()
    for key in sorted(flat):
        t = flat[key]
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def checkpoint_summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Describe a loaded checkpoint: ``step``, the other top-level keys, and for every top-level entry holding
    tensors (model, estimator, optimizer, ...) its tensor count, elements, bytes, per-tensor shape/dtype and
    :func:`tensor_dict_sha256`."""
    summary: dict[str, Any] = {"step": payload.get("step"), "keys": sorted(map(str, payload)), "tensors": {}}
    for name, value in payload.items():
        flat: dict[str, torch.Tensor] = {}
        _flatten_tensors(value, "", flat)
        if not flat:
            continue
        summary["tensors"][str(name)] = {
            "num_tensors": len(flat),
            "numel": sum(t.numel() for t in flat.values()),
            "nbytes": sum(t.numel() * t.element_size() for t in flat.values()),
            "shapes": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                       for k, t in sorted(flat.items())},
            "sha256": tensor_dict_sha256(value) if isinstance(value, Mapping) else tensor_dict_sha256({"": value}),
        }
    return summary
