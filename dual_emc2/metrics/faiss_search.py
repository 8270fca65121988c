"""Nearest-neighbour search over feature vectors with FAISS (exact flat, IVF-flat, HNSW).

:func:`build_index` returns a :class:`FaissIndex`, a thin holder around a ``faiss.Index`` that remembers how it was
built, trains an IVF index on the first :meth:`FaissIndex.add` when no training set was given, and keeps the GPU
resources alive.  :func:`search` takes torch tensors or numpy arrays and returns numpy ``(scores, ids)``; scores are
inner products for ``metric="ip"`` and *squared* L2 distances for ``metric="l2"`` (FAISS' convention), sorted best
first.  A GPU index is used only where FAISS was built with GPU support (``faiss-gpu``) and sees a device; the CPU
``faiss-cpu`` wheel runs everything on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

IndexKind = Literal["flat", "ivf", "hnsw"]
Metric = Literal["ip", "l2"]
ArrayLike = Tensor | np.ndarray

_KINDS = ("flat", "ivf", "hnsw")
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support (``StandardGpuResources``) and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def as_float32_matrix(x: ArrayLike, name: str, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 ``[n, d]`` numpy array (FAISS' input format), checking its shape."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] matrix, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, but the index was built for dimension {dim}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class FaissIndex:
    """A FAISS index plus its build settings.

    ``index`` is ``None`` only for an IVF index still waiting for its training data (the first :meth:`add`).
    ``nlist`` is the number of IVF lists actually used (clamped to the training-set size).

    Fields: ``dim`` (vector dimension), ``kind`` (``"flat"``, ``"ivf"``, ``"hnsw"``), ``metric`` (``"ip"``, ``"l2"``),
    ``on_gpu``, ``nlist``, ``nprobe``, ``index`` (the ``faiss.Index``).  Build it with :func:`build_index`.

    Example::

        index = build_index(128, "flat", metric="ip", use_gpu=False).add(db)     # db: [n, 128] unit rows
        scores, ids = index.search(queries, k=10)                                # numpy [nq, 10] each, best first
    """

    dim: int
    kind: IndexKind
    metric: Metric
    on_gpu: bool
    nlist: int
    nprobe: int
    index: Any = None
    _gpu_resources: Any = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        """Number of vectors added so far."""
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, x: ArrayLike) -> FaissIndex:
        """Add database vectors ``x`` [n, dim]; an untrained IVF index is first trained on ``x`` itself."""
        xb = as_float32_matrix(x, "database vectors", self.dim)
        if xb.shape[0] == 0:
            raise ValueError("database vectors: got an empty [0, d] matrix")
        if self.index is None:
            self._make_ivf(xb)
        self.index.add(xb)
        return self

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Same as :func:`search` on this index."""
        return search(self, queries, k)

    def _make_ivf(self, train_x: np.ndarray) -> None:
        """Create the IVF-flat index with ``nlist`` clamped to ``len(train_x)`` and train its coarse quantiser."""
        self.nlist = min(self.nlist, train_x.shape[0])
        self.nprobe = min(self.nprobe, self.nlist)
        metric = _METRICS[self.metric]
        if self.on_gpu:
            index = faiss.GpuIndexIVFFlat(self._gpu_resources, self.dim, self.nlist, metric)
        else:
            quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, metric)  # keeps a reference to quantizer
        index.train(train_x)
        index.nprobe = self.nprobe
        self.index = index


def _use_gpu(use_gpu: str | bool, kind: str) -> bool:
    if use_gpu == "auto":
        return faiss_gpu_available() and kind != "hnsw"
    if use_gpu is True:
        if not faiss_gpu_available():
            raise RuntimeError(
                "use_gpu=True, but FAISS has no GPU support here (needs faiss-gpu with StandardGpuResources and a "
                "visible GPU); pass use_gpu='auto' or False"
            )
        if kind == "hnsw":
            raise ValueError("use_gpu=True: FAISS has no GPU HNSW index; use kind='flat' or 'ivf', or use_gpu=False")
        return True
    if use_gpu is False:
        return False
    raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")


def build_index(
    dim: int,
    kind: IndexKind = "flat",
    *,
    metric: Metric = "ip",
    use_gpu: str | bool = "auto",
    nlist: int = 1024,
    nprobe: int = 16,
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 80,
    hnsw_ef_search: int = 64,
    train_x: ArrayLike | None = None,
) -> FaissIndex:
    """Build an empty FAISS index for ``dim``-dimensional vectors.

    kind:   ``"flat"`` exact search (``IndexFlatIP`` / ``IndexFlatL2``); ``"ivf"`` inverted lists over a k-means coarse
            quantiser (``IndexIVFFlat``, ``nlist`` lists, ``nprobe`` visited per query; trained on ``train_x`` now or
            on the first added batch, with ``nlist`` clamped to that set's size); ``"hnsw"`` graph search
            (``IndexHNSWFlat`` with ``hnsw_m`` links per node, CPU only).
    metric: ``"ip"`` (inner product; cosine similarity on L2-normalised inputs) or ``"l2"`` (squared distance).
    use_gpu: ``"auto"`` uses a GPU index when FAISS has GPU support and sees a GPU; ``True`` requires it.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    dim = int(dim)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {tuple(_METRICS)}, got {metric!r}")
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("hnsw_m", hnsw_m),
                        ("hnsw_ef_construction", hnsw_ef_construction), ("hnsw_ef_search", hnsw_ef_search)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if train_x is not None and kind != "ivf":
        raise ValueError(f"train_x is only used by kind='ivf' (got kind={kind!r})")
    on_gpu = _use_gpu(use_gpu, kind)
    resources = faiss.StandardGpuResources() if on_gpu else None
    holder = FaissIndex(dim=dim, kind=kind, metric=metric, on_gpu=on_gpu, nlist=int(nlist), nprobe=int(nprobe),
                        _gpu_resources=resources)
    metric_id = _METRICS[metric]
    if kind == "flat":
        if on_gpu:
            holder.index = faiss.GpuIndexFlat(resources, dim, metric_id)
        else:
            holder.index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), metric_id)
        index.hnsw.efConstruction = int(hnsw_ef_construction)
        index.hnsw.efSearch = int(hnsw_ef_search)
        holder.index = index
    elif train_x is not None:
        xt = as_float32_matrix(train_x, "train_x", dim)
        if xt.shape[0] == 0:
            raise ValueError("train_x: got an empty [0, d] matrix")
        holder._make_ivf(xt)
    return holder


def search(index: FaissIndex | faiss.Index, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` search: returns ``scores`` [nq, k] float32 and ``ids`` [nq, k] int64, best first.

    Scores are inner products (``metric="ip"``) or squared L2 distances (``"l2"``).  Approximate indexes may return
    id ``-1`` where they found fewer than ``k`` neighbours.
    """
    raw = index.index if isinstance(index, FaissIndex) else index
    if raw is None or raw.ntotal == 0:
        raise ValueError("search: the index is empty; add database vectors first")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > raw.ntotal:
        raise ValueError(f"k={k} exceeds the number of indexed vectors ({raw.ntotal})")
    xq = as_float32_matrix(queries, "queries", raw.d)
    scores, ids = raw.search(xq, int(k))
    return scores, ids.astype(np.int64, copy=False)


def exact_topk(db: ArrayLike, queries: ArrayLike, k: int, *, metric: Metric = "ip",
               use_gpu: str | bool = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` against ``db`` with a flat index: ``(scores, ids)`` as in :func:`search`."""
    xb = as_float32_matrix(db, "db")
    index = build_index(xb.shape[1], "flat", metric=metric, use_gpu=use_gpu)
    index.add(xb)
    return search(index, queries, k)
