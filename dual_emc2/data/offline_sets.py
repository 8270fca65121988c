"""Pair sets that exist offline on every machine of this project (see DATA.md).

* WordNet 3.0 (Debian ``wordnet-base``, ``/usr/share/wordnet/data.{noun,verb,adj,adv}``): text–text pairs
  lemma list ↔ definition (one per synset, e.g. "dog, domestic dog, Canis familiaris" ↔ "a member of the genus
  Canis ...") or example sentence ↔ definition.  WordNet is distributed under the WordNet 3.0 licence, whose notice
  (:func:`wordnet_license`) must accompany copies of the data: ``scripts/make_shards.py`` writes it beside shards.
* Emoji (npm ``emoji-datasource-google@16.0.0`` images, Apache-2.0, + npm ``openmoji@17.0.0`` ``data/openmoji.csv``
  CLDR annotations and tags, MIT), fetched by ``scripts/fetch_emoji.sh``: 1,911 64×64 emoji images with captions
  like "rose: beauty, elegant, flower, love, plant, red, valentine".

Indices are stable: WordNet pairs are numbered over all four part-of-speech files in the fixed order noun, verb, adj,
adv (so a noun keeps its index whatever parts of speech are selected); emoji are numbered in ``sort_order``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dual_emc2.data.data_errors import DataNotFound
from dual_emc2.data.pairs import PairSet

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS: tuple[str, ...] = ("noun", "verb", "adj", "adv")
WORDNET_KINDS: tuple[str, ...] = ("lemmas", "examples")
EMOJI_DIR = Path("data_cache/emoji")

__all__ = [
    "EMOJI_DIR", "WORDNET_DIR", "WORDNET_KINDS", "WORDNET_POS", "EmojiRecord", "Synset", "emoji_pairs",
    "read_emoji", "read_wordnet", "wordnet_license", "wordnet_pairs",
]

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_EXAMPLE = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: ``offset`` in its data file, part of speech, lemmas (underscores as spaces, adjective
    position markers removed), the definition (gloss without its examples) and the quoted example sentences.

    Example::

        dog = next(s for s in read_wordnet(pos="noun") if "dog" in s.lemmas)
        dog.lemmas, dog.definition              # ("dog", "domestic dog", "Canis familiaris"), "a member of ..."
    """

    offset: int
    pos: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


def _missing_wordnet(path: Path) -> DataNotFound:
    return DataNotFound(f"WordNet data file not found: {path}; install the Debian package "
                             "(apt-get install -y wordnet-base) or set pairs.path to a WordNet 3.0 dict folder")


def _parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    gloss = gloss.strip()
    examples = tuple(e.strip() for e in _EXAMPLE.findall(gloss) if e.strip())
    cut = gloss.find('"')
    definition = (gloss[:cut] if cut >= 0 else gloss).strip().rstrip(";").strip()
    return definition, examples


def read_wordnet(dict_dir: str | os.PathLike[str] = WORDNET_DIR, pos: str = "noun") -> list[Synset]:
    """All synsets of ``data.{pos}`` in file order (WordNet's ``wndb(5)`` format: offset, lexicographer file, type,
    hexadecimal word count, word/lex-id pairs, pointers, optional verb frames, ``|`` gloss)."""
    if pos not in WORDNET_POS:
        raise ValueError(f"pairs.wordnet_pos: expected items of {WORDNET_POS}, got {pos!r}")
    path = Path(dict_dir) / f"data.{pos}"
    if not path.is_file():
        raise _missing_wordnet(path)
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():  # licence header lines start with two spaces
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            try:
                if not sep:
                    raise ValueError("no ' | ' before the gloss")
                n_words = int(fields[3], 16)
                words = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words))
                offset = int(fields[0])
            except (IndexError, ValueError) as err:
                raise ValueError(f"{path}:{line_no}: not a WordNet data line ({err})") from None
            definition, examples = _parse_gloss(gloss)
            out.append(Synset(offset, pos, words, definition, examples))
    return out


def wordnet_license(dict_dir: str | os.PathLike[str] = WORDNET_DIR) -> str:
    """The WordNet licence notice from the header of ``data.noun`` (to keep with any copy of the data)."""
    path = Path(dict_dir) / "data.noun"
    if not path.is_file():
        raise _missing_wordnet(path)
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("  "):
                break
            lines.append(re.sub(r"^\s+\d+\s?", "", line.rstrip()))
    return "\n".join(lines).strip() + "\n"


def wordnet_pairs(dict_dir: str | os.PathLike[str] = WORDNET_DIR, pos: tuple[str, ...] | list[str] = ("noun",),
                  kind: str = "lemmas") -> PairSet:
    """WordNet text pairs with stable indices (module docstring).

    kind ``"lemmas"``: x = the synset's lemmas joined by ", ", y = its definition, one pair per synset.
    kind ``"examples"``: x = one example sentence, y = the definition, one pair per example.
    The frozen all-MiniLM-L6-v2 on 2,000 random noun synsets (lemmas → definition) gives R@1 ≈ 0.44, R@10 ≈ 0.66.
    """
    if kind not in WORDNET_KINDS:
        raise ValueError(f"pairs.wordnet_x: expected one of {WORDNET_KINDS}, got {kind!r}")
    wanted = list(dict.fromkeys(pos))
    if not wanted:
        raise ValueError("pairs.wordnet_pos: give at least one part of speech")
    for p in wanted:
        if p not in WORDNET_POS:
            raise ValueError(f"pairs.wordnet_pos: expected items of {WORDNET_POS}, got {p!r}")
    ids, xs, ys, meta = [], [], [], []
    base = 0
    for p in WORDNET_POS:
        if p not in wanted and WORDNET_POS.index(p) > max(WORDNET_POS.index(w) for w in wanted):
            break
        synsets = read_wordnet(dict_dir, p)
        k = base
        for s in synsets:
            items = [", ".join(s.lemmas)] if kind == "lemmas" else list(s.examples)
            for x in items:
                if p in wanted:
                    ids.append(k)
                    xs.append(x)
                    ys.append(s.definition)
                    meta.append({"pos": p, "offset": s.offset})
                k += 1
        base = k
    return PairSet(ids, xs, ys, "text", "text", meta, source=f"wordnet[{','.join(wanted)}:{kind}]")


# ----------------------------------------------------------------------------------------------------------- emoji


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji: code points (``unified``), image path (a 64×64 PNG), caption "annotation: tags", category and
    ``sort_order`` (its position in the emoji data's order).

    Example::

        rose = next(r for r in read_emoji() if r.caption.startswith("rose:"))
        rose.unified, rose.category             # ("1F339", "Animals & Nature")
    """

    unified: str
    image: Path
    caption: str
    category: str
    sort_order: int


def _emoji_paths(root: Path) -> tuple[Path, Path, Path]:
    google = root / "emoji-datasource-google" / "package"
    meta, images, annotations = google / "emoji.json", google / "img" / "google" / "64", \
        root / "openmoji" / "package" / "data" / "openmoji.csv"
    for p in (meta, images, annotations):
        if not p.exists():
            raise DataNotFound(f"emoji data not found: {p}; run `bash scripts/fetch_emoji.sh {root}` "
                                    "(npm pack emoji-datasource-google@16.0.0 openmoji@17.0.0) or set pairs.path")
    return meta, images, annotations


def read_emoji(root: str | os.PathLike[str] = EMOJI_DIR) -> list[EmojiRecord]:
    """Emoji with a Google 64×64 image and an OpenMoji annotation, joined on the ``unified`` code points (tried
    with and without ``FE0F`` variation selectors), in ``sort_order``.  Caption: "annotation: tag, tag, ..."."""
    meta_path, images, ann_path = _emoji_paths(Path(root))
    with open(meta_path, encoding="utf-8") as f:
        entries = json.load(f)
    with open(ann_path, newline="", encoding="utf-8") as f:
        by_code = {row["hexcode"].upper(): row for row in csv.DictReader(f)}
    out = []
    for e in entries:
        if not e.get("has_img_google"):
            continue
        code = e["unified"].upper()
        row = by_code.get(code) or by_code.get(code.replace("-FE0F", ""))
        img = images / e["image"]
        if row is None or not img.is_file():
            continue
        tags = ", ".join(t.strip() for t in row.get("tags", "").split(",") if t.strip())
        caption = f"{row['annotation']}: {tags}" if tags else row["annotation"]
        out.append(EmojiRecord(code, img, caption, e.get("category", ""), int(e.get("sort_order", 0))))
    if not out:
        raise ValueError(f"{meta_path}: no emoji could be joined with {ann_path}")
    out.sort(key=lambda r: (r.sort_order, r.unified))
    return out


def emoji_pairs(root: str | os.PathLike[str] = EMOJI_DIR) -> PairSet:
    """Emoji image–caption pairs (x = PNG bytes, y = caption), index = position in ``sort_order``."""
    records = read_emoji(root)
    return PairSet(list(range(len(records))), [r.image.read_bytes() for r in records], [r.caption for r in records],
                   "image", "text", [{"unified": r.unified, "category": r.category} for r in records],
                   source=f"emoji[{root}]")
