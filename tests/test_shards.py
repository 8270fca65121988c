"""Webdataset shards: write → read keeps every index and pair, streaming keeps indices over ranks, clear errors."""
from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dual_emc2.data.pairs import PairSet
from dual_emc2.data.shards import ShardStream, expand_shards, read_manifest, read_shards, write_shards


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _text_pairs(n: int = 23) -> PairSet:
    ids = np.arange(n) * 7 + 3  # sparse, non-contiguous indices
    xs = [f"query {i} — ünïcode ✓" for i in ids]
    ys = [f"document for {i}\nsecond line" for i in ids]
    return PairSet(ids[::-1].copy(), xs[::-1], ys[::-1], source="toy")  # written in index order regardless


def _image_pairs(n: int = 10) -> PairSet:
    ids = np.arange(100, 100 + n)
    return PairSet(ids, [_png((10 * k, 255 - 10 * k, 3 * k)) for k in range(n)], [f"colour {k}" for k in range(n)],
                   "image", "text", [{"k": int(k)} for k in range(n)], source="img")


def _as_dict(p: PairSet) -> dict[int, tuple]:
    return {int(i): (x, y) for i, x, y in zip(p.ids, p.x, p.y)}


def test_text_shards_round_trip_keep_indices_and_pairs(tmp_path):
    pairs = _text_pairs()
    manifest = write_shards(pairs, tmp_path, max_count=5, extra_files={"LICENSE.txt": "notice"})
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["shards"][0]["first_index"] == 3 and manifest["shards"][-1]["last_index"] == 22 * 7 + 3
    assert read_manifest(tmp_path)["num_samples"] == 23 and (tmp_path / "LICENSE.txt").read_text() == "notice"
    back = read_shards(tmp_path)
    assert back.x_modality == back.y_modality == "text"
    assert _as_dict(back) == _as_dict(pairs)
    assert list(back.ids) == sorted(back.ids)  # shards are written in index order
    # a single shard and a brace pattern select subsets with their indices
    one = read_shards(tmp_path / "pairs-000001.tar")
    assert list(one.ids) == [3 + 7 * k for k in range(5, 10)]
    assert len(read_shards(str(tmp_path / "pairs-{000000..000001}.tar"))) == 10


def test_image_shards_keep_bytes_and_metadata(tmp_path):
    pairs = _image_pairs()
    write_shards(pairs, tmp_path, max_count=4)
    back = read_shards(tmp_path)
    assert (back.x_modality, back.y_modality) == ("image", "text")
    assert _as_dict(back) == _as_dict(pairs)  # PNG bytes identical
    assert back.meta == pairs.meta
    with tarfile.open(tmp_path / "pairs-000000.tar") as tar:
        names = tar.getnames()
    assert "000000000100.x.png" in names and "000000000100.index.cls" in names


def test_stream_one_pass_covers_every_sample_once_split_over_ranks(tmp_path, monkeypatch):
    pairs = _text_pairs()
    write_shards(pairs, tmp_path, max_count=5)
    ref = _as_dict(pairs)
    got = list(ShardStream(tmp_path, resampled=False, shuffle_buffer=4))
    assert sorted(i for i, _, _ in got) == sorted(ref)
    assert all(ref[i] == (x, y) for i, x, y in got)
    seen = []
    for r in range(2):  # two ranks read disjoint shards; together every sample once
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({i for i, _, _ in ShardStream(tmp_path, resampled=False, shuffle_buffer=0)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(ref)


def test_resampled_stream_is_seeded_and_keeps_pairs(tmp_path):
    pairs = _text_pairs()
    write_shards(pairs, tmp_path, max_count=5)
    ref = _as_dict(pairs)

    def first(seed: int, n: int = 60) -> list[tuple[int, str, str]]:
        return list(itertools.islice(iter(ShardStream(tmp_path, resampled=True, seed=seed, shuffle_buffer=8)), n))

    a, b, c = first(0), first(0), first(1)
    assert a == b and [i for i, _, _ in a] != [i for i, _, _ in c]
    assert len(a) == 60  # resampling never runs dry
    assert all(ref[i] == (x, y) for i, x, y in a + c)


def test_stream_decoders_apply_per_side(tmp_path):
    write_shards(_image_pairs(4), tmp_path)
    items = list(ShardStream(tmp_path, resampled=False, shuffle_buffer=0, decode_x=len, decode_y=str.upper))
    assert sorted(i for i, _, _ in items) == [100, 101, 102, 103]
    assert all(isinstance(x, int) and x > 50 and y.startswith("COLOUR") for _, x, y in items)


def test_duplicate_index_is_an_error_naming_it(tmp_path):
    a = PairSet([1, 2, 3], ["a", "b", "c"], ["A", "B", "C"])
    b = PairSet([3, 4], ["d", "e"], ["D", "E"])
    write_shards(a, tmp_path, prefix="a")
    write_shards(b, tmp_path, prefix="b")
    with pytest.raises(ValueError, match="duplicate sample index 3"):
        read_shards(str(tmp_path / "{a,b}-000000.tar"))
    with pytest.raises(ValueError, match="duplicate sample index 5"):
        PairSet([5, 6, 5], ["x"] * 3, ["y"] * 3)


def test_bad_shards_and_specs_raise_clear_errors(tmp_path):
    write_shards(_text_pairs(3), tmp_path / "s")
    with pytest.raises(FileExistsError, match="already holds 1 shards"):
        write_shards(_text_pairs(3), tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="shard not found: .*missing-000000.tar"):
        expand_shards(str(tmp_path / "missing-{000000..000001}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(tmp_path / "empty")
    bad = tmp_path / "bad.tar"  # a webdataset sample without its index
    with tarfile.open(bad, "w") as tar:
        data = b"hello"
        info = tarfile.TarInfo("000000000001.x.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="no index.cls member"):
        read_shards(bad)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a dual_emc2-pairs manifest"):
        read_manifest(tmp_path / "m")


def test_make_shards_cli_folder_and_pairs_file(tmp_path, capsys):
    from scripts.make_shards import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(5):
        (imgs / f"im{k}.png").write_bytes(_png((40 * k, 0, 0)))
    (tmp_path / "caps.tsv").write_text("file\tcaption\tid\n" + "".join(f"im{k}.png\tred {k}\t{10 + k}\n"
                                                                     for k in range(5)))
    assert main(["--out", str(tmp_path / "o1"), "--shard-size", "2", "folder", "--images", str(imgs),
                 "--captions", str(tmp_path / "caps.tsv"), "--id-key", "id"]) == 0
    back = read_shards(tmp_path / "o1")
    assert list(back.ids) == [10, 11, 12, 13, 14] and back.y[2] == "red 2"
    assert back.x[3] == (imgs / "im3.png").read_bytes()

    rows = [{"q": f"q{k}", "d": f"d{k}"} for k in range(6)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["--out", str(tmp_path / "o2"), "--split", "eval", "--eval-size", "2", "pairs",
                 str(tmp_path / "p.jsonl"), "--x-key", "q", "--y-key", "d"]) == 0
    held = read_shards(tmp_path / "o2")
    assert len(held) == 2 and all(x == f"q{i}" and y == f"d{i}" for i, x, y in zip(held.ids, held.x, held.y))
    assert main(["--out", str(tmp_path / "o3"), "pairs", str(tmp_path / "p.jsonl"), "--x-key", "nope"]) == 2
    assert "has no field 'nope'" in capsys.readouterr().err
