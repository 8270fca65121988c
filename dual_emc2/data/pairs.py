"""Paired data (x, y) — image–caption or query–document — with a stable global integer index per sample.

A :class:`PairSet` holds the raw sides in memory: text as ``str``, images as their encoded file bytes (PNG/JPEG), so
the same set can be written to webdataset shards byte for byte.  The index of a sample is fixed where the pairs are
created (row order of a file, order of an offline set, or the ``index`` field of a shard) and travels with it through
splits, shards and processes: EMC² chain states and SogCLR's u are keyed by it (docs/DESIGN.md, section 3).

:class:`PairDataset` serves ``(index, x, y)`` to a DataLoader, decoding images with a tower's transform; a
:class:`PairCollator` turns a list of such items into ``(ids, x_inputs, y_inputs)`` with each tower's ``prepare``
(tokenizer for text, stacking for images).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dual_emc2.data.data_errors import DataNotFound
from dual_emc2.errors import DataError, UsageError
from dual_emc2.text_files import read_utf8

Modality = Literal["text", "image"]
MODALITIES: tuple[str, ...] = ("text", "image")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

__all__ = [
    "MODALITIES", "Modality", "PairCollator", "PairDataset", "PairSet", "decode_rgb", "group_ids",
    "image_format", "read_image_caption_folder", "read_pairs_file", "relevant_sets",
    "screen_pairs", "side_problem", "split_pairs",
]


def image_format(data: bytes) -> str:
    """File extension (``png``, ``jpg``, ...) of encoded image bytes, from their signature; ValueError otherwise."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    raise ValueError(f"not an encoded image (PNG/JPEG/WebP/BMP/GIF): starts with {data[:8]!r}")


def decode_rgb(data: bytes, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode image bytes to an RGB PIL image; transparent pixels are composited onto ``background`` (emoji PNGs
    are RGBA with a transparent background, which a plain ``convert("RGB")`` would turn black)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def side_problem(value: Any, modality: str) -> str | None:
    """Why one side of a pair cannot be trained on, or None: empty / whitespace-only text, or image bytes that are not
    a complete decodable image (PIL's header and data checks)."""
    if modality == "text":
        return "empty text" if not str(value).strip() else None
    try:
        image_format(bytes(value))
        with Image.open(io.BytesIO(bytes(value))) as img:
            img.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"image does not decode ({type(err).__name__}: {err})"
    return None


def screen_pairs(pairs: PairSet, on_bad: str = "raise") -> PairSet:
    """Check every pair with :func:`side_problem`.  ``on_bad="raise"``: the first bad pair is a ValueError naming the
    source, its index and side; ``"skip"``: bad pairs are dropped, a warning names the first ones, and the result's
    ``bad_samples`` counts them."""
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    bad: list[tuple[int, str]] = []
    for k in range(len(pairs)):
        for side, value, mod in (("x", pairs.x[k], pairs.x_modality), ("y", pairs.y[k], pairs.y_modality)):
            why = side_problem(value, mod)
            if why is None:
                continue
            if on_bad == "raise":
                raise DataError(f"{pairs.source}: sample index {int(pairs.ids[k])}: {side} side: {why} "
                                "(data.on_bad_sample=skip drops such pairs and counts them)")
            bad.append((k, f"index {int(pairs.ids[k])} {side}: {why}"))
            break
    if not bad:
        return pairs
    warnings.warn(f"{pairs.source}: dropped {len(bad)} bad pairs: " + "; ".join(m for _, m in bad[:3]) +
                  (" ..." if len(bad) > 3 else ""), stacklevel=2)
    drop = {k for k, _ in bad}
    kept = pairs.subset([k for k in range(len(pairs)) if k not in drop])
    kept.bad_samples = pairs.bad_samples + len(bad)
    return kept


def _side_key(value: Any, modality: str) -> str:
    if modality == "text":
        return value
    return hashlib.sha1(value).hexdigest()


def group_ids(values: Sequence[Any], modality: str) -> np.ndarray:
    """int64 id per item such that two items share an id iff they are identical (same text, or same image bytes)."""
    keys = [_side_key(v, modality) for v in values]
    _, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return inverse.astype(np.int64).reshape(-1)


@dataclass
class PairSet:
    """Pairs in memory: ``ids[k]`` is the global index of ``(x[k], y[k])``.

    ``x`` and ``y`` hold ``str`` for the ``"text"`` modality and encoded image ``bytes`` for ``"image"``;
    ``meta`` optionally holds one JSON-serialisable dict per pair (e.g. an emoji's category); ``source`` names where
    the pairs came from, for error messages.  Duplicate indices are an error naming the index.

    Args:
        ids: [n] int global index of each pair, distinct, ≥ 0.
        x, y: the two sides, n items each.
        x_modality, y_modality: ``"text"`` (default) or ``"image"``.
        meta: one dict per pair, or None.
        source: where the pairs came from.
        bad_samples: pairs dropped as unreadable while this set was read (:func:`screen_pairs`).

    Example::

        pairs = PairSet([0, 1, 2], ["dog", "cat", "oak"], ["a canine", "a feline", "a tree"], source="toy")
        train, held_out = split_pairs(pairs, eval_size=1)
        pairs.position_of(torch.tensor([2, 0]))          # array([2, 0])
    """

    ids: np.ndarray
    x: list[Any]
    y: list[Any]
    x_modality: str = "text"
    y_modality: str = "text"
    meta: list[dict[str, Any]] | None = None
    source: str = "pairs"
    bad_samples: int = field(default=0, compare=False)  # pairs dropped as unreadable while this set was read
    _groups: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        n = self.ids.shape[0]
        if len(self.x) != n or len(self.y) != n:
            raise ValueError(f"{self.source}: {n} ids but {len(self.x)} x items and {len(self.y)} y items")
        if self.meta is not None and len(self.meta) != n:
            raise ValueError(f"{self.source}: {n} ids but {len(self.meta)} meta entries")
        for side, mod in (("x", self.x_modality), ("y", self.y_modality)):
            if mod not in MODALITIES:
                raise ValueError(f"{self.source}: {side}_modality must be one of {MODALITIES}, got {mod!r}")
        if n and int(self.ids.min()) < 0:
            bad = int(self.ids[self.ids < 0][0])
            raise ValueError(f"{self.source}: sample index {bad} is negative; indices must be integers >= 0")
        srt = np.sort(self.ids)
        dup = srt[1:][srt[1:] == srt[:-1]]
        if dup.size:
            raise ValueError(f"{self.source}: duplicate sample index {int(dup[0])} "
                             f"({np.unique(dup).size} indices occur more than once); every pair needs its own index")
        for side, items, mod in (("x", self.x, self.x_modality), ("y", self.y, self.y_modality)):
            want = str if mod == "text" else (bytes, bytearray)
            for k, v in enumerate(items):
                if not isinstance(v, want):
                    raise TypeError(f"{self.source}: {side} of sample index {int(self.ids[k])} must be "
                                    f"{'str' if mod == 'text' else 'encoded image bytes'} for modality {mod!r}, "
                                    f"got {type(v).__name__}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_keys(self) -> int:
        """Size of per-sample state tables: largest index + 1."""
        return int(self.ids.max()) + 1 if len(self) else 1

    def groups(self, side: str) -> np.ndarray:
        """:func:`group_ids` of side ``"x"`` or ``"y"`` (cached)."""
        if side not in ("x", "y"):
            raise ValueError(f"side must be 'x' or 'y', got {side!r}")
        if side not in self._groups:
            items, mod = (self.x, self.x_modality) if side == "x" else (self.y, self.y_modality)
            self._groups[side] = group_ids(items, mod)
        return self._groups[side]

    def subset(self, positions: Sequence[int] | np.ndarray, source: str | None = None) -> PairSet:
        """The pairs at ``positions`` (not indices), indices kept."""
        pos = np.asarray(positions, dtype=np.int64)
        return PairSet(self.ids[pos], [self.x[i] for i in pos], [self.y[i] for i in pos], self.x_modality,
                       self.y_modality, None if self.meta is None else [self.meta[i] for i in pos],
                       source or self.source)

    def position_of(self, ids: Tensor | np.ndarray) -> np.ndarray:
        """Positions of global indices ``ids`` in this set; KeyError naming the first unknown index."""
        q = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).reshape(-1)
        order = np.argsort(self.ids, kind="stable")
        srt = self.ids[order]
        pos = np.searchsorted(srt, q).clip(max=max(len(srt) - 1, 0))
        missing = (srt[pos] != q) if len(srt) else np.ones_like(q, dtype=bool)
        if missing.any():
            raise KeyError(f"{self.source}: no sample with index {int(q[missing][0])}")
        return order[pos]


def split_pairs(pairs: PairSet, eval_size: int, train_size: int | None = None, seed: int = 0
                ) -> tuple[PairSet, PairSet | None]:
    """Seeded held-out split: a permutation of the pairs from ``seed``; its first ``eval_size`` pairs are the
    held-out set, the next ``train_size`` (all the rest when None) the training set.  Both keep their indices and
    are sorted by index.  ``eval_size=0`` gives no held-out set."""
    n = len(pairs)
    if eval_size < 0 or (train_size is not None and train_size < 1):
        raise ValueError(f"pairs.eval_size must be >= 0 and pairs.train_size >= 1, got {eval_size}, {train_size}")
    rest = n - eval_size
    if rest < 1 or (train_size is not None and train_size > rest):
        raise ValueError(f"{pairs.source}: {n} pairs cannot give {eval_size} held-out and "
                         f"{train_size if train_size is not None else 'at least 1'} training pairs")
    perm = np.random.default_rng(seed).permutation(n)
    held = np.sort(perm[:eval_size])
    train = np.sort(perm[eval_size:eval_size + (train_size if train_size is not None else rest)])
    train_set = pairs.subset(train, f"{pairs.source} [train split]")
    train_set.bad_samples = pairs.bad_samples  # what reading the source dropped, reported with the training set
    return train_set, pairs.subset(held, f"{pairs.source} [held-out split]") if eval_size else None


def relevant_sets(pairs: PairSet, direction: str = "x2y") -> list[set[int]]:
    """Relevant documents (positions) of every query: for ``"x2y"`` query x_i has as relevant every y_j whose pair
    has the same x (e.g. a WordNet lemma list shared by several synsets) or the same y as pair i; ``"y2x"``
    likewise.  The relation is symmetric, so both directions give the same sets; the own pair is always relevant."""
    if direction not in ("x2y", "y2x"):
        raise ValueError(f"direction must be 'x2y' or 'y2x', got {direction!r}")
    gx, gy = pairs.groups("x"), pairs.groups("y")
    by_x: dict[int, list[int]] = {}
    by_y: dict[int, list[int]] = {}
    for j, (a, b) in enumerate(zip(gx.tolist(), gy.tolist())):
        by_x.setdefault(a, []).append(j)
        by_y.setdefault(b, []).append(j)
    return [set(by_x[a]) | set(by_y[b]) for a, b in zip(gx.tolist(), gy.tolist())]


# ------------------------------------------------------------------------------------------------------- readers


def _read_rows(path: Path, what: str = "pairs file") -> list[dict[str, Any]]:
    """Rows of a JSONL / CSV / TSV file; text that is not UTF-8, bad JSON and unknown suffixes are a DataError
    naming the file and line."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".tab"):
        raise DataError(f"{path}: unsupported {what} type {suffix!r}; expected .csv, .tsv or .jsonl")
    text = read_utf8(path, DataError, what)
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        for line_no, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON line: {err}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
        return rows
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix != ".csv" else ","))
    except csv.Error as err:
        raise DataError(f"{path}: not a readable {suffix[1:].upper()} file ({err})") from None


def _column(rows: list[dict[str, Any]], key: str, path: Path) -> list[Any]:
    out = []
    for k, row in enumerate(rows):
        if key not in row or row[key] is None:
            have = ", ".join(map(str, row)) or "none"
            if k == 0:  # no such column at all: the key is wrong, not the data
                raise UsageError(f"{path}: row 1 has no field {key!r} (fields: {have}); name one of its columns "
                                 "(make-shards: the --*-key options; configs: pairs.x_key / y_key / id_key)")
            raise DataError(f"{path}: row {k + 1} has no field {key!r} (fields: {have})")
        out.append(row[key])
    return out


def _indices(rows: list[dict[str, Any]], id_key: str | None, path: Path) -> np.ndarray:
    if id_key is None:
        return np.arange(len(rows), dtype=np.int64)
    out = []
    for k, raw in enumerate(_column(rows, id_key, path)):
        try:
            value = int(raw)
            if isinstance(raw, float) and raw != value:
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"{path}: row {k + 1}: field {id_key!r} must be an integer index, got {raw!r}") from None
        out.append(value)
    return np.asarray(out, dtype=np.int64)


def read_pairs_file(path: str | os.PathLike[str], x_key: str = "x", y_key: str = "y", id_key: str | None = None
                    ) -> PairSet:
    """Text pairs from a UTF-8 CSV (header row), TSV (header row) or JSONL file: columns ``x_key`` and ``y_key``, and
    the index from column ``id_key`` (row order from 0 when None).  A missing file, bytes that are not UTF-8 (the
    line and byte offset named), a bad JSON line or a missing column are a DataError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFound(f"pairs file not found: {p}")
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"{p}: no pairs found")
    xs = [str(v) for v in _column(rows, x_key, p)]
    ys = [str(v) for v in _column(rows, y_key, p)]
    return PairSet(_indices(rows, id_key, p), xs, ys, "text", "text", source=str(p))


def read_image_caption_folder(folder: str | os.PathLike[str], captions: str | os.PathLike[str],
                              file_key: str = "file", caption_key: str = "caption", id_key: str | None = None
                              ) -> PairSet:
    """Image–caption pairs: ``captions`` is a CSV/TSV/JSONL file naming each image (column ``file_key``, a path
    relative to ``folder``) and its caption.  Images are kept as their encoded bytes (x = image, y = text)."""
    root, cap = Path(folder), Path(captions)
    if not root.is_dir():
        raise DataNotFound(f"image folder not found: {root}")
    if not cap.is_file():
        raise DataNotFound(f"captions file not found: {cap}")
    rows = _read_rows(cap, "captions file")
    if not rows:
        raise DataError(f"{cap}: no captions found")
    images = []
    for name in _column(rows, file_key, cap):
        f = root / str(name)
        if not f.is_file():
            raise DataNotFound(f"{cap}: image {name!r} not found in {root}")
        data = f.read_bytes()
        try:
            image_format(data)
        except ValueError as err:
            raise DataError(f"{f}: {err}") from None
        images.append(data)
    texts = [str(v) for v in _column(rows, caption_key, cap)]
    return PairSet(_indices(rows, id_key, cap), images, texts, "image", "text", source=str(cap))


# ---------------------------------------------------------------------------------------------- torch datasets


class PairDataset(Dataset):
    """Map-style dataset of ``(index, x, y)``: text stays ``str``; image bytes are decoded to RGB and passed
    through ``x_transform`` / ``y_transform`` (e.g. resize + to-tensor + normalise).

    Args:
        pairs: the :class:`PairSet`; item ``k`` is its ``k``-th pair, returned with its global index.
        x_transform, y_transform: PIL RGB → model input, required for an image side.

    Example::

        ds = PairDataset(emoji_pairs(), x_transform=image_transform(64, (0.5,) * 3, (0.5,) * 3))
        index, image, caption = ds[0]                    # int, [3, 64, 64] tensor, str
        text = HFTextBackbone(minilm_path())
        loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=PairCollator(stack_images, text.tokenize))
    """

    def __init__(self, pairs: PairSet, x_transform: Callable[[Image.Image], Any] | None = None,
                 y_transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.pairs = pairs
        self.bad_samples = pairs.bad_samples  # pairs are screened when read (screen_pairs); none are skipped later
        self.x_transform, self.y_transform = x_transform, y_transform
        for side, mod, tf in (("x", pairs.x_modality, x_transform), ("y", pairs.y_modality, y_transform)):
            if mod == "image" and tf is None:
                raise ValueError(f"{pairs.source}: side {side} holds images; give a {side}_transform")

    def __len__(self) -> int:
        return len(self.pairs)

    def _side(self, value: Any, modality: str, tf: Callable | None) -> Any:
        if modality == "text":
            return value
        return tf(decode_rgb(value))

    def __getitem__(self, k: int) -> tuple[int, Any, Any]:
        p = self.pairs
        return (int(p.ids[k]), self._side(p.x[k], p.x_modality, self.x_transform),
                self._side(p.y[k], p.y_modality, self.y_transform))


class PairCollator:
    """``[(index, x, y), ...]`` → ``(ids [b] int64, prepare_x([x...]), prepare_y([y...]))``; a plain object so that
    DataLoader workers can pickle it.

    Args:
        prepare_x, prepare_y: collate one side's items (a tower's ``prepare``: tokenise texts, stack images).

    Example::

        collate = PairCollator(model.x_tower.prepare, model.y_tower.prepare)     # model: a TwoTowerModel
        ids, x_inputs, y_inputs = collate([ds[0], ds[1]])
    """

    def __init__(self, prepare_x: Callable[[list[Any]], Any], prepare_y: Callable[[list[Any]], Any]) -> None:
        self.prepare_x, self.prepare_y = prepare_x, prepare_y

    def __call__(self, items: list[tuple[int, Any, Any]]) -> tuple[Tensor, Any, Any]:
        ids = torch.tensor([int(i) for i, _, _ in items], dtype=torch.int64)
        return ids, self.prepare_x([x for _, x, _ in items]), self.prepare_y([y for _, _, y in items])
