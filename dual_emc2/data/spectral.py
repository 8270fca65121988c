"""High-loss mini-batches by spectral clustering (Cho et al. 2023, "Mini-Batch Optimization of Contrastive
Loss", spectral clustering method).

The in-batch contrastive loss of a batch B, Σ_{i∈B} [−β u_iᵀv_i + log Σ_{j∈B} e^{β u_iᵀv_j}], grows with the
weights w_ij = e^{β u_iᵀv_j} + e^{β u_jᵀv_i} of the pairs it holds (u = φ(x), v = ψ(y); u = v in the unimodal
setting).  Cho et al. find high-loss batches by cutting the graph W = [w_ij] into clusters of about one batch each
with spectral clustering, and train on those batches.  Here:

1. at a refresh, the trainer hands the embeddings of every sample to :meth:`SpectralBatchSampler.update_embeddings`;
   W is dense for ``num_samples ≤ dense_max`` and a symmetrised k-nearest-neighbour graph (FAISS) above;
2. spectral clustering as ``sklearn.cluster.SpectralClustering`` does it (normalised-Laplacian embedding with
   ``n_components`` eigenvectors, then scikit-learn's k-means), with the eigenvectors from Lanczos on the normalised
   adjacency (scipy ``eigsh``; scikit-learn's shift-invert factorises the Laplacian and is far slower on large
   graphs); the tests check the labels against SpectralClustering.  Clusters are renumbered along the first
   non-trivial eigenvector so that neighbouring numbers are similar clusters;
3. batches: each cluster (members in random order) is cut into full global batches; the leftovers of all clusters
   are concatenated in cluster order and cut likewise; the batch order is shuffled.

The plan of an epoch is a [T, W·b] table of global batches drawn from ``(seed, epoch, start batch, refresh count)``
only, so every process yields its slice of the same global batch (rank invariance) and a resumed run replays it.
A refresh takes effect at the next :meth:`set_epoch` (the trainer restarts its loader there): the samples not yet
used in the epoch are regrouped with the new clusters, so each sample is still used once per epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dual_emc2.data.samplers import GlobalBatchSampler
from dual_emc2.loss.distributed import all_gather_rows, broadcast_


def pair_affinity(anchors: Tensor, candidates: Tensor | None = None, beta: float = 1.0) -> Tensor:
    """Dense [N, N] float64 W with w_ij = e^{β(u_iᵀv_j − m)} + e^{β(u_jᵀv_i − m)} (m = max score, a common scale that
    the normalised Laplacian ignores) and a zero diagonal.  ``candidates=None``: v = u (unimodal)."""
    u = anchors.double()
    v = u if candidates is None else candidates.double()
    s = beta * (u @ v.t())
    e = torch.exp(s - s.max())
    w = e + e.t()
    w.fill_diagonal_(0.0)
    return w


def knn_affinity(anchors: Tensor, candidates: Tensor | None = None, beta: float = 1.0, n_neighbors: int = 30):
    """Sparse symmetric W (scipy CSR): for every i its ``n_neighbors`` highest scores u_iᵀv_j (j ≠ i, FAISS inner
    product search) weighted e^{β(u_iᵀv_j − 1)}, then w_ij + w_ji as in :func:`pair_affinity`."""
    import faiss
    import scipy.sparse as sp

    u = anchors.detach().float().cpu().contiguous().numpy()
    v = u if candidates is None else candidates.detach().float().cpu().contiguous().numpy()
    n = u.shape[0]
    k = min(n_neighbors + 1, n)
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    scores, cols = index.search(u, k)
    rows = np.repeat(np.arange(n), k)
    cols, scores = cols.reshape(-1), scores.reshape(-1).astype(np.float64)
    keep = (cols != rows) & (cols >= 0)
    weights = np.exp(beta * (scores[keep] - 1.0))
    w = sp.csr_matrix((weights, (rows[keep], cols[keep])), shape=(n, n))
    return (w + w.T).tocsr()


def spectral_embedding_maps(affinity: Any, n_components: int, *, seed: int = 0, tol: float = 1e-6) -> np.ndarray:
    """[N, n_components] spectral maps of an affinity W (dense array or scipy sparse): the top eigenvectors x of
    D^{-1/2} W D^{-1/2} (= the bottom ones of the normalised Laplacian), rescaled u = D^{-1/2} x and sign-fixed —
    what ``sklearn.manifold.spectral_embedding(drop_first=False)`` returns, computed with Lanczos on the normalised
    adjacency (sparse mat-vecs) instead of scikit-learn's shift-invert, which factorises the Laplacian."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = affinity.shape[0]
    if sp.issparse(affinity):
        w = sp.csr_matrix(affinity, dtype=np.float64)
        deg = np.asarray(w.sum(axis=1)).ravel()
    else:
        w = np.asarray(affinity, dtype=np.float64)
        deg = w.sum(axis=1)
    if (deg <= 0).any():
        raise ValueError(f"spectral clustering: {int((deg <= 0).sum())} samples have no affinity to any other sample")
    inv_sqrt = 1.0 / np.sqrt(deg)
    m = sp.diags(inv_sqrt) @ w @ sp.diags(inv_sqrt) if sp.issparse(w) else w * inv_sqrt[:, None] * inv_sqrt[None, :]
    k = min(n_components, n)
    if k >= n - 1 or n <= 256:  # small problems: dense eigendecomposition
        dense = m.toarray() if sp.issparse(m) else m
        vals, vecs = np.linalg.eigh(dense)
        vecs = vecs[:, np.argsort(vals)[::-1][:k]]
    else:
        v0 = np.random.RandomState(seed).uniform(-1, 1, n)
        vals, vecs = eigsh(m, k=k, which="LA", tol=tol, v0=v0)
        vecs = vecs[:, np.argsort(vals)[::-1]]
    maps = vecs * inv_sqrt[:, None]
    signs = np.sign(maps[np.argmax(np.abs(maps), axis=0), np.arange(k)])
    return maps * np.where(signs == 0, 1.0, signs)


def spectral_clusters(affinity: Any, n_clusters: int, *, n_components: int | None = None, seed: int = 0,
                      n_init: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cluster labels [N] and spectral maps [N, n_components] of an affinity matrix (dense or sparse): the steps of
    ``sklearn.cluster.SpectralClustering(affinity="precomputed", assign_labels="kmeans")`` — normalised-Laplacian
    embedding (:func:`spectral_embedding_maps`, kept first eigenvector) then scikit-learn's ``k_means``."""
    from sklearn.cluster import k_means

    maps = spectral_embedding_maps(affinity, n_components or n_clusters, seed=seed)
    _, labels, _ = k_means(maps, n_clusters, random_state=seed, n_init=n_init)
    return labels.astype(np.int64), maps


def order_clusters(labels: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k−1 by their mean on the first non-trivial spectral coordinate (the Fiedler direction),
    so consecutive cluster numbers are neighbouring clusters."""
    coord = maps[:, 1] if maps.shape[1] > 1 else np.zeros(len(labels))
    uniq = np.unique(labels)
    means = np.array([coord[labels == c].mean() for c in uniq])
    rank = np.empty(int(uniq.max()) + 1, dtype=np.int64)
    rank[uniq[np.argsort(means, kind="stable")]] = np.arange(len(uniq))
    return rank[labels]


def cluster_batches(samples: Tensor, assignment: Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """[⌊n/batch⌋, batch] batches of ``samples`` (ids): every cluster, in random order, cut into full batches, then the
    leftovers of all clusters in cluster order cut likewise (a last partial batch is dropped); rows shuffled."""
    samples = samples[torch.randperm(samples.numel(), generator=generator)]
    clusters = assignment[samples]
    samples = samples[torch.sort(clusters, stable=True).indices]
    clusters = assignment[samples]
    counts = torch.bincount(clusters)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_cluster = torch.arange(samples.numel()) - starts[clusters]
    full = rank_in_cluster < (counts[clusters] // batch) * batch
    rows = torch.cat([samples[full], samples[~full]])
    m = rows.numel() // batch
    plan = rows[: m * batch].view(m, batch)
    return plan[torch.randperm(m, generator=generator)]


class SpectralBatchSampler(GlobalBatchSampler):
    """Drop-in for :class:`GlobalBatchSampler` whose global batches are spectral clusters of the last embeddings.

    Extra options: ``refresh_every`` (K: steps between refreshes; :meth:`refresh_due` tells the trainer),
    ``num_clusters`` (default ⌊N / global batch⌋, one batch per cluster as in Cho et al.), ``beta`` (inverse
    temperature of the weights), ``n_components`` (eigenvectors; default min(num_clusters, 32)), ``n_neighbors``
    and ``dense_max`` (dense W up to that many samples, k-NN graph above), ``n_init`` (k-means restarts).
    Before the first refresh it yields exactly :class:`GlobalBatchSampler`'s batches.

    Args:
        num_samples, batch_size, world_size, rank, seed, shuffle: as :class:`GlobalBatchSampler`.
        refresh_every, num_clusters, beta, n_components, n_neighbors, dense_max, n_init: the extra options above
            (config section ``data.spectral``).

    A refresh (:meth:`refresh` in the trainer, or :meth:`update_embeddings` with every sample's embeddings)
    regroups the batches from the next :meth:`set_epoch` on; :meth:`state_dict` holds what a resume needs.

    Example::

        sampler = SpectralBatchSampler(len(ds), 64, refresh_every=500, beta=5.0)
        if sampler.refresh_due(step):
            sampler.update_embeddings(torch.arange(len(ds)), u, v, step=step)   # u, v: [N, d] embeddings
        sampler.set_epoch(epoch, start_batch=batch_in_epoch)                    # the new clusters take effect
        loader = DataLoader(ds, batch_sampler=sampler)
    """

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, refresh_every: int = 100, num_clusters: int | None = None,
                 beta: float = 5.0, n_components: int | None = None, n_neighbors: int = 30, dense_max: int = 4096,
                 n_init: int = 1) -> None:
        super().__init__(num_samples, batch_size, world_size=world_size, rank=rank, seed=seed, shuffle=shuffle)
        if refresh_every < 1:
            raise ValueError(f"data.spectral.refresh_every must be >= 1 step, got {refresh_every}")
        k = num_clusters if num_clusters is not None else max(1, num_samples // self.global_batch)
        if not 1 <= k <= num_samples:
            raise ValueError(f"data.spectral.num_clusters must lie in [1, {num_samples}] (dataset size), got {k}")
        if beta <= 0:
            raise ValueError(f"data.spectral.beta must be > 0, got {beta}")
        if n_components is not None and not 1 <= n_components <= num_samples:
            raise ValueError(f"data.spectral.n_components must lie in [1, {num_samples}], got {n_components}")
        if n_neighbors < 1 or n_init < 1:
            raise ValueError(f"data.spectral.n_neighbors and n_init must be >= 1, got {n_neighbors}, {n_init}")
        self.refresh_every, self.num_clusters, self.beta = refresh_every, k, float(beta)
        self.n_components = n_components or min(k, 32)
        self.n_neighbors, self.dense_max, self.n_init = n_neighbors, dense_max, n_init
        self.assignment: Tensor | None = None  # [N] cluster of each sample at the last refresh
        self.refreshes = 0
        self.last_refresh_step: int | None = None
        self._pending = False
        self._plan: Tensor | None = None  # [T, G] global batches of epoch self._plan_epoch
        self._plan_epoch: int | None = None

    # ------------------------------------------------------------------------------------------------ refresh
    def refresh_due(self, step: int) -> bool:
        """True at steps 0, K, 2K, … unless that step's refresh was already done."""
        return step % self.refresh_every == 0 and step != self.last_refresh_step

    def compute_assignment(self, ids: Tensor, feats: Tensor, cand_feats: Tensor | None = None) -> Tensor:
        """Cluster [N] of every sample from its embeddings (``ids`` [N] must hold each id 0..N−1 once; ``feats`` [N, d]
        anchor embeddings u, ``cand_feats`` [N, d] candidate embeddings v of the same rows, None when u = v).
        Pure: the sampler is not changed (multi-process: compute on one rank, broadcast, :meth:`set_assignment`)."""
        n = self.num_samples
        if ids.shape != (n,) or not torch.equal(torch.sort(ids.cpu().long()).values, torch.arange(n)):
            raise ValueError(f"update_embeddings: ids must hold every sample id 0..{n - 1} exactly once, got shape "
                             f"{tuple(ids.shape)}")
        if feats.dim() != 2 or feats.shape[0] != n:
            raise ValueError(f"update_embeddings: feats must be [{n}, d], got {tuple(feats.shape)}")
        if cand_feats is not None and cand_feats.shape != feats.shape:
            raise ValueError(f"update_embeddings: cand_feats must match feats {tuple(feats.shape)}, got "
                             f"{tuple(cand_feats.shape)}")
        order = torch.argsort(ids.cpu().long())
        u = feats.detach().cpu()[order]
        v = None if cand_feats is None else cand_feats.detach().cpu()[order]
        if not (torch.isfinite(u).all() and (v is None or torch.isfinite(v).all())):
            raise ValueError("update_embeddings: embeddings contain NaN or inf")
        if n <= self.dense_max:
            affinity = pair_affinity(u, v, self.beta).numpy()
        else:
            affinity = knn_affinity(u, v, self.beta, self.n_neighbors)
        seed = (self.seed * 1_000_003 + self.refreshes) % (2**32)
        labels, maps = spectral_clusters(affinity, self.num_clusters, n_components=self.n_components, seed=seed,
                                         n_init=self.n_init)
        return torch.from_numpy(order_clusters(labels, maps))

    def set_assignment(self, assignment: Tensor, step: int | None = None) -> None:
        """Install clusters [N] (from :meth:`compute_assignment`); they shape the batches from the next
        :meth:`set_epoch` on.  ``step``: the training step of this refresh (for :meth:`refresh_due`)."""
        if assignment.shape != (self.num_samples,) or assignment.dtype.is_floating_point or int(assignment.min()) < 0:
            raise ValueError(f"set_assignment: expected [{self.num_samples}] non-negative integer cluster ids, got "
                             f"{assignment.dtype} {tuple(assignment.shape)}")
        self.assignment = assignment.detach().cpu().long().clone()
        self.refreshes += 1
        self.last_refresh_step = step
        self._pending = True

    @torch.no_grad()
    def refresh(self, embed: Callable[[Tensor], tuple[Tensor, Tensor | None]], *, step: int, beta: float | None,
                chunk: int, device: torch.device | str = "cpu") -> None:
        """The refresh of the trainer (Cho et al.): each process embeds a contiguous slice of the training samples
        (``embed(positions) -> (u, v or None)``, ``chunk`` at a time), the slices are gathered, the main process
        clusters the similarity graph (``beta``: β of the affinity; None keeps the sampler's) and broadcasts the
        clusters; they shape the batches from the next :meth:`set_epoch` on."""
        n, world = self.num_samples, self.world_size
        mine = torch.tensor_split(torch.arange(n), world)[self.rank]  # n >= global batch >= world
        us, vs = [], []
        for part in mine.split(chunk):
            u, v = embed(part)
            us.append(u.float())
            if v is not None:
                vs.append(v.float())
        u_all = all_gather_rows(torch.cat(us))
        v_all = all_gather_rows(torch.cat(vs)) if vs else None
        if beta is not None:
            self.beta = float(beta)
        if self.rank == 0:
            assignment = self.compute_assignment(torch.arange(n), u_all.cpu(),
                                                 None if v_all is None else v_all.cpu()).to(device)
        else:
            assignment = torch.zeros(n, dtype=torch.int64, device=device)
        self.set_assignment(broadcast_(assignment, 0).cpu(), step=step)

    def update_embeddings(self, ids: Tensor, feats: Tensor, cand_feats: Tensor | None = None,
                          step: int | None = None) -> None:
        """Refresh: :meth:`compute_assignment` then :meth:`set_assignment` (single process, or identical inputs)."""
        self.set_assignment(self.compute_assignment(ids, feats, cand_feats), step=step)

    # ------------------------------------------------------------------------------------------------ batches
    def _generator(self, epoch: int, start_batch: int) -> torch.Generator:
        key = ((self.seed * 1_000_003 + epoch) * 1_000_033 + start_batch) * 1_009 + self.refreshes
        return torch.Generator().manual_seed(key % (2**63))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position at global batch ``start_batch`` of ``epoch``; a new epoch gets a new plan, and clusters installed
        since the last call regroup the batches from ``start_batch`` on."""
        T = self.batches_per_epoch()
        if not 0 <= start_batch <= T:
            raise ValueError(f"start_batch {start_batch} not in [0, {T}]")
        G = self.global_batch
        if self._plan_epoch != epoch:
            order = self.epoch_order(epoch)
            if self.assignment is None:
                self._plan = order[: T * G].view(T, G).clone()
            else:
                self._plan = cluster_batches(order, self.assignment, G, self._generator(epoch, 0))
            self._plan_epoch = epoch
            self._pending = False  # the new plan already uses the latest clusters
        if self._pending:
            rest = self._plan[start_batch:].reshape(-1)
            self._plan[start_batch:] = cluster_batches(rest, self.assignment, G, self._generator(epoch, start_batch))
            self._pending = False
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> Tensor:
        """[T, W·b] global batches of the current epoch (all processes)."""
        if self._plan_epoch != self.epoch:
            self.set_epoch(self.epoch, self.start_batch)
        return self._plan

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_batches()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for t in range(self.start_batch, plan.shape[0]):
            yield plan[t, lo:hi].tolist()

    # ------------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the batches still to come (clusters, the epoch plan, refresh counters)."""
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {"num_samples": self.num_samples, "global_batch": self.global_batch, "seed": self.seed,
                "assignment": copy(self.assignment), "refreshes": self.refreshes,
                "last_refresh_step": self.last_refresh_step, "pending": self._pending, "plan": copy(self._plan),
                "plan_epoch": self._plan_epoch}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise ValueError("the checkpoint holds no spectral sampler state (a run without "
                             "data.batch_sampler=spectral); resume it with the batch sampler it was trained with")
        for key, mine in (("num_samples", self.num_samples), ("global_batch", self.global_batch),
                          ("seed", self.seed)):
            if state.get(key) != mine:
                raise ValueError(f"spectral sampler state was saved with {key}={state.get(key)}, this run has "
                                 f"{mine}; resume with the same data, seed and global batch (batch_size x processes)")
        self.assignment = None if state["assignment"] is None else state["assignment"].clone()
        self.refreshes, self.last_refresh_step = int(state["refreshes"]), state["last_refresh_step"]
        self._pending = bool(state["pending"])
        self._plan = None if state["plan"] is None else state["plan"].clone()
        self._plan_epoch = state["plan_epoch"]
