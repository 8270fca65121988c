"""Webdataset tar shards of pairs, with the global integer index of every sample written at shard creation.

Layout of one sample (webdataset groups tar members by the key before the first dot)::

    000000000042.index.cls   b"42"                 the global index (also the key, zero-padded)
    000000000042.x.txt       UTF-8 text            or x.png / x.jpg: the encoded image bytes as given
    000000000042.y.txt       ...
    000000000042.meta.json   optional per-sample metadata

plus a ``manifest.json`` beside the shards (modalities, per-shard sample counts and index ranges).  Two readers:
:func:`read_shards` loads every sample into a :class:`~dual_emc2.data.pairs.PairSet` (exact epochs with the
rank-invariant :class:`~dual_emc2.data.samplers.GlobalBatchSampler`; fine up to a few million short pairs), and
:class:`ShardStream` streams them for corpora that do not fit in memory: shards are resampled with replacement
(``webdataset.ResampledShards``, seeded per rank, worker and epoch) or split over ranks and workers, samples are
shuffled in a buffer, and each yields ``(index, x, y)`` with its index intact.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from dual_emc2.data.data_errors import BAD_SAMPLE_FIX, DataNotFound, UnreadableSample
from dual_emc2.data.pairs import PairSet, image_format, side_problem
from dual_emc2.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "dual_emc2-pairs"
_INDEX_WIDTH = 12

__all__ = ["MANIFEST", "ShardStream", "expand_shards", "read_manifest", "read_shards", "write_shards"]


@dataclass(frozen=True)
class ShardInfo:
    file: str
    count: int
    first_index: int
    last_index: int


def _encode_side(value: Any, modality: str) -> tuple[str, bytes]:
    if modality == "text":
        return "txt", value.encode("utf-8")
    return image_format(value), bytes(value)


def write_shards(pairs: PairSet, out_dir: str | os.PathLike[str], *, prefix: str = "pairs",
                 max_count: int = 10_000, extra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``pairs`` as ``{out_dir}/{prefix}-{k:06d}.tar`` shards of at most ``max_count`` samples, in index
    order, and ``manifest.json``; ``extra_files`` (name → text, e.g. a licence notice) are written beside them.
    Returns the manifest."""
    if max_count < 1:
        raise ValueError(f"max_count (samples per shard) must be >= 1, got {max_count}")
    if len(pairs) == 0:
        raise ValueError(f"{pairs.source}: no pairs to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"{prefix}-*.tar"))
    if stale:
        raise FileExistsError(f"{out} already holds {len(stale)} shards named {prefix}-*.tar; use an empty folder")
    order = np.argsort(pairs.ids, kind="stable")
    shards: list[ShardInfo] = []
    for k, start in enumerate(range(0, len(order), max_count)):
        chunk = order[start:start + max_count]
        name = f"{prefix}-{k:06d}.tar"
        tmp = out / f".{name}.tmp"
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for pos in chunk:
                idx = int(pairs.ids[pos])
                sample = {"__key__": f"{idx:0{_INDEX_WIDTH}d}", "index.cls": str(idx).encode()}
                for side, value, mod in (("x", pairs.x[pos], pairs.x_modality), ("y", pairs.y[pos], pairs.y_modality)):
                    ext, data = _encode_side(value, mod)
                    sample[f"{side}.{ext}"] = data
                if pairs.meta is not None:
                    sample["meta.json"] = json.dumps(pairs.meta[pos], ensure_ascii=False).encode("utf-8")
                sink.write(sample)
        os.replace(tmp, out / name)
        shards.append(ShardInfo(name, len(chunk), int(pairs.ids[chunk[0]]), int(pairs.ids[chunk[-1]])))
    manifest = {
        "format": FORMAT, "version": 1, "source": pairs.source, "num_samples": len(pairs),
        "x_modality": pairs.x_modality, "y_modality": pairs.y_modality,
        "shards": [s.__dict__ for s in shards],
    }
    for fname, text in (extra_files or {}).items():
        (out / fname).write_text(text, encoding="utf-8")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _named(key: str | None, spec: str | os.PathLike[str]) -> str:
    """How an error names the shards: ``pairs.eval_path=DIR`` when the config key is known, else the path."""
    return f"{key}={os.fspath(spec)}" if key else os.fspath(spec)


_MAKE_SHARDS = "write them with dual-emc2-make-shards --out DIR (README, Two towers)"


def read_manifest(folder: str | os.PathLike[str], *, key: str | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of a shard folder (checked to be one of ours); ``key``: the config key that named the
    folder (``pairs.path``), for the error message."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(folder).exists() else f"holds no {MANIFEST}"
        raise DataNotFound(f"{_named(key, folder)}: the shard folder {what}; {_MAKE_SHARDS}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable {FORMAT} manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a {FORMAT} manifest (format={got!r})")
    return manifest


def expand_shards(spec: str | os.PathLike[str], *, key: str | None = None) -> list[str]:
    """Shard files of ``spec``: a folder (its manifest's shards, else every ``*.tar`` in it), one ``.tar`` file,
    or a brace pattern such as ``data/pairs-{000000..000031}.tar``.  Missing files are a :class:`DataNotFound`
    naming them and ``key`` (the config key that named ``spec``, e.g. ``pairs.eval_path``) when given."""
    text = os.fspath(spec)
    p = Path(text)
    if p.is_dir():
        if (p / MANIFEST).is_file():
            files = [str(p / s["file"]) for s in read_manifest(p, key=key)["shards"]]
        else:
            files = sorted(str(f) for f in p.glob("*.tar"))
        if not files:
            raise DataNotFound(f"{_named(key, spec)}: no .tar shards in {p}; {_MAKE_SHARDS}")
    else:
        files = list(braceexpand.braceexpand(text))
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if len(files) == 1 and not p.suffix:
            raise DataNotFound(f"{_named(key, spec)}: shard folder not found: {text}; {_MAKE_SHARDS}")
        raise DataNotFound(f"{_named(key, spec)}: shard not found: {missing[0]}{more}")
    return files


def _where(sample: dict[str, Any]) -> str:
    return f"shard {sample.get('__url__', '?')}: sample {sample.get('__key__')!r}"


def _parse_sample(sample: dict[str, Any], check_images: bool = True
                  ) -> tuple[int, tuple[str, Any], tuple[str, Any], dict | None]:
    """(index, (modality, x), (modality, y), meta) of one webdataset sample; malformed members, empty text and (with
    ``check_images``) images that do not decode are a ValueError naming the shard, key and index."""
    where = _where(sample)
    raw = sample.get("index.cls")
    if raw is None:
        raise DataError(f"{where}: no index.cls member (not written by write_shards?)")
    try:
        idx = int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise DataError(f"{where}: index.cls must hold an integer, got {raw!r}") from None
    sides = []
    for side in ("x", "y"):
        found = [k for k in sample if k.startswith(f"{side}.")]
        if len(found) != 1:
            raise DataError(f"{where}: expected exactly one {side}.* member, got {found or 'none'}")
        ext = found[0].split(".", 1)[1]
        data = sample[found[0]]
        if ext == "txt":
            try:
                side_value = ("text", data.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: {found[0]} is not UTF-8 text ({err})") from None
        else:
            side_value = ("image", bytes(data))
        why = side_problem(side_value[1], side_value[0]) if check_images or ext == "txt" else None
        if why is not None:
            raise DataError(f"{where} (index {idx}): {found[0]}: {why}")
        sides.append(side_value)
    try:
        meta = json.loads(sample["meta.json"]) if "meta.json" in sample else None
    except ValueError as err:
        raise DataError(f"{where}: meta.json does not parse ({err})") from None
    return idx, sides[0], sides[1], meta


class BadSampleHandler:
    """Webdataset error handler for shard reading: ``on_error="raise"`` re-raises a corrupt tar member or a bad
    sample as an :class:`~dual_emc2.data.data_errors.UnreadableSample` (a DataError, exit code 3) naming the shard,
    the sample key and index, and the fix ``data.on_bad_sample=skip``; ``"skip"`` counts it (``count``, shared with
    DataLoader worker processes), warns about the first few, and goes on (a truncated tar loses the rest of that
    shard)."""

    def __init__(self, on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self._count = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def count(self) -> int:
        return int(self._count)

    @staticmethod
    def describe(exn: BaseException) -> str:
        args = getattr(exn, "args", ())
        if isinstance(exn, DataError) and len(args) == 1:
            return str(args[0])  # our own messages already name the shard and sample
        url = next((a for a in args[1:] if isinstance(a, str)), None)  # webdataset appends the shard url
        head = args[0] if args else exn
        return f"{url + ': ' if url else ''}corrupt tar data ({type(exn).__name__}: {head})"

    def __call__(self, exn: BaseException) -> bool:
        msg = self.describe(exn)
        if self.on_error == "raise":
            raise UnreadableSample(f"{msg}; set {BAD_SAMPLE_FIX} to skip such samples and count them") from exn
        self._count += 1
        if int(self._count) <= 3:
            warnings.warn(f"skipped bad shard sample: {msg}", stacklevel=2)
        return True


def read_shards(spec: str | os.PathLike[str], on_error: str = "raise", *, key: str | None = None) -> PairSet:
    """Every sample of the shards of ``spec`` (see :func:`expand_shards`) as a PairSet with the written indices;
    duplicate indices across shards are an error naming the index.  A corrupt tar member, a sample with a missing
    or malformed member, empty text or an image that does not decode is a ValueError naming the shard and sample
    (``on_error="raise"``) or skipped and counted in the result's ``bad_samples`` (``"skip"``).  ``key``: the config
    key naming ``spec`` (``pairs.path``, ``pairs.eval_path``), named when the shards are missing."""
    files = expand_shards(spec, key=key)
    handler = BadSampleHandler(on_error)
    ids, xs, ys, metas, mods = [], [], [], [], set()
    for sample in wds.DataPipeline(wds.SimpleShardList(files), wds.tarfile_to_samples(handler=handler)):
        try:
            idx, (mx, x), (my, y), meta = _parse_sample(sample)
        except DataError as err:
            handler(err)
            continue
        ids.append(idx)
        xs.append(x)
        ys.append(y)
        metas.append(meta)
        mods.add((mx, my))
    if not ids:
        raise DataError(f"{_named(key, spec)}: the shards hold no samples")
    if len(mods) != 1:
        raise DataError(f"{spec}: samples mix modalities {sorted(mods)}; one shard set holds one kind of pair")
    (mx, my), = mods
    meta = metas if all(m is not None for m in metas) else None
    return PairSet(ids, xs, ys, mx, my, meta, source=str(spec), bad_samples=handler.count)


def _worker_info() -> tuple[int, int, int, int]:
    return wds.utils.pytorch_worker_info()


class _SeededShuffle:
    """Buffer shuffle seeded by (seed, rank, worker, epoch): reproducible, different on every rank and worker."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, -1

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        self.epoch += 1
        rank, _, worker, _ = _worker_info()
        rng = random.Random(((self.seed * 1_000_003 + rank) * 1_009 + worker) * 10_007 + self.epoch)
        buf: list[Any] = []
        for item in src:
            if len(buf) < self.bufsize:
                buf.append(item)
                continue
            k = rng.randrange(len(buf))
            buf[k], item = item, buf[k]
            yield item
        rng.shuffle(buf)
        yield from buf


class ShardStream(IterableDataset):
    """Streaming ``(index, x, y)`` from shards for multi-process training; indices come from the shards.

    ``resampled=True`` draws shards with replacement forever (``webdataset.ResampledShards``, deterministic per
    rank, worker, epoch and ``seed``), the usual choice for large corpora and many processes; ``resampled=False``
    reads each shard once per pass, split over ranks then DataLoader workers (needs at least as many shards as
    ranks × workers to keep everyone busy).  ``decode_x`` / ``decode_y`` map a raw side (``str`` or image bytes) to
    what the collator expects.
    """

    def __init__(self, spec: str | os.PathLike[str], *, resampled: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, decode_x: Callable[[Any], Any] | None = None,
                 decode_y: Callable[[Any], Any] | None = None, on_error: str = "raise", key: str | None = None
                 ) -> None:
        super().__init__()
        self.handler = BadSampleHandler(on_error)
        self.files = expand_shards(spec, key=key)
        self.resampled, self.seed, self.shuffle_buffer = resampled, seed, shuffle_buffer
        self.decode_x, self.decode_y = decode_x, decode_y
        stages: list[Any]
        if resampled:
            stages = [wds.ResampledShards(self.files, seed=seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.files), wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=self.handler))
        if shuffle_buffer > 1:
            stages.append(_SeededShuffle(shuffle_buffer, seed))
        stages.append(wds.map(self._decode, handler=self.handler))
        self.pipeline = wds.DataPipeline(*stages)

    @property
    def bad_samples(self) -> int:
        """Samples skipped as corrupt so far (all DataLoader workers), with ``on_error="skip"``."""
        return self.handler.count

    def _decode(self, sample: dict[str, Any]) -> tuple[int, Any, Any]:
        # images are checked by decoding them once, here, not also in _parse_sample
        idx, (_, x), (_, y), _ = _parse_sample(sample, check_images=False)
        out = [idx]
        for side, value, decode in (("x", x, self.decode_x), ("y", y, self.decode_y)):
            try:
                out.append(decode(value) if decode else value)
            except Exception as err:  # PIL raises OSError, SyntaxError, ... for broken images
                raise DataError(f"{_where(sample)} (index {idx}): {side} side does not decode "
                                f"({type(err).__name__}: {err})") from err
        return tuple(out)

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        return iter(self.pipeline)
