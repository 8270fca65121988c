"""Bad paired data: corrupt tar members, truncated shards, images that do not decode, empty captions and duplicate
indices are fatal with the culprit named by default, and skipped and counted under data.on_bad_sample=skip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dual_emc2.data.pairs import PairSet, read_pairs_file, screen_pairs
from dual_emc2.data.shards import ShardStream, read_shards, write_shards
from dual_emc2.train.trainer import Trainer
from tests.test_bimodal import TINY_CLIP, _cfg, _shapes

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    import dual_emc2.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "plot_curves", lambda *args, **kwargs: [])


def _text_pairs(n: int, empty_at: tuple[int, ...] = ()) -> PairSet:
    ys = ["" if k in empty_at else f"document number {k}" for k in range(n)]
    return PairSet(np.arange(n), [f"query {k}" for k in range(n)], ys, source="toy")


def _with_broken_image(n: int, at: int) -> PairSet:
    pairs = _shapes(n)
    xs = list(pairs.x)
    xs[at] = xs[at][:40]  # PNG signature and header, then nothing: does not decode
    return PairSet(pairs.ids, xs, pairs.y, "image", "text", source="shapes")


def test_truncated_shard_is_fatal_naming_it_or_skipped_and_counted(tmp_path):
    write_shards(_text_pairs(60), tmp_path, max_count=20)
    shard = tmp_path / "pairs-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"pairs-000001\.tar.*corrupt tar data.*on_bad_sample=skip"):
        read_shards(tmp_path)
    got = read_shards(tmp_path, on_error="skip")
    # the tar stream stops at the damage (one error) after a sample cut in half (its y member missing: another);
    # the rest of that shard is lost
    assert got.bad_samples == 2
    kept = set(got.ids.tolist())
    assert set(range(20)) | set(range(40, 60)) <= kept and len(kept) < 60
    for k, i in enumerate(got.ids):  # every pair that survived is intact and keeps its index
        assert got.x[k] == f"query {i}" and got.y[k] == f"document number {i}"


def test_garbled_tar_header_is_fatal_naming_the_shard(tmp_path):
    write_shards(_text_pairs(20), tmp_path, max_count=10)
    shard = tmp_path / "pairs-000000.tar"
    data = bytearray(shard.read_bytes())
    data[6 * 512: 6 * 512 + 300] = b"\xff" * 300  # the header of sample 1's first member (3 members x 2 blocks)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"pairs-000000\.tar.*corrupt tar data"):
        read_shards(tmp_path)
    got = read_shards(tmp_path, on_error="skip")  # the damaged shard stops at the bad header; the other is whole
    assert set(range(10, 20)) <= set(got.ids.tolist()) and len(got) < 20 and got.bad_samples >= 1


def test_member_that_does_not_decode_is_named_by_index(tmp_path):
    write_shards(_with_broken_image(12, at=5), tmp_path, max_count=8)
    with pytest.raises(ValueError, match=r"index 1005\).*x\.png: image does not decode"):
        read_shards(tmp_path)
    got = read_shards(tmp_path, on_error="skip")
    assert got.bad_samples == 1 and sorted(got.ids.tolist()) == [1000 + k for k in range(12) if k != 5]


def test_empty_caption_in_shards_and_files(tmp_path):
    write_shards(_text_pairs(10, empty_at=(3, 7)), tmp_path / "s")
    with pytest.raises(ValueError, match=r"index 3\): y\.txt: empty text"):
        read_shards(tmp_path / "s")
    assert read_shards(tmp_path / "s", on_error="skip").bad_samples == 2
    f = tmp_path / "p.tsv"
    f.write_text("x\ty\n" + "".join(f"q{k}\t{'  ' if k == 4 else f'd{k}'}\n" for k in range(8)))
    with pytest.raises(ValueError, match=r"p\.tsv: sample index 4: y side: empty text"):
        screen_pairs(read_pairs_file(f))
    with pytest.warns(UserWarning, match="dropped 1 bad pairs: index 4 y: empty text"):
        kept = screen_pairs(read_pairs_file(f), "skip")
    assert kept.bad_samples == 1 and kept.ids.tolist() == [0, 1, 2, 3, 5, 6, 7]


def test_duplicate_ids_in_a_pairs_file_are_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": k % 5, "x": f"q{k}", "y": f"d{k}"}) + "\n" for k in range(7)))
    with pytest.raises(ValueError, match=r"p\.jsonl: duplicate sample index 0 \(2 indices occur more than once\)"):
        read_pairs_file(f, id_key="id")


def test_streaming_skips_and_counts_bad_samples(tmp_path):
    write_shards(_text_pairs(24, empty_at=(2, 13)), tmp_path, max_count=8)
    stream = ShardStream(tmp_path, resampled=False, shuffle_buffer=0, on_error="skip")
    got = list(stream)
    assert sorted(i for i, _, _ in got) == [k for k in range(24) if k not in (2, 13)]
    assert stream.bad_samples == 2
    with pytest.raises(ValueError, match=r"index 2\): y\.txt: empty text"):
        list(ShardStream(tmp_path, resampled=False, shuffle_buffer=0))


@pytest.fixture(scope="module")
def bad_shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_bimodal")
    write_shards(_with_broken_image(48, at=7), root / "shards", max_count=16)
    (root / "tiny-bimodal-clip.json").write_text(json.dumps(TINY_CLIP))
    return root


def test_trainer_stops_on_a_bad_pair_or_skips_and_reports_it(bad_shard_dir, tmp_path):
    with pytest.raises(ValueError, match=r"index 1007\).*image does not decode"):
        Trainer(_cfg(bad_shard_dir, tmp_path / "a", "eval.enabled=false"))
    assert not (tmp_path / "a").exists()  # nothing written
    t = Trainer(_cfg(bad_shard_dir, tmp_path / "b", "data.on_bad_sample=skip", "eval.enabled=false",
                            "train.max_steps=2"))
    assert 1007 not in set(t.task.train_pairs.ids.tolist()) | set(t.task.eval_pairs.ids.tolist())
    final = t.fit()
    assert final["bad_samples_skipped"] == 1
    assert json.loads((tmp_path / "b" / "final_metrics.json").read_text())["bad_samples_skipped"] == 1
    assert "bad_samples" in (tmp_path / "b" / "metrics.csv").read_text()


def test_stream_trainer_counts_skipped_samples(bad_shard_dir, tmp_path):
    cfg = _cfg(bad_shard_dir, tmp_path, "pairs.streaming=true", "pairs.mask_duplicates=false",
               "data.on_bad_sample=skip", "eval.enabled=false", "train.max_steps=5", "pairs.shuffle_buffer=4",
               "train.batch_size=16")
    t = Trainer(cfg)
    with pytest.warns(UserWarning, match="index 1007"):
        final = t.fit()
    assert final["step"] == 5 and final["bad_samples_skipped"] >= 1
    assert Path(tmp_path / "final_metrics.json").is_file()
