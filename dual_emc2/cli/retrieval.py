"""Retrieval evaluation of two towers in both directions with FAISS: Recall@1/5/10, MRR, nDCG@10.

    # a trained run on its own held-out split (the split is rebuilt from the checkpoint's config); the checkpoint
    # may be a file, a run folder (its newest intact checkpoint) or checkpoints/latest
    python eval/retrieval.py --checkpoint runs/wordnet_emc2 --split eval
    # a pretrained / zero-shot tower: no checkpoint, towers and data from a config; a picture of 6 queries
    python eval/retrieval.py --config configs/text_wordnet.yaml --split eval --png wordnet.png
    # the same with the configs packaged in dual_emc2 (also from an installed wheel): a config by name
    dual-emc2-retrieval --config text_wordnet --split eval
    # other data: an offline set, a shard folder/pattern or a CSV/TSV/JSONL pairs file
    python eval/retrieval.py --config configs/clip_emoji.yaml --data emoji --split all --index hnsw

(``dual-emc2-retrieval ...`` is the same command as ``python eval/retrieval.py ...``.)

Both sides are embedded in batches; documents go into a FAISS inner-product index (exact ``flat`` by default;
``ivf`` / ``hnsw`` for large corpora; a GPU index when faiss-gpu sees a GPU) and each query's top documents are
scored.  A query whose x (or y) also belongs to other pairs — a WordNet lemma list shared by several synsets — has
all those pairs' documents as relevant.  Prints a short table; writes JSON to ``--out``, by default (with a
checkpoint) into the run's folder as ``retrieval_<split>[_<data>]_<checkpoint>.json``, and without a checkpoint
nowhere.  ``--png PATH`` draws ``--png-queries`` queries with their top-5 results (hits framed green, ✓).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from dual_emc2.cli._io import USER_ERRORS, fail, run_folder_of
from dual_emc2.errors import UsageError

# packaged configs (dual_emc2/configs), found by name wherever the package is installed
DEFAULT_TEXT_CONFIG = "text_wordnet"
DEFAULT_IMAGE_CONFIG = "clip_emoji"


def _data_overrides(data: str) -> list[str]:
    """Config overrides selecting ``--data``: an offline set name, a shard folder/pattern or a pairs file."""
    if data in ("wordnet", "emoji"):
        return [f"pairs.source={data}"] + (["pairs.path=null"] if data == "wordnet" else [])
    p = Path(data)
    if p.suffix.lower() in (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json") and p.is_file():
        return ["pairs.source=file", f"pairs.path={data}", "pairs.eval_path=null"]
    return ["pairs.source=shards", f"pairs.path={data}", "pairs.eval_path=null", "pairs.streaming=false"]


def format_table(metrics: dict[str, float], ks: list[int], ndcg_k: int) -> str:
    """A short text table: one row per direction."""
    cols = [f"recall@{k}" for k in ks] + ["mrr", f"ndcg@{ndcg_k}"]
    heads = [f"R@{k}" for k in ks] + [f"MRR@{max(max(ks), ndcg_k)}", f"nDCG@{ndcg_k}"]
    lines = ["direction  " + "  ".join(f"{h:>8}" for h in heads)]
    for d, label in (("x2y", "x→y"), ("y2x", "y→x")):
        lines.append(f"{label:<9}  " + "  ".join(f"{metrics.get(f'{d}_{c}', float('nan')):8.4f}" for c in cols))
    return "\n".join(lines)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(text).stem or text).strip("-") or "data"


def _shown(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a bimodal checkpoint: file, run folder or checkpoints/latest; omit for "
                                         "pretrained towers")
    ap.add_argument("--config", help="YAML config for towers and data: a file, or a packaged config by name "
                                     "(default: the checkpoint's own config, else the packaged text_wordnet, or "
                                     "clip_emoji for --data emoji)")
    ap.add_argument("--data", help="wordnet | emoji | a shard folder/pattern | a .csv/.tsv/.jsonl pairs file "
                                   "(default: the config's pairs section)")
    ap.add_argument("--split", choices=("eval", "train", "all"), default="eval",
                    help="held-out pairs of the config's split, its training pairs, or every pair")
    ap.add_argument("--max-pairs", type=int, default=None, help="evaluate a seeded random subset of this size")
    ap.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    ap.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    ap.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--out", default=None, help="JSON output path (default: the checkpoint's run folder, "
                                                "retrieval_<split>..._<checkpoint>.json; without a checkpoint: none)")
    ap.add_argument("--png", default=None, metavar="PATH", help="also draw queries with their top-5 results")
    ap.add_argument("--png-queries", type=int, default=6, metavar="N", help="queries in the --png picture")
    ap.add_argument("--png-direction", choices=("x2y", "y2x"), default="x2y",
                    help="x queries against y documents (default) or the reverse")
    ap.add_argument("--png-seed", type=int, default=0, help="seed of the queries drawn for --png")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (e.g. towers.max_length=64)")
    return ap


def _two_tower_config(payload: dict[str, Any], path: Path) -> None:
    mode = payload.get("config", {}).get("mode", "unimodal")
    if mode != "bimodal":
        raise UsageError(f"{path} is a one-tower (mode: {mode}) image checkpoint; retrieval needs a two-tower "
                         f"(mode: bimodal) run. Evaluate it with: dual-emc2-linear-probe --checkpoint {path}")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Path | None]:
    """(model, config, pairs, checkpoint path) of the command line."""
    import torch

    from dual_emc2.data.pairs import PairSet, split_pairs
    from dual_emc2.train.checkpoint import load_checkpoint, resolve_checkpoint
    from dual_emc2.train.config import ConfigError, apply_overrides, config_from_dict, load_config
    from dual_emc2.train.models import build_two_tower_model, checkpoint_model
    from dual_emc2.train.pair_sources import load_pair_sets, read_pair_source

    extra = list(args.overrides) + (_data_overrides(args.data) if args.data else [])
    ckpt = None
    if args.checkpoint:
        ckpt = resolve_checkpoint(args.checkpoint)
        payload = load_checkpoint(ckpt, map_location="cpu")
        _two_tower_config(payload, ckpt)
        cfg = load_config(args.config, extra) if args.config else \
            config_from_dict(apply_overrides(payload["config"], extra))
        del payload
        model, cfg = checkpoint_model(ckpt, cfg)
    else:
        source = args.config or (DEFAULT_IMAGE_CONFIG if args.data == "emoji" else DEFAULT_TEXT_CONFIG)
        cfg = load_config(source, extra)
        if cfg.mode != "bimodal":
            raise ConfigError(f"{source}: mode must be bimodal for retrieval (two towers), got {cfg.mode}")
        torch.manual_seed(cfg.seed)  # the same (random) projections as step 0 of training with this seed
        model = build_two_tower_model(cfg)
    if args.split == "all":
        pairs: PairSet = read_pair_source(cfg.pairs, cfg.pairs.path)
    else:
        train, held = load_pair_sets(cfg.pairs)
        pairs = train if args.split == "train" else held
        if pairs is None:
            raise ConfigError("--split eval: the config has no held-out pairs (pairs.eval_size=0 and no "
                              "pairs.eval_path); use --split all or set pairs.eval_size")
    if args.max_pairs is not None and args.max_pairs < len(pairs):
        pairs, _ = split_pairs(pairs, 0, args.max_pairs, cfg.pairs.split_seed)
    return model, cfg, pairs, ckpt


def default_out(args: argparse.Namespace, ckpt: Path | None) -> Path | None:
    """Where the JSON goes: ``--out``; else the checkpoint's run folder; else nowhere (printed only)."""
    if args.out:
        return Path(args.out)
    if ckpt is None:
        return None
    data = f"_{_slug(args.data)}" if args.data else ""
    return run_folder_of(ckpt) / f"retrieval_{args.split}{data}_{ckpt.stem}.json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.png_queries < 1:
        return fail("--png-queries must be >= 1")
    try:
        model, cfg, pairs, ckpt = _setup(args)
    except (*USER_ERRORS, ValueError, ImportError) as e:
        return fail(e)
    try:
        return _evaluate(args, model, cfg, pairs, ckpt)
    except USER_ERRORS as e:
        return fail(e)


def _evaluate(args: argparse.Namespace, model: Any, cfg: Any, pairs: Any, ckpt: Path | None) -> int:
    import numpy as np
    import torch

    from dual_emc2.data.pairs import relevant_sets
    from dual_emc2.towers.two_tower import check_modalities
    from dual_emc2.train.config import config_to_dict
    from dual_emc2.train.retrieval_report import retrieval_both_directions

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    check_modalities(model, pairs)
    t0 = time.perf_counter()
    ks, ndcg_k = [1, 5, 10], 10
    options = {"nlist": args.nlist, "nprobe": args.nprobe} if args.index == "ivf" else (
        {"hnsw_m": args.hnsw_m} if args.index == "hnsw" else {})
    embed = {"batch_size": args.batch_size, "device": device, "image_size": cfg.data.image_size}
    zx, zy = model.embed("x", pairs.x, **embed), model.embed("y", pairs.y, **embed)
    metrics = retrieval_both_directions(zx, zy, relevant_sets(pairs), ks=ks, ndcg_k=ndcg_k, index=args.index,
                                        **options)
    seconds = time.perf_counter() - t0
    groups = pairs.groups("x")
    shared = int(np.sum(np.bincount(groups)[groups] > 1))
    print(f"{len(pairs)} pairs ({pairs.x_modality}→{pairs.y_modality}, {args.split} split, {shared} queries with "
          f"several relevant documents), {args.index} index, {seconds:.1f} s")
    print(format_table(metrics, ks, ndcg_k))
    out = default_out(args, ckpt)
    if out is not None:
        result = {
            "checkpoint": str(ckpt) if ckpt else None, "config": args.config, "data": args.data or cfg.pairs.source,
            "split": args.split, "n_pairs": len(pairs), "queries_with_several_relevant": shared,
            "x_modality": pairs.x_modality, "y_modality": pairs.y_modality, "index": args.index,
            "device": str(device), "seconds": round(seconds, 2), "metrics": metrics,
            "run_config": config_to_dict(cfg),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {_shown(out)}")
    if args.png:
        from dual_emc2.train.retrieval_figure import plot_retrieval_examples

        what = f"{run_folder_of(ckpt).name if ckpt else 'zero-shot'} on {pairs.source}"
        png = plot_retrieval_examples(pairs, zx, zy, args.png, direction=args.png_direction,
                                      n_queries=args.png_queries, seed=args.png_seed, title=what)
        print(f"wrote {_shown(png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
