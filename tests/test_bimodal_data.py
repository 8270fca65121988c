"""Pair readers (WordNet, emoji, CSV/TSV/JSONL, image folder), splits and duplicate-aware relevance."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dual_emc2.data.offline_sets import emoji_pairs, read_emoji, read_wordnet, wordnet_license, wordnet_pairs
from dual_emc2.data.pairs import (
    PairSet,
    decode_rgb,
    read_image_caption_folder,
    read_pairs_file,
    relevant_sets,
    split_pairs,
)
from dual_emc2.loss.batches import same_group_mask

LICENSE = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
           "  2 Princeton University under the following license.  ",
           "  3   "]
NOUNS = [
    "00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 | that which is perceived to have its own existence  ",
    "00002684 03 n 02 object 0 physical_object 0 001 @ 00001930 n 0000 | a tangible and visible entity; "
    '"it was full of rackets, balls and other objects"  ',
    "00003553 03 n 02 bank 0 depository_financial_institution 0 000 | a financial institution; "
    '"he cashed a check at the bank"; "that bank holds the mortgage"  ',
]
VERBS = [
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 $ 00004227 v 0000 01 + 02 00 | "
    'draw air into, and expel out of, the lungs; "I can breathe better now"  ',
]
ADJS = ["00001740 00 a 01 able(a) 0 001 ! 00002098 a 0101 | having the necessary means  "]


def _wordnet_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wn"
    d.mkdir()
    for pos, lines in (("noun", NOUNS), ("verb", VERBS), ("adj", ADJS), ("adv", [])):
        (d / f"data.{pos}").write_text("\n".join(LICENSE + lines) + "\n", encoding="utf-8")
    return d


def test_wordnet_parser_reads_lemmas_definitions_and_examples(tmp_path):
    d = _wordnet_dir(tmp_path)
    nouns = read_wordnet(d, "noun")
    assert [s.lemmas for s in nouns] == [("entity",), ("object", "physical object"),
                                         ("bank", "depository financial institution")]
    assert nouns[1].definition == "a tangible and visible entity"
    assert nouns[2].examples == ("he cashed a check at the bank", "that bank holds the mortgage")
    assert read_wordnet(d, "verb")[0].lemmas == ("breathe", "take a breath", "respire", "suspire")
    assert read_wordnet(d, "adj")[0].lemmas == ("able",)  # the (a) position marker is dropped
    assert wordnet_license(d).startswith("This software and database is being provided")


def test_wordnet_indices_are_stable_across_part_of_speech_selections(tmp_path):
    d = _wordnet_dir(tmp_path)
    both = wordnet_pairs(d, ("noun", "verb"))
    verbs = wordnet_pairs(d, ("verb",))
    assert list(both.ids) == [0, 1, 2, 3] and list(verbs.ids) == [3]
    assert verbs.x == ["breathe, take a breath, respire, suspire"] and verbs.y == [both.y[3]]
    assert both.x[1] == "object, physical object" and both.y[1] == "a tangible and visible entity"
    ex = wordnet_pairs(d, ("noun", "verb"), kind="examples")
    assert ex.x == ["it was full of rackets, balls and other objects", "he cashed a check at the bank",
                    "that bank holds the mortgage", "I can breathe better now"]
    assert list(ex.ids) == [0, 1, 2, 3] and ex.y[1] == ex.y[2] == "a financial institution"
    assert list(wordnet_pairs(d, ("verb",), kind="examples").ids) == [3]
    with pytest.raises(ValueError, match="pairs.wordnet_pos"):
        wordnet_pairs(d, ("nouns",))
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        wordnet_pairs(tmp_path / "nowhere")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="Debian wordnet-base not installed")
def test_real_wordnet_counts():
    nouns = wordnet_pairs()
    assert len(nouns) == 82_115
    k = nouns.x.index("dog, domestic dog, Canis familiaris")
    assert nouns.y[k].startswith("a member of the genus Canis")
    # lemma lists shared by several synsets exist: those pairs are mutually relevant
    assert int(np.sum(np.bincount(nouns.groups("x")) > 1)) > 1000


def _fake_emoji(root: Path) -> None:
    google = root / "emoji-datasource-google" / "package"
    (google / "img" / "google" / "64").mkdir(parents=True)
    entries = [
        {"unified": "1F339", "image": "1f339.png", "category": "Animals & Nature", "sort_order": 5,
         "has_img_google": True},
        {"unified": "2764-FE0F", "image": "2764-fe0f.png", "category": "Smileys & Emotion", "sort_order": 1,
         "has_img_google": True},  # openmoji lists it without FE0F
        {"unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion", "sort_order": 2,
         "has_img_google": True},  # no annotation: skipped
        {"unified": "1F4A9", "image": "1f4a9.png", "category": "Smileys & Emotion", "sort_order": 3,
         "has_img_google": False},
    ]
    (google / "emoji.json").write_text(json.dumps(entries))
    for k, e in enumerate(entries):
        Image.new("RGBA", (64, 64), (k * 50, 0, 0, 255)).save(google / "img" / "google" / "64" / e["image"])
    data = root / "openmoji" / "package" / "data"
    data.mkdir(parents=True)
    with open(data / "openmoji.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emoji", "hexcode", "group", "annotation", "tags"])
        w.writerow(["🌹", "1F339", "animals-nature", "rose", "flower, love, red"])
        w.writerow(["❤", "2764", "smileys-emotion", "red heart", ""])
        w.writerow(["💩", "1F4A9", "smileys-emotion", "pile of poo", "poo"])


def test_emoji_reader_joins_annotations_and_orders_by_sort_order(tmp_path):
    _fake_emoji(tmp_path)
    recs = read_emoji(tmp_path)
    assert [(r.unified, r.caption) for r in recs] == [("2764-FE0F", "red heart"), ("1F339", "rose: flower, love, red")]
    pairs = emoji_pairs(tmp_path)
    assert list(pairs.ids) == [0, 1] and pairs.x_modality == "image" and pairs.meta[1]["category"] == "Animals & Nature"
    assert pairs.x[1] == (tmp_path / "emoji-datasource-google/package/img/google/64/1f339.png").read_bytes()
    with pytest.raises(FileNotFoundError, match="fetch_emoji.sh"):
        read_emoji(tmp_path / "missing")


def test_pairs_files_csv_tsv_jsonl_and_errors(tmp_path):
    (tmp_path / "p.csv").write_text('q,d,i\n"a, b",doc one,5\nc,doc two,9\n')
    (tmp_path / "p.tsv").write_text("q\td\na, b\tdoc one\n")
    (tmp_path / "p.jsonl").write_text('{"q": "a, b", "d": "doc one"}\n\n{"q": "c", "d": "doc two"}\n')
    csv_p = read_pairs_file(tmp_path / "p.csv", "q", "d", "i")
    assert list(csv_p.ids) == [5, 9] and csv_p.x == ["a, b", "c"]
    assert read_pairs_file(tmp_path / "p.jsonl", "q", "d").y == ["doc one", "doc two"]
    tsv = read_pairs_file(tmp_path / "p.tsv", "q", "d")
    assert (tsv.x, tsv.y, list(tsv.ids)) == (["a, b"], ["doc one"], [0])
    with pytest.raises(ValueError, match=r"p\.csv: row 1 has no field 'query'"):
        read_pairs_file(tmp_path / "p.csv", "query", "d")
    (tmp_path / "bad.csv").write_text("q,d,i\nx,y,seven\n")
    with pytest.raises(ValueError, match="field 'i' must be an integer index, got 'seven'"):
        read_pairs_file(tmp_path / "bad.csv", "q", "d", "i")
    (tmp_path / "dup.csv").write_text("q,d,i\nx,y,1\nz,w,1\n")
    with pytest.raises(ValueError, match="duplicate sample index 1"):
        read_pairs_file(tmp_path / "dup.csv", "q", "d", "i")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported pairs file type '.txt'"):
        read_pairs_file(tmp_path / "p.txt")


def test_image_caption_folder_and_rgba_decoding(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    (tmp_path / "caps.csv").write_text("file,caption\na.png,a red dot\n")
    pairs = read_image_caption_folder(tmp_path, tmp_path / "caps.csv")
    rgb = np.asarray(decode_rgb(pairs.x[0]))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)  # transparent → white
    (tmp_path / "caps2.csv").write_text("file,caption\nb.png,missing\n")
    with pytest.raises(FileNotFoundError, match="image 'b.png' not found"):
        read_image_caption_folder(tmp_path, tmp_path / "caps2.csv")
    (tmp_path / "c.png").write_text("not an image")
    (tmp_path / "caps3.csv").write_text("file,caption\nc.png,bad\n")
    with pytest.raises(ValueError, match="not an encoded image"):
        read_image_caption_folder(tmp_path, tmp_path / "caps3.csv")


def test_split_is_seeded_disjoint_and_keeps_indices():
    pairs = PairSet(np.arange(50) * 2, [f"x{i}" for i in range(50)], [f"y{i}" for i in range(50)])
    train, held = split_pairs(pairs, 10, 25, seed=3)
    assert len(held) == 10 and len(train) == 25 and not set(train.ids) & set(held.ids)
    assert list(held.ids) == sorted(held.ids)
    assert all(x == f"x{i // 2}" for i, x in zip(train.ids, train.x))
    again, held2 = split_pairs(pairs, 10, 25, seed=3)
    assert list(held2.ids) == list(held.ids) and list(again.ids) == list(train.ids)
    assert list(split_pairs(pairs, 10, 25, seed=4)[1].ids) != list(held.ids)
    with pytest.raises(ValueError, match="cannot give 10 held-out and 45 training"):
        split_pairs(pairs, 10, 45)


def test_relevance_and_false_negative_mask_follow_identical_sides():
    # pairs 0 and 2 share their x (a lemma in two synsets); pairs 1 and 3 share their y
    pairs = PairSet([0, 1, 2, 3], ["bank", "river", "bank", "stream"], ["money place", "water", "slope", "water"])
    assert relevant_sets(pairs) == [{0, 2}, {1, 3}, {0, 2}, {1, 3}]
    gx, gy = torch.from_numpy(pairs.groups("x")), torch.from_numpy(pairs.groups("y"))
    mask = same_group_mask(gx, gy, gx, gy)
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    imgs = PairSet([0, 1, 2], [b"\x89PNG\r\n\x1a\nA", b"\x89PNG\r\n\x1a\nB", b"\x89PNG\r\n\x1a\nA"], ["a", "b", "c"],
                   "image", "text")
    assert imgs.groups("x")[0] == imgs.groups("x")[2] != imgs.groups("x")[1]  # identical image bytes
