"""Unreadable images: fatal by default with the file named; skipped and counted under data.on_bad_sample=skip."""
import numpy as np
import pytest
from PIL import Image

from dual_emc2.data.augment import eval_transform
from dual_emc2.data.image_sets import UnreadableSample, build_image_dataset, load_class_list
from dual_emc2.data.views import MultiViewDataset


@pytest.fixture()
def folder_with_a_broken_image(tmp_path):
    wnids = sorted(load_class_list()[:2])  # label 0 = first in sorted order
    for c, wnid in enumerate(wnids):
        d = tmp_path / "train" / wnid
        d.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((12, 12, 3), 40 * c + k, np.uint8)).save(d / f"img{k}.JPEG", format="PNG")
    broken = tmp_path / "train" / wnids[0] / "img1.JPEG"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (tmp_path / "classes.txt").write_text("\n".join(wnids) + "\n")
    return tmp_path, broken


def test_unreadable_image_is_fatal_and_named(folder_with_a_broken_image):
    root, broken = folder_with_a_broken_image
    base = build_image_dataset("imagenet100", "train", root=root, class_list=root / "classes.txt")
    ds = MultiViewDataset(base, eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    assert ds[0][0] == 0
    with pytest.raises(UnreadableSample, match=str(broken.name)) as e:
        ds[1]
    assert "sample id 1" in str(e.value)


def test_unreadable_image_skipped_and_counted(folder_with_a_broken_image):
    root, _ = folder_with_a_broken_image
    base = build_image_dataset("imagenet100", "train", root=root, class_list=root / "classes.txt")
    ds = MultiViewDataset(base, eval_transform(8, (0.5,) * 3, (0.5,) * 3), on_error="skip")
    with pytest.warns(UserWarning, match="skipped"):
        idx, views, label = ds[1]
    assert idx == 2 and views.shape == (2, 3, 8, 8) and label == 0
    assert ds.bad_samples == 1
    assert [ds[i][0] for i in (0, 3, 4, 5)] == [0, 3, 4, 5] and ds.bad_samples == 1
