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
from dual_emc2.data.shards import (
    ShardStream,
    expand_shards,
    read_manifest,
    read_shards,
    shard_sample_counts,
    write_shards,
)


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


# ------------------------------------------------------------------------------------- streaming position, readers
def _loader_batches(stream: ShardStream, rank: int, world: int, workers: int, b: int, n: int) -> list[list[int]]:
    """The first ``n`` batches a DataLoader(batch_size=b, num_workers=workers) on ``rank`` yields, simulated in this
    process: worker k serves batches k, k + workers, ... from its own reader."""
    readers = [stream.samples(rank, world, k, workers) for k in range(workers)]
    return [[i for i, _, _ in itertools.islice(readers[j % workers], b)] for j in range(n)]


def _id_pairs(n: int) -> PairSet:
    return PairSet(np.arange(n), [f"x{i}" for i in range(n)], [f"y{i}" for i in range(n)], source="ids")


def test_stream_resumed_at_a_position_reads_what_the_uninterrupted_stream_reads(tmp_path):
    """2 ranks × 2 workers, b = 3: a fresh stream put at batch n yields batches n, n + 1, ... of the uninterrupted
    stream on every rank, for positions inside a shard, at shard ends and several passes in."""
    write_shards(_id_pairs(40), tmp_path, max_count=5)
    b, world, workers, total = 3, 2, 2, 40
    full = {r: _loader_batches(ShardStream(tmp_path, seed=7, shuffle_buffer=4), r, world, workers, b, total)
            for r in range(world)}
    for n in (1, 2, 5, 7, 13, 29):
        for r in range(world):
            stream = ShardStream(tmp_path, seed=7, shuffle_buffer=4)
            stream.set_position(n, b)
            assert _loader_batches(stream, r, world, workers, b, total - n) == full[r][n:], (n, r)
    # the first pass: each of the 4 readers holds 10 samples, 3 batches of 3 per worker, 6 per rank: no repeats
    first = [i for r in range(world) for batch in full[r][:6] for i in batch]
    assert len(first) == len(set(first)) == 2 * 6 * 3


def test_stream_readers_read_disjoint_samples_each_pass(tmp_path):
    """Every (rank, worker) reader of a pass reads its own shards; together each sample once, also with uneven
    shards and with fewer shards than readers (shards are then split into interleaved parts)."""
    for n, per_shard in ((23, 5), (40, 5), (12, 6)):  # 5 uneven shards; 8 even; 2 shards for 4 readers
        folder = tmp_path / f"s{n}"
        write_shards(_id_pairs(n), folder, max_count=per_shard)
        stream = ShardStream(folder, resampled=False, seed=3, shuffle_buffer=8)
        seen = [[i for i, _, _ in stream.samples(r, 2, k, 2)] for r in range(2) for k in range(2)]
        flat = [i for ids in seen for i in ids]
        assert sorted(flat) == list(range(n)) and all(seen), (n, [len(s) for s in seen])
        resampled = ShardStream(folder, resampled=True, seed=3, shuffle_buffer=8)
        again = [list(itertools.islice((i for i, _, _ in resampled.samples(r, 2, k, 2)), len(seen[2 * r + k])))
                 for r in range(2) for k in range(2)]
        assert again == seen  # the first pass of the endless stream is the one pass


def test_stream_position_holds_with_dataloader_worker_processes(tmp_path):
    from torch.utils.data import DataLoader

    write_shards(_id_pairs(30), tmp_path, max_count=4)

    def batches(start: int, n: int) -> list[list[int]]:
        stream = ShardStream(tmp_path, seed=1, shuffle_buffer=3, rank=0, world_size=1)
        stream.set_position(start, 2)
        loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=lambda items: [i for i, _, _ in items])
        return list(itertools.islice(iter(loader), n))

    full = batches(0, 20)
    assert batches(7, 13) == full[7:]
    assert _loader_batches(ShardStream(tmp_path, seed=1, shuffle_buffer=3), 0, 1, 2, 2, 20) == full


def test_sample_counts_without_a_manifest_come_from_the_tar_headers(tmp_path):
    write_shards(_text_pairs(), tmp_path, max_count=5)
    with_manifest = shard_sample_counts(expand_shards(tmp_path))
    (tmp_path / "manifest.json").unlink()
    assert shard_sample_counts(expand_shards(tmp_path)) == with_manifest == [5, 5, 5, 5, 3]
