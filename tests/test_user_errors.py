"""Bad input a user can fix is one error of dual_emc2.errors naming the file / key / sample and the fix, with its
exit code, also when it is raised in a DataLoader worker process; and nothing the user gave is changed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dual_emc2.cli import make_shards
from dual_emc2.data.augment import eval_transform
from dual_emc2.data.data_errors import DataNotFound, UnreadableSample
from dual_emc2.data.image_sets import build_image_dataset, load_class_list
from dual_emc2.data.pairs import PairSet, decode_rgb, read_pairs_file
from dual_emc2.data.shards import ShardStream, write_shards
from dual_emc2.data.views import MultiViewDataset
from dual_emc2.errors import DataError, DualEMC2Error, UsageError, exit_code_of
from dual_emc2.loss.errors import OptionError
from dual_emc2.loss.registry import build_estimator, options_for
from dual_emc2.train.config import ConfigError, load_config
from dual_emc2.train.pair_sources import load_pair_sets
from dual_emc2.train.schema import PairsConfig


def _png(value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- A1: an unreadable image
@pytest.fixture()
def image_folder_with_a_broken_file(tmp_path: Path) -> tuple[Path, Path]:
    wnids = sorted(load_class_list()[:2])
    for c, wnid in enumerate(wnids):
        d = tmp_path / "train" / wnid
        d.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((8, 8, 3), 50 * c + k, np.uint8)).save(d / f"img{k}.JPEG", format="PNG")
    broken = tmp_path / "train" / wnids[1] / "img0.JPEG"
    broken.write_bytes(_png(3)[:30])  # a PNG cut inside its header
    (tmp_path / "classes.txt").write_text("\n".join(wnids) + "\n")
    return tmp_path, broken


def _views(root: Path) -> MultiViewDataset:
    base = build_image_dataset("imagenet100", "train", root=root, class_list=root / "classes.txt")
    return MultiViewDataset(base, eval_transform(8, (0.5,) * 3, (0.5,) * 3))


def test_unreadable_image_is_a_data_error_naming_file_sample_and_fix(image_folder_with_a_broken_file):
    root, broken = image_folder_with_a_broken_file
    with pytest.raises(UnreadableSample) as e:
        _views(root)[2]
    err = e.value
    assert isinstance(err, DataError) and exit_code_of(err) == 3
    msg = str(err)
    assert str(broken) in msg and "sample id 2" in msg and "data.on_bad_sample=skip" in msg and "\n" not in msg
    assert broken.stat().st_size == 30  # the file is left as it was


def test_unreadable_image_keeps_its_message_through_a_dataloader_worker(image_folder_with_a_broken_file):
    root, broken = image_folder_with_a_broken_file
    loader = DataLoader(_views(root), batch_size=1, num_workers=1)
    with pytest.raises(UnreadableSample) as e:
        list(loader)
    msg = str(e.value)
    assert not msg.startswith("Caught") and "Traceback" not in msg and "\n" not in msg
    assert str(broken) in msg and "sample id 2" in msg and "data.on_bad_sample=skip" in msg
    assert "DataLoader worker process 0" in e.value.worker_traceback  # kept for debugging


def test_worker_reraise_text_is_unwrapped_for_every_project_error():
    original = "pairs.eval_path=x: shard folder not found: x"
    wrapped = (f"Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               f'  File "w.py", line 1, in f\n    raise DataError(...)\ndual_emc2.errors.DataError: {original}\n')
    err = DataError(wrapped)
    assert str(err) == original and err.worker_traceback == wrapped
    assert str(UsageError(wrapped)) == wrapped  # another type's text is left alone
    assert str(DataError("Caught my breath")) == "Caught my breath"


# ------------------------------------------------------------------------- A2: a truncated image in shards
def test_truncated_image_in_streamed_shards_names_shard_key_index_and_fix(tmp_path: Path):
    xs = [_png(10 * k) for k in range(6)]
    xs[4] = xs[4][:45]
    write_shards(PairSet(np.arange(100, 106), xs, [f"caption {k}" for k in range(6)], "image", "text"), tmp_path,
                 max_count=3)
    stream = ShardStream(tmp_path, resampled=False, shuffle_buffer=0, decode_x=decode_rgb)
    with pytest.raises(DataError) as e:
        list(DataLoader(stream, batch_size=None, num_workers=1))
    msg = str(e.value)
    assert exit_code_of(e.value) == 3 and "Traceback" not in msg
    assert "pairs-000001.tar" in msg and "'000000000104'" in msg and "index 104" in msg
    assert "data.on_bad_sample=skip" in msg


def test_missing_eval_shards_name_pairs_eval_path(tmp_path: Path):
    write_shards(PairSet(np.arange(8), [f"q{k}" for k in range(8)], [f"d{k}" for k in range(8)]), tmp_path / "tr")
    cfg = PairsConfig(source="shards", path=str(tmp_path / "tr"), eval_path=str(tmp_path / "eval"))
    with pytest.raises(DataNotFound, match=r"pairs\.eval_path=.*eval: shard folder not found") as e:
        load_pair_sets(cfg)
    assert exit_code_of(e.value) == 3 and isinstance(e.value, FileNotFoundError)
    cfg = PairsConfig(source="shards", path=str(tmp_path / "nothing"))
    with pytest.raises(DataNotFound, match=r"pairs\.path=.*nothing"):
        load_pair_sets(cfg)


# ---------------------------------------------------------------------------- A3: estimator option values
@pytest.mark.parametrize(("options", "expected"), [
    ({"emc2": {"burn_in": "abc"}}, r"loss\.options\.emc2\.burn_in: expected int or null, got str 'abc'"),
    ({"emc2": {"reencode_fraction": "half"}}, r"loss\.options\.emc2\.reencode_fraction: expected float, got str"),
    ({"emc2": {"map_state_into_batch": 1}}, r"map_state_into_batch: expected bool, got int 1"),
    ({"sogclr": {"gamma": [0.9]}}, r"loss\.options\.sogclr\.gamma: expected float, got list"),
    ({"emc2": {"burnin": 3}}, r"unknown option 'loss\.options\.emc2\.burnin' \(did you mean 'burn_in'\?\)"),
])
def test_estimator_option_of_the_wrong_type_is_a_usage_error(options, expected):
    with pytest.raises(OptionError, match=expected) as e:
        options_for("emc2", options)
    assert exit_code_of(e.value) == 2 and isinstance(e.value, ValueError)


def test_valid_option_values_still_pass():
    assert options_for("emc2", {"emc2": {"weights": "visits", "burn_in": 3, "steps": 8, "reencode_fraction": 1}}) \
        == {"weights": "visits", "burn_in": 3, "steps": 8, "reencode_fraction": 1}
    with pytest.raises(OptionError, match="burn_in: expected int or null, got str"):
        build_estimator("emc2", num_keys=4, num_candidates=4, options={"burn_in": "abc"})


# ----------------------------------------------------------------------------------- A4: files not in UTF-8
def test_config_yaml_that_is_not_utf8_names_file_line_and_offset(tmp_path: Path):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"seed: 0\n# caf\xe9 au lait\nmode: bimodal\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert str(cfg) in msg and "line 2, column 6" in msg and "byte offset 13" in msg and "0xe9" in msg
    assert exit_code_of(e.value) == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv"])
def test_pairs_file_that_is_not_utf8_names_file_line_and_offset(tmp_path: Path, suffix: str):
    f = tmp_path / f"pairs{suffix}"
    good = ('{"x": "q0", "y": "d0"}\n' if suffix == ".jsonl" else "x\ty\nq0\td0\n").encode()
    bad = b'{"x": "na\xefve", "y": "d1"}\n' if suffix == ".jsonl" else b"na\xefve\td1\n"
    f.write_bytes(good + bad)
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(DataError, match=rf"pairs{suffix}: the pairs file is not UTF-8: byte 0xef at line {line}") \
            as e:
        read_pairs_file(f)
    assert exit_code_of(e.value) == 3 and f"byte offset {len(good) + bad.index(0xEF)}" in str(e.value)


def test_make_shards_reports_a_bad_pairs_file_with_exit_3_and_writes_nothing(tmp_path: Path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"x": "a", "y": "b"}\n{"x": "\xff", "y": "c"}\n')
    code = make_shards.main(["--out", str(tmp_path / "shards"), "pairs", str(f)])
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("error: ") and err.count("\n") == 1 and "line 2" in err
    assert not (tmp_path / "shards").exists()


# ----------------------------------------------------------------------- B: a data.root that is not there
def test_fashion_mnist_root_that_does_not_hold_it_is_named(tmp_path: Path):
    with pytest.raises(DataNotFound, match=r"data\.root=.*nowhere does not exist") as e:
        build_image_dataset("fashion_mnist", "train", root=tmp_path / "nowhere")
    assert exit_code_of(e.value) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFound, match=r"data\.root=.*empty does not hold the fashion_mnist/test IDX files "
                                           r"\['t10k-images-idx3-ubyte\.gz'"):
        build_image_dataset("fashion_mnist", "test", root=tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataNotFound, match="is not a folder"):
        build_image_dataset("fashion_mnist", "test", root=tmp_path / "file")


def test_every_project_error_has_its_exit_code():
    assert [exit_code_of(c("m")) for c in (UsageError, ConfigError, DataError, DataNotFound, UnreadableSample)] == \
        [2, 2, 3, 3, 3]
    assert exit_code_of(FileNotFoundError("x")) == 2 and issubclass(DataNotFound, DualEMC2Error)


def test_json_lines_may_hold_unicode_line_separators(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"x": "a\u2028b", "y": "c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_pairs_file(f).x == ["a\u2028b"]
