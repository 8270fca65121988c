"""Retrieval evaluation of two towers in both directions with FAISS: Recall@1/5/10, MRR, nDCG@10.

    # a trained checkpoint on its own held-out split (the split is rebuilt from the checkpoint's config)
    python eval/retrieval.py --checkpoint runs/wordnet_emc2/checkpoints/ckpt-00000500.pt --split eval
    # a pretrained / zero-shot tower: no checkpoint, towers and data from a config
    python eval/retrieval.py --config configs/text_wordnet.yaml --split eval
    # other data: an offline set, a shard folder/pattern or a CSV/TSV/JSONL pairs file
    python eval/retrieval.py --config configs/clip_emoji.yaml --data emoji --split all --index hnsw

(``dual-emc2-retrieval ...`` is the same command as ``python eval/retrieval.py ...``.)

Both sides are embedded in batches; documents go into a FAISS inner-product index (exact ``flat`` by default;
``ivf`` / ``hnsw`` for large corpora; a GPU index when faiss-gpu sees a GPU) and each query's top documents are
scored.  A query whose x (or y) also belongs to other pairs — a WordNet lemma list shared by several synsets — has
all those pairs' documents as relevant.  Writes a JSON file and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dual_emc2.cli._io import RESULTS, ROOT, fail

DEFAULT_TEXT_CONFIG = ROOT / "configs" / "text_wordnet.yaml"
DEFAULT_IMAGE_CONFIG = ROOT / "configs" / "clip_emoji.yaml"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a bimodal training checkpoint (ckpt-*.pt); omit for pretrained towers")
    ap.add_argument("--config", help="YAML config for towers and data (default: the checkpoint's own config, else "
                                     "configs/text_wordnet.yaml, or configs/clip_emoji.yaml for --data emoji)")
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
    ap.add_argument("--out", default=None, help="JSON output path (default: experiments/results/retrieval_<name>.json)")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (e.g. towers.max_length=64)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dual_emc2.data.pair_sources import load_pair_sets, read_pair_source
    from dual_emc2.data.pairs import PairSet, split_pairs
    from dual_emc2.metrics.retrieval_report import retrieval_report
    from dual_emc2.towers.two_tower import build_two_tower
    from dual_emc2.train.checkpoint import load_checkpoint
    from dual_emc2.train.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config
    from dual_emc2.train.models import checkpoint_model

    extra = list(args.overrides) + (_data_overrides(args.data) if args.data else [])
    try:
        if args.checkpoint:
            if args.config:
                cfg = load_config(args.config, extra)
            else:
                payload = load_checkpoint(args.checkpoint, map_location="cpu")
                cfg = config_from_dict(apply_overrides(payload["config"], extra))
                del payload
            model, cfg = checkpoint_model(args.checkpoint, cfg)
        else:
            default = DEFAULT_IMAGE_CONFIG if args.data == "emoji" else DEFAULT_TEXT_CONFIG
            cfg = load_config(args.config or default, extra)
            torch.manual_seed(cfg.seed)  # the same (random) projections as step 0 of training with this seed
            model = build_two_tower(cfg.towers, cfg.objective.beta, cfg.objective.learnable_beta)
        if cfg.mode != "bimodal":
            raise ConfigError(f"mode must be bimodal for retrieval, got {cfg.mode}")
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
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        return fail(e)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    t0 = time.perf_counter()
    ks, ndcg_k = [1, 5, 10], 10
    options = {"nlist": args.nlist, "nprobe": args.nprobe} if args.index == "ivf" else (
        {"hnsw_m": args.hnsw_m} if args.index == "hnsw" else {})
    metrics = retrieval_report(model, pairs, batch_size=args.batch_size, device=device,
                               image_size=cfg.data.image_size, index=args.index, ks=ks, ndcg_k=ndcg_k, **options)
    seconds = time.perf_counter() - t0
    groups = pairs.groups("x")
    shared = int(np.sum(np.bincount(groups)[groups] > 1))
    result = {
        "checkpoint": args.checkpoint, "config": args.config, "data": args.data or cfg.pairs.source,
        "split": args.split, "n_pairs": len(pairs), "queries_with_several_relevant": shared,
        "x_modality": pairs.x_modality, "y_modality": pairs.y_modality, "index": args.index,
        "device": str(device), "seconds": round(seconds, 2), "metrics": metrics,
        "run_config": config_to_dict(cfg),
    }
    name = Path(args.checkpoint).parent.parent.name if args.checkpoint else f"zeroshot_{cfg.pairs.source}"
    out = Path(args.out) if args.out else RESULTS / f"retrieval_{name}_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{len(pairs)} pairs ({pairs.x_modality}→{pairs.y_modality}, {args.split} split, {shared} queries with "
          f"several relevant documents), {args.index} index, {seconds:.1f} s")
    print(format_table(metrics, ks, ndcg_k))
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
