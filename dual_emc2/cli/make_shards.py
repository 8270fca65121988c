"""Write webdataset tar shards of (x, y) pairs with a stable global integer index per sample.

    python scripts/make_shards.py --out data_cache/shards/captions folder --images imgs/ --captions captions.tsv
    python scripts/make_shards.py --out data_cache/shards/qd pairs qd.jsonl --x-key query --y-key document
    python scripts/make_shards.py --out data_cache/shards/emoji emoji [--root data_cache/emoji]
    python scripts/make_shards.py --out data_cache/shards/wordnet wordnet [--pos noun verb] [--kind lemmas]

(``dual-emc2-make-shards ...`` is the same command as ``python scripts/make_shards.py ...``.)

Sources: ``folder`` (images in a folder + a CSV/TSV/JSONL captions file with columns file, caption), ``pairs``
(a CSV/TSV/JSONL file of text pairs), and the offline sets ``emoji`` and ``wordnet``.  Indices are the pairs' own
(row order, or ``--id-key``; the offline sets' stable numbering); ``--split eval|train`` with ``--eval-size`` writes
one side of a seeded held-out split.  Read the shards back with ``pairs.source: shards`` (all pairs in memory, exact
epochs) or ``pairs.streaming: true`` (streaming for large corpora: seeded passes over the shards, dealt out to ranks ×
DataLoader workers; write at least that many shards).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dual_emc2.cli._io import USER_ERRORS, fail
from dual_emc2.errors import UsageError

EMOJI_NOTICE = """Emoji images: emoji-datasource-google 16.0.0 (npm), Apache License 2.0.
Captions: CLDR annotations and tags from openmoji 17.0.0 data/openmoji.csv (npm), MIT License.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (must hold no shards with the same prefix)")
    ap.add_argument("--prefix", default="pairs", help="shard file prefix: PREFIX-000000.tar ...")
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    ap.add_argument("--split", choices=("all", "train", "eval"), default="all",
                    help="write every pair, or one side of the seeded split given by --eval-size/--split-seed")
    ap.add_argument("--eval-size", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    sub = ap.add_subparsers(dest="source", required=True)
    f = sub.add_parser("folder", help="images in a folder + a captions file")
    f.add_argument("--images", required=True, help="image folder")
    f.add_argument("--captions", required=True, help="CSV/TSV/JSONL with an image file column and a caption column")
    f.add_argument("--file-key", default="file")
    f.add_argument("--caption-key", default="caption")
    f.add_argument("--id-key", default=None, help="column holding each pair's integer index (default: row order)")
    p = sub.add_parser("pairs", help="a CSV/TSV/JSONL file of text pairs")
    p.add_argument("file")
    p.add_argument("--x-key", default="x")
    p.add_argument("--y-key", default="y")
    p.add_argument("--id-key", default=None, help="column holding each pair's integer index (default: row order)")
    e = sub.add_parser("emoji", help="the offline emoji image–caption pairs (scripts/fetch_emoji.sh)")
    e.add_argument("--root", default="data_cache/emoji")
    w = sub.add_parser("wordnet", help="WordNet lemma list (or example) ↔ definition pairs")
    w.add_argument("--dict", default="/usr/share/wordnet", help="WordNet 3.0 dict folder")
    w.add_argument("--pos", nargs="+", default=["noun"], choices=("noun", "verb", "adj", "adv"))
    w.add_argument("--kind", default="lemmas", choices=("lemmas", "examples"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dual_emc2.data.offline_sets import emoji_pairs, wordnet_license, wordnet_pairs
    from dual_emc2.data.pairs import read_image_caption_folder, read_pairs_file, split_pairs
    from dual_emc2.data.shards import write_shards

    extra: dict[str, str] = {}
    try:
        if args.source == "folder":
            pairs = read_image_caption_folder(args.images, args.captions, args.file_key, args.caption_key,
                                              args.id_key)
        elif args.source == "pairs":
            pairs = read_pairs_file(args.file, args.x_key, args.y_key, args.id_key)
        elif args.source == "emoji":
            pairs = emoji_pairs(args.root)
            extra["NOTICE.txt"] = EMOJI_NOTICE
        else:
            pairs = wordnet_pairs(args.dict, tuple(args.pos), args.kind)
            extra["WORDNET_LICENSE.txt"] = wordnet_license(args.dict)
        if args.split != "all":
            train, held = split_pairs(pairs, args.eval_size, None, args.split_seed)
            if args.split == "eval" and held is None:
                raise UsageError("--split eval needs --eval-size > 0")
            pairs = train if args.split == "train" else held
        manifest = write_shards(pairs, args.out, prefix=args.prefix, max_count=args.shard_size, extra_files=extra)
    except (*USER_ERRORS, ValueError, TypeError) as err:
        return fail(err)
    print(f"wrote {manifest['num_samples']} {manifest['x_modality']}–{manifest['y_modality']} pairs in "
          f"{len(manifest['shards'])} shards to {Path(args.out)} (manifest.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
