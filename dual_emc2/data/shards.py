"""Webdataset tar shards of pairs, with the global integer index of every sample written at shard creation.

Layout of one sample (webdataset groups tar members by the key before the first dot)::

    000000000042.index.cls   b"42"                 the global index (also the key, zero-padded)
    000000000042.x.txt       UTF-8 text            or x.png / x.jpg: the encoded image bytes as given
    000000000042.y.txt       ...
    000000000042.meta.json   optional per-sample metadata

plus a ``manifest.json`` beside the shards (modalities, per-shard sample counts and index ranges).  Two readers:
:func:`read_shards` loads every sample into a :class:`~dual_emc2.data.pairs.PairSet` (exact epochs with the
rank-invariant :class:`~dual_emc2.data.samplers.GlobalBatchSampler`; fine up to a few million short pairs), and
:class:`ShardStream` streams them for corpora that do not fit in memory: passes over the shards in seeded orders,
dealt out to ranks × DataLoader workers so that they read disjoint samples, each shard shuffled in a seeded buffer;
the stream is a function of the seed and the position (a resumed run continues it), and yields ``(index, x, y)``
with the index intact.
"""
from __future__ import annotations

import json
import os
import random
import tarfile
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

__all__ = ["MANIFEST", "ShardStream", "expand_shards", "read_manifest", "read_shards", "shard_sample_counts",
           "write_shards"]


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


_M64 = (1 << 64) - 1


def _seed(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 over the parts: well mixed, the same on every process and platform,
    cheap enough to run per sample)."""
    h = 0
    for part in parts:
        z = (h + (part & _M64) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        h = z ^ (z >> 31)
    return h


def _tar_sample_count(path: str) -> int:
    """Samples in a tar shard (webdataset groups members by the path up to the first dot of the file name), read
    from the member headers only."""
    count, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                head, _, _ = member.name.rpartition("/")
                key = f"{head}/{member.name[len(head) + 1:].split('.', 1)[0]}" if head else member.name.split(".")[0]
                if key != last:
                    count, last = count + 1, key
    except tarfile.TarError:
        pass  # a truncated tar: what could be read (its reader hits the same end)
    return count


def shard_sample_counts(files: list[str]) -> list[int]:
    """Samples per shard file: from the ``manifest.json`` beside it when it lists the file, else counted from the
    tar headers."""
    listed: dict[Path, dict[str, int]] = {}
    counts = []
    for f in files:
        p = Path(f)
        if p.parent not in listed:
            try:
                listed[p.parent] = {s["file"]: int(s["count"]) for s in read_manifest(p.parent)["shards"]}
            except DataError:
                listed[p.parent] = {}
        n = listed[p.parent].get(p.name)
        counts.append(_tar_sample_count(f) if n is None else n)
    return counts


def _buffer_shuffle(src: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of ``bufsize`` items (a full shuffle when it holds the whole source)."""
    if bufsize <= 1:
        yield from src
        return
    buf: list[Any] = []
    for item in src:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Streaming ``(index, x, y)`` from shards for multi-process training; indices come from the shards.

    The stream is a function of ``seed`` and the position alone.  Shards are dealt out in passes: pass ``p``
    permutes them with a generator seeded by ``(seed, p)``, and reader ``s = rank · K + worker`` of ``R`` ranks ×
    ``K`` DataLoader workers reads shards ``s, s + R·K, s + 2·R·K, …`` of that permutation, each shard's samples
    shuffled in a buffer of ``shuffle_buffer`` seeded by ``(seed, p, shard)``.  Within a pass every sample is read by
    exactly one rank and worker, once (with fewer shards than R·K, each shard is split into interleaved parts so that
    every reader has one).  ``resampled=True`` runs passes one after the other forever (a fresh permutation each
    time), ``False`` one pass.

    :meth:`set_position` makes the next iteration start after a given number of loader batches: each worker skips
    the samples of the batches it served (whole shards by their manifest counts, without reading them; inside the
    current shard by reading without decoding), so a resumed run reads what the uninterrupted run would have read.
    ``decode_x`` / ``decode_y`` map a raw side (``str`` or image bytes) to what the collator expects; their random
    augmentations are seeded by ``(seed, pass, index)``.  ``rank`` /
    ``world_size``: this process (default: torch.distributed or the ``RANK`` / ``WORLD_SIZE`` variables).

    Args:
        spec: a shard folder, one ``.tar`` file or a brace pattern (:func:`expand_shards`).
        resampled: endless passes (True) or one pass.
        seed: seed of the shard orders, the shuffle buffers and the augmentations.
        shuffle_buffer: samples in each shard's shuffle buffer.
        decode_x, decode_y: raw side → collator input (e.g. ``lambda b: transform(decode_rgb(b))``), or None.
        on_error: ``"raise"`` (default) or ``"skip"`` for corrupt samples (config key ``data.on_bad_sample``).
        key: the config key that named ``spec``, for error messages.
        rank, world_size: as above.

    Example::

        stream = ShardStream("data/shards", seed=0, decode_x=lambda b: tf(decode_rgb(b)))
        stream.set_position(batches=1200, batch_size=256)          # resume after 1200 batches of this rank
        loader = DataLoader(stream, batch_size=256, num_workers=4,
                            collate_fn=PairCollator(stack_images, text_backbone.tokenize))
    """

    def __init__(self, spec: str | os.PathLike[str], *, resampled: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, decode_x: Callable[[Any], Any] | None = None,
                 decode_y: Callable[[Any], Any] | None = None, on_error: str = "raise", key: str | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.handler = BadSampleHandler(on_error)
        self.files = expand_shards(spec, key=key)
        self.counts = shard_sample_counts(self.files)
        if not any(self.counts):
            raise DataError(f"{_named(key, spec)}: the shards hold no samples")
        self.resampled, self.seed, self.shuffle_buffer = resampled, seed, shuffle_buffer
        self.decode_x, self.decode_y = decode_x, decode_y
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.batch_size = 0, 0

    @property
    def bad_samples(self) -> int:
        """Samples skipped as corrupt so far (all DataLoader workers), with ``on_error="skip"``."""
        return self.handler.count

    def set_position(self, batches: int, batch_size: int) -> None:
        """Start the next iteration after ``batches`` loader batches of ``batch_size`` samples on this rank (the
        DataLoader's workers serve batches in turn: worker ``k`` of ``K`` serves batches ``k, k + K, …``).  The
        dataset is copied into the workers when an iteration starts, so set it before ``iter(loader)``."""
        if batches < 0 or batch_size < 1:
            raise ValueError(f"need batches >= 0 and batch_size >= 1, got {batches} and {batch_size}")
        self.start_batch, self.batch_size = batches, batch_size

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        rank, world, worker, workers = _worker_info()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        return self.samples(rank, world, worker, workers)

    def samples(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1
                ) -> Iterator[tuple[int, Any, Any]]:
        """What DataLoader worker ``worker`` of ``num_workers`` on rank ``rank`` of ``world_size`` yields from the
        position of :meth:`set_position` (no worker processes needed: tests, tools)."""
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise ValueError(f"rank {rank} of {world_size}, worker {worker} of {num_workers}")
        n = self.start_batch
        role = (worker + n) % num_workers  # the worker that serves batch n + worker in an uninterrupted iteration
        served = -(-(n - role) // num_workers) if n > role else 0  # batches that worker served before batch n
        return self._reader(rank * num_workers + role, world_size * num_workers, served * self.batch_size)

    # ------------------------------------------------------------------------------------------------ passes
    def _units(self, readers: int) -> tuple[int, list[int]]:
        """(parts per shard, samples per unit): unit ``u`` is part ``u % parts`` (every ``parts``-th sample) of shard
        ``u // parts``; one part per shard unless there are fewer shards than readers."""
        parts = max(1, -(-readers // len(self.files)))
        return parts, [max(0, -(-(c - q) // parts)) for c in self.counts for q in range(parts)]

    def _pass_units(self, p: int, n_units: int, reader: int, readers: int) -> list[int]:
        return np.random.default_rng(_seed(self.seed, 0, p)).permutation(n_units)[reader::readers].tolist()

    def _reader(self, reader: int, readers: int, skip: int) -> Iterator[tuple[int, Any, Any]]:
        """Reader ``reader`` of ``readers``: its units of pass 0, 1, …, after skipping ``skip`` samples."""
        parts, sizes = self._units(readers)
        p = 0
        while p == 0 or self.resampled:
            for unit in self._pass_units(p, len(sizes), reader, readers):
                if skip >= sizes[unit]:
                    skip -= sizes[unit]
                    continue
                yield from self._read_unit(p, unit, parts, skip)
                skip = 0
            p += 1

    def _read_unit(self, p: int, unit: int, parts: int, skip: int) -> Iterator[tuple[int, Any, Any]]:
        shard, part = divmod(unit, parts)
        raw: Iterator[dict[str, Any]] = wds.tarfile_to_samples(handler=self.handler)(iter([{"url": self.files[shard]}]))
        if parts > 1:
            raw = (s for k, s in enumerate(raw) if k % parts == part)
        order = _buffer_shuffle(raw, self.shuffle_buffer, random.Random(_seed(self.seed, 1, p, unit)))
        for k, sample in enumerate(order):
            if k < skip:
                continue  # served before the position: read, not decoded
            try:
                yield self._decode(sample, p)
            except Exception as err:  # noqa: BLE001 - the handler raises (naming the sample) or counts and skips
                if not self.handler(err):
                    return

    def _decode(self, sample: dict[str, Any], p: int) -> tuple[int, Any, Any]:
        """(index, x, y) of a raw sample read in pass ``p``; random augmentations in the decoders draw from torch's
        CPU generator seeded by ``(seed, p, index)`` (the caller's RNG is left untouched), so they do not depend on
        the worker, the process or what was trained before."""
        # images are checked by decoding them once, here, not also in _parse_sample
        idx, (_, x), (_, y), _ = _parse_sample(sample, check_images=False)
        if self.decode_x is None and self.decode_y is None:
            return idx, x, y
        out = [idx]
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_seed(self.seed, 2, p, idx))
            for side, value, decode in (("x", x, self.decode_x), ("y", y, self.decode_y)):
                try:
                    out.append(decode(value) if decode else value)
                except Exception as err:  # PIL raises OSError, SyntaxError, ... for broken images
                    raise DataError(f"{_where(sample)} (index {idx}): {side} side does not decode "
                                    f"({type(err).__name__}: {err})") from err
        return tuple(out)
