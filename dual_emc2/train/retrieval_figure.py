"""A picture of retrieval: a few queries and their top-k results, hits marked.

One row per query: the query, then its k best documents (exact inner product of the unit embeddings), best first.
Image sides are drawn as thumbnails, text sides as wrapped text; a result relevant to the query (its own pair, or a
pair with the same x or y: :func:`~dual_emc2.data.pairs.relevant_sets`) has a green frame and a ✓, the others a
grey frame.  Text–text retrieval gives a table of text cells.  matplotlib (Agg) is imported only when drawing.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dual_emc2.data.pairs import PairSet, decode_rgb, relevant_sets

__all__ = ["pick_queries", "plot_retrieval_examples", "top_k"]

HIT, MISS, QUERY = "#1a9641", "#9e9e9e", "#2b83ba"


def top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]) of the ``k`` documents with the largest inner product with each query, best
    first (exact; ties broken by the lower id)."""
    q, d = np.asarray(queries, dtype=np.float32), np.asarray(docs, dtype=np.float32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"queries [Q, d] and docs [N, d] must share d, got {q.shape} and {d.shape}")
    k = min(int(k), d.shape[0])
    scores = q @ d.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def pick_queries(n_pairs: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct query positions out of ``n_pairs``, drawn with ``seed`` and sorted."""
    if n_pairs < 1 or n < 1:
        raise ValueError(f"need at least one pair and one query, got {n_pairs} pairs and {n} queries")
    return np.sort(np.random.default_rng(seed).choice(n_pairs, size=min(n, n_pairs), replace=False))


def _wrap(text: str, width: int, lines: int) -> str:
    out = textwrap.wrap(" ".join(str(text).split()), width=width) or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(width - 1, 1)].rstrip() + "…"
    return "\n".join(out)


def _frame(ax: Any, color: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _cell(ax: Any, value: Any, modality: str, color: str, label: str, *, width: int, lines: int) -> None:
    """One query or result: a thumbnail (image) or wrapped text in a frame of ``color``, ``label`` below."""
    ax.set_xticks([])
    ax.set_yticks([])
    if modality == "image":
        ax.imshow(np.asarray(decode_rgb(bytes(value))), interpolation="nearest")
        ax.set_xlabel(label, fontsize=8, color=color if color != MISS else "black")
    else:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.text(0.04, 0.94, _wrap(value, width, lines), va="top", ha="left", fontsize=7.5, family="DejaVu Sans",
                transform=ax.transAxes)
        ax.text(0.96, 0.04, label, va="bottom", ha="right", fontsize=8, transform=ax.transAxes,
                color=color if color != MISS else "#555555", fontweight="bold" if color == HIT else "normal")
    _frame(ax, color, 3.0 if color != MISS else 1.0)


def plot_retrieval_examples(pairs: PairSet, zx: Any, zy: Any, path: str | os.PathLike[str], *,
                            direction: str = "x2y", n_queries: int = 6, k: int = 5, seed: int = 0,
                            queries: Sequence[int] | None = None, title: str | None = None, dpi: int = 110) -> Path:
    """Draw ``n_queries`` queries of ``direction`` (``x2y``: x queries, y documents; ``y2x`` the reverse) with their
    top-``k`` documents among all pairs of ``pairs`` (embeddings ``zx``, ``zy`` [N, d], unit rows) and save a PNG
    at ``path``; ``queries`` (positions) instead of a seeded draw.  Returns the path."""
    if direction not in ("x2y", "y2x"):
        raise ValueError(f"direction must be 'x2y' or 'y2x', got {direction!r}")
    zx, zy = (np.asarray(z.cpu() if hasattr(z, "cpu") else z, dtype=np.float32) for z in (zx, zy))
    if zx.shape[0] != len(pairs) or zy.shape[0] != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {zx.shape[0]} x and {zy.shape[0]} y embeddings")
    q_side, d_side = ("x", "y") if direction == "x2y" else ("y", "x")
    q_items, d_items = getattr(pairs, q_side), getattr(pairs, d_side)
    q_mod, d_mod = getattr(pairs, f"{q_side}_modality"), getattr(pairs, f"{d_side}_modality")
    chosen = np.asarray(queries if queries is not None else pick_queries(len(pairs), n_queries, seed), dtype=np.int64)
    q_emb, d_emb = (zx, zy) if direction == "x2y" else (zy, zx)
    scores, ranked = top_k(q_emb[chosen], d_emb, k)
    relevant = relevant_sets(pairs)
    k = ranked.shape[1]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_only = q_mod == "text" and d_mod == "text"
    col_w = 2.5 if text_only else 1.9
    wrap_w = 34 if text_only else 24
    lines = 6 if text_only else 7
    if text_only:  # rows as tall as their longest wrapped text
        texts = [q_items[q] for q in chosen.tolist()] + [d_items[int(d)] for d in ranked.reshape(-1)]
        longest = max(_wrap(t, wrap_w, lines).count("\n") + 1 for t in texts)
        row_h = 0.45 + 0.16 * longest
    else:
        row_h = 1.9 if "text" in (q_mod, d_mod) else 1.7
    widths = [1.15] + [1.0] * k
    fig, axes = plt.subplots(len(chosen), k + 1, figsize=(col_w * sum(widths), row_h * len(chosen) + 0.7),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    hits_at_1 = 0
    for r, q in enumerate(chosen.tolist()):
        _cell(axes[r, 0], q_items[q], q_mod, QUERY, f"query #{int(pairs.ids[q])}",
              width=int(wrap_w * 1.15), lines=lines)
        for c in range(k):
            doc = int(ranked[r, c])
            hit = doc in relevant[q]
            hits_at_1 += int(hit and c == 0)
            mark = "✓ " if hit else ""
            _cell(axes[r, c + 1], d_items[doc], d_mod, HIT if hit else MISS,
                  f"{mark}{c + 1}. s={scores[r, c]:.2f}", width=wrap_w, lines=lines)
    for c, name in enumerate(["query"] + [f"rank {i + 1}" for i in range(k)]):
        axes[0, c].set_title(name, fontsize=9)
    arrow = f"{q_side} ({q_mod}) → {d_side} ({d_mod})"
    head = title or f"Retrieval of {pairs.source}"
    fig.suptitle(f"{head}: {arrow}, top {k} of {len(pairs)}; ✓ green = relevant "
                 f"({hits_at_1}/{len(chosen)} right at rank 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (row_h * len(chosen) + 0.7)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
