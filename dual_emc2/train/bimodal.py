"""Bimodal (CLIP-style) two-tower training and retrieval evaluation.

Batches (docs/DESIGN.md, section 1): on each process the anchors of direction x→y are its own φ(x_i); the candidates are
ψ(y_j) of the whole global batch, gathered over processes with gradient; anchor i's positive is its own column and
D_neg(x_i) = every other candidate (global sample ids differ).  The reverse batch y→x swaps the roles.  Each
direction has its own estimator state (:class:`~dual_emc2.objectives.SymmetricObjective`), keyed by the sample index,
and the objective is the mean of the two directions.  ``row_offset`` / ``total_rows`` place this process's anchors in
the global batch, so chains draw the same random numbers whatever the number of processes.

Known false negatives — another pair with the identical x (a WordNet lemma list shared by several synsets) or the
identical y — are removed from D_neg through ``ContrastiveBatch.extra_negative_mask`` (``pairs.mask_duplicates``),
and count as relevant in retrieval evaluation.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor
from torch.utils.data import DataLoader

from dual_emc2.data.offline_sets import EMOJI_DIR, WORDNET_DIR, emoji_pairs, wordnet_pairs
from dual_emc2.data.pairs import (
    PairCollator,
    PairDataset,
    PairSet,
    decode_rgb,
    read_pairs_file,
    relevant_sets,
    screen_pairs,
    split_pairs,
)
from dual_emc2.data.samplers import SeededViews
from dual_emc2.data.shards import ShardStream, read_manifest, read_shards
from dual_emc2.losses import GlobalContrastiveLoss
from dual_emc2.metrics.faiss_search import build_index
from dual_emc2.metrics.retrieval import retrieval_metrics
from dual_emc2.objectives import build_objective, options_for
from dual_emc2.objectives.batches import bimodal_contrastive_batches
from dual_emc2.towers.two_tower import TwoTowerModel, build_two_tower
from dual_emc2.train.config import Config, PairsConfig
from dual_emc2.train.trainer import Trainer

__all__ = [
    "BimodalTrainer", "bimodal_contrastive_batches", "check_modalities", "checkpoint_model", "load_pair_sets",
    "read_pair_source", "retrieval_both_directions", "retrieval_report",
]


# ------------------------------------------------------------------------------------------------------- batches


# -------------------------------------------------------------------------------------------------------- data


def read_pair_source(p: PairsConfig, path: str | None, on_bad: str = "raise") -> PairSet:
    """Every pair of the source named by a ``pairs`` config section, read from ``path`` (null: offline default).
    Pairs with empty text, images that do not decode or corrupt shard members stop the read with the culprit named
    (``on_bad="raise"``) or are dropped and counted in ``bad_samples`` (``"skip"``; data.on_bad_sample)."""
    if p.source == "shards":
        if path is None:
            raise ValueError("pairs.path must name the shards for pairs.source=shards")
        return read_shards(path, on_error=on_bad)  # screens every sample while reading
    if p.source == "wordnet":
        pairs = wordnet_pairs(path or WORDNET_DIR, tuple(p.wordnet_pos), p.wordnet_x)
    elif p.source == "emoji":
        pairs = emoji_pairs(path or EMOJI_DIR)
    elif p.source == "file":
        if path is None:
            raise ValueError("pairs.path must name the pairs file for pairs.source=file")
        pairs = read_pairs_file(path, p.x_key, p.y_key, p.id_key)
    else:
        raise ValueError(f"pairs.source: unknown {p.source!r}")
    return screen_pairs(pairs, on_bad)


def load_pair_sets(p: PairsConfig, on_bad: str = "raise") -> tuple[PairSet, PairSet | None]:
    """(training pairs, held-out pairs or None) of a ``pairs`` config section: ``eval_path`` gives a separate
    held-out set, else a seeded split of ``eval_size`` pairs (:func:`~dual_emc2.data.pairs.split_pairs`)."""
    full = read_pair_source(p, p.path, on_bad)
    if p.eval_path is not None:
        if p.source in ("wordnet", "emoji"):
            raise ValueError(f"pairs.eval_path is for shards/file sources; {p.source} uses pairs.eval_size")
        held = read_pair_source(p, p.eval_path, on_bad)
        train, _ = split_pairs(full, 0, p.train_size, p.split_seed)
        overlap = np.intersect1d(train.ids, held.ids)
        if overlap.size:
            raise ValueError(f"pairs.eval_path {p.eval_path} shares {overlap.size} indices with the training pairs "
                             f"(first: {int(overlap[0])}); indices must identify samples across both sets")
        return train, held
    return split_pairs(full, p.eval_size, p.train_size, p.split_seed)


# --------------------------------------------------------------------------------------------------- retrieval


def retrieval_both_directions(
    zx: Tensor | np.ndarray, zy: Tensor | np.ndarray, relevant: Sequence[set[int]], *, ks: Sequence[int] = (1, 5, 10),
    ndcg_k: int = 10, index: str = "flat", use_gpu: str | bool = "auto", **index_options: Any,
) -> dict[str, float]:
    """Recall@k, recall_all@k, MRR (over the top max(ks, ndcg_k) ranks) and nDCG@``ndcg_k`` of x→y (queries ``zx``
    against documents ``zy``) and y→x, searched with a FAISS inner-product index (``index``: ``flat`` exact, ``ivf``
    or ``hnsw``).  ``relevant[i]``:
    positions relevant to query i (symmetric relation, e.g. :func:`~dual_emc2.data.pairs.relevant_sets`).
    Cut-offs larger than the corpus are dropped (``ndcg_k`` is clamped).  Keys: ``x2y_recall@1`` ..."""
    n = int(zx.shape[0])
    if n == 0 or int(zy.shape[0]) != n:
        raise ValueError(f"need as many x as y embeddings (> 0), got {n} and {int(zy.shape[0])}")
    ks = [k for k in ks if k <= n] or [1]
    ndcg_k = min(ndcg_k, n)
    depth = max(max(ks), ndcg_k)
    out: dict[str, float] = {}
    for name, queries, docs in (("x2y", zx, zy), ("y2x", zy, zx)):
        dim = int(docs.shape[1])
        idx = build_index(dim, index, metric="ip", use_gpu=use_gpu, **index_options)
        idx.add(docs)
        _, ranked = idx.search(queries, depth)
        for key, value in retrieval_metrics(ranked, relevant, ks, ndcg_k=ndcg_k).items():
            out[f"{name}_{key}"] = value
    return out


def check_modalities(model: TwoTowerModel, pairs: PairSet) -> None:
    """Each tower must take its side's modality (an image tower cannot embed captions, and vice versa)."""
    for side, have in (("x", pairs.x_modality), ("y", pairs.y_modality)):
        want = model.tower(side).modality
        if want != have:
            raise ValueError(f"{pairs.source}: side {side} holds {have} but the {side} tower takes {want}; pick towers "
                             f"that match the data (towers.x / towers.y / towers.kind)")


def retrieval_report(model: TwoTowerModel, pairs: PairSet, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", image_size: int | None = None, index: str = "flat",
                     ks: Sequence[int] = (1, 5, 10), ndcg_k: int = 10, **index_options: Any) -> dict[str, float]:
    """Embed both sides of ``pairs`` with ``model`` and evaluate retrieval in both directions; queries with the
    same x (or y) as other pairs have all those pairs' documents as relevant."""
    check_modalities(model, pairs)
    zx = model.embed("x", pairs.x, batch_size=batch_size, device=device, image_size=image_size)
    zy = model.embed("y", pairs.y, batch_size=batch_size, device=device, image_size=image_size)
    return retrieval_both_directions(zx, zy, relevant_sets(pairs), ks=ks, ndcg_k=ndcg_k, index=index,
                                     **index_options)


# ------------------------------------------------------------------------------------------------------ trainer


class _Decode:
    """Raw side (text, or image bytes) → what the collator takes (text, or a transformed image tensor)."""

    def __init__(self, transform: Callable[[Any], Tensor] | None) -> None:
        self.transform = transform

    def __call__(self, value: Any) -> Any:
        return value if self.transform is None else self.transform(decode_rgb(value))


class BimodalTrainer(Trainer):
    """The :class:`~dual_emc2.train.trainer.Trainer` loop (checkpoints, resume, logging, non-finite guard) on pairs:
    two towers, both directions of the estimator, retrieval evaluation on the held-out pairs."""

    throughput_key = "pairs_per_s"

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None) -> None:
        if cfg.mode != "bimodal":
            raise ValueError(f"BimodalTrainer needs mode: bimodal, got mode: {cfg.mode}")
        super().__init__(cfg, accelerator)

    # ------------------------------------------------------------------------------------------------ building
    def _build_data(self) -> None:
        cfg, p = self.cfg, self.cfg.pairs
        self.two_tower = build_two_tower(cfg.towers, cfg.objective.beta, cfg.objective.learnable_beta)
        tx, ty = self.two_tower.tower("x"), self.two_tower.tower("y")
        self.image_size = cfg.data.image_size
        collate = PairCollator(tx.prepare, ty.prepare)
        train_tf = (_Decode(tx.transform(self.image_size, p.augment_images)),
                    _Decode(ty.transform(self.image_size, p.augment_images)))
        self.lookup_tf = (_Decode(tx.transform(self.image_size)), _Decode(ty.transform(self.image_size)))
        gb = cfg.train.batch_size * self.acc.num_processes
        self.group_of: tuple[Tensor, Tensor] | None = None
        if p.streaming:
            if cfg.data.batch_sampler != "shuffle":
                raise ValueError(f"data.batch_sampler={cfg.data.batch_sampler} needs every pair in memory; it cannot "
                                 "be used with pairs.streaming=true")
            if p.source != "shards" or p.path is None:
                raise ValueError("pairs.streaming=true needs pairs.source=shards and pairs.path")
            manifest = read_manifest(p.path)
            if p.mask_duplicates:
                warnings.warn("pairs.mask_duplicates is ignored with pairs.streaming=true (duplicates are only known "
                              "when every pair is in memory); set it false to silence this", stacklevel=2)
            for side in ("x", "y"):
                have, want = manifest[f"{side}_modality"], self.two_tower.tower(side).modality
                if have != want:
                    raise ValueError(f"{p.path}: side {side} holds {have} but the {side} tower takes {want}")
            self.train_pairs = None
            self.eval_pairs = read_shards(p.eval_path, cfg.data.on_bad_sample) if p.eval_path else None
            self.num_keys = max(s["last_index"] for s in manifest["shards"]) + 1
            self.train_set = ShardStream(p.path, resampled=True, seed=cfg.seed, shuffle_buffer=p.shuffle_buffer,
                                         decode_x=train_tf[0], decode_y=train_tf[1],
                                         on_error=cfg.data.on_bad_sample)
            self.sampler = None
            self.loader = DataLoader(self.train_set, batch_size=cfg.train.batch_size, collate_fn=collate,
                                     num_workers=cfg.data.num_workers, drop_last=True,
                                     pin_memory=self.device.type == "cuda")
            n_train = int(manifest["num_samples"])
            if n_train < gb:
                raise ValueError(f"{p.path}: {n_train} pairs, fewer than one global batch of {gb}")
            self.micro_per_epoch = n_train // gb
        else:
            self.train_pairs, self.eval_pairs = load_pair_sets(p, cfg.data.on_bad_sample)
            check_modalities(self.two_tower, self.train_pairs)
            self.num_keys = self.train_pairs.num_keys
            if p.mask_duplicates:
                self.group_of = tuple(self._groups_by_id(self.train_pairs, side) for side in ("x", "y"))
            self.train_set = PairDataset(self.train_pairs, train_tf[0].transform, train_tf[1].transform)
            if p.augment_images:  # augmentations seeded by (seed, epoch, index): exact resume, any worker count
                self.train_set = SeededViews(self.train_set, cfg.seed)
            self.sampler = self._build_batch_sampler(len(self.train_set))
            self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=collate,
                                     num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
            self.micro_per_epoch = self.sampler.batches_per_epoch()
        if self.micro_per_epoch < cfg.train.grad_accum:
            raise ValueError(f"an epoch has {self.micro_per_epoch} batches, fewer than train.grad_accum="
                             f"{cfg.train.grad_accum}")
        self.steps_per_epoch = self.micro_per_epoch // cfg.train.grad_accum
        self.micro_used = self.steps_per_epoch * cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    @staticmethod
    def _groups_by_id(pairs: PairSet, side: str) -> Tensor:
        """Group id of every global index (−1 for indices not in the set); distinct groups never collide."""
        table = torch.full((pairs.num_keys,), -1, dtype=torch.int64)
        table[torch.from_numpy(pairs.ids)] = torch.from_numpy(pairs.groups(side))
        return table

    def _build_model(self) -> None:
        cfg = self.cfg
        model = self.two_tower
        del self.two_tower  # the prepared (possibly wrapped) model is self.model
        negatives = cfg.train.batch_size * self.acc.num_processes - 1
        # EMC²'s R defaults to the global batch's negatives per anchor on every row and process: with known false
        # negatives masked, rows differ in valid candidates, and R must not depend on which rows a process holds.
        self.objective = build_objective(
            cfg.objective.name, num_keys=self.num_keys, num_candidates=self.num_keys,
            options=options_for(cfg.objective.name, cfg.objective.options), symmetric=True,
            defaults={"dim": model.x_tower.out_dim, "seed": cfg.seed},
        ).to(self.device)
        if self.objective.needs_labels:
            raise ValueError(f"objective {cfg.objective.name} is supervised (needs class labels); pairs have none, use "
                             "it in mode: unimodal on a labelled image set")
        if self.objective.needs_candidate_encoder and self.train_pairs is None:
            raise ValueError(f"objective {cfg.objective.name} with these options re-encodes samples by index, which "
                             "streaming shards cannot serve; use pairs.streaming=false or options that do not "
                             "(e.g. emc2 out_of_batch=drop, state_score=stale)")
        self.objective.x_to_y.check_batch_shape(negatives)
        self.objective.y_to_x.check_batch_shape(negatives)
        self.loss_fn = GlobalContrastiveLoss.wrap(self.objective, "bimodal", self.num_keys)
        self._prepare_optimisation(model)

    @property
    def core(self) -> TwoTowerModel:
        return self.acc.unwrap_model(self.model)

    def _encode_by_id(self, side: str, ids: Tensor) -> Tensor:
        """Tower ``side`` on the un-augmented samples of global indices ``ids`` (caller's grad mode, eval mode)."""
        pairs = self.train_pairs
        pos = pairs.position_of(ids)
        raw = pairs.x if side == "x" else pairs.y
        decode = self.lookup_tf[0 if side == "x" else 1]
        tower = self.core.tower(side)
        inputs = send_to_device(tower.prepare([decode(raw[i]) for i in pos]), self.device, non_blocking=True)
        return self._forward_in_eval_mode(tower, inputs)

    def encode_x_by_id(self, ids: Tensor) -> Tensor:
        return self._encode_by_id("x", ids)

    def encode_y_by_id(self, ids: Tensor) -> Tensor:
        return self._encode_by_id("y", ids)

    def _spectral_embeddings(self, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """(φ(x), ψ(y)) of the training pairs at sampler positions (the spectral sampler's u and v)."""
        ids = torch.from_numpy(self.train_pairs.ids)[positions]
        return self.encode_x_by_id(ids), self.encode_y_by_id(ids)

    # ------------------------------------------------------------------------------------------------ training
    def _start_epoch(self) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(self.pos.epoch, start_batch=self.pos.batch_in_epoch)
        if isinstance(self.train_set, SeededViews):
            self.train_set.set_epoch(self.pos.epoch)

    def _step_inputs(self, item: Any) -> tuple[Any, ...]:
        ids, x, y = item
        return ids, x, y

    def _samples_in(self, inputs: tuple[Any, ...]) -> int:
        return int(inputs[0].numel())

    def train_step(self, ids: Tensor, x_inputs: Any, y_inputs: Any) -> tuple[Tensor, dict[str, Tensor]] | None:
        """One micro-batch of pairs: both towers, both directions of the estimator, backward, optimiser step."""
        ids = ids.to(self.device)
        x_inputs, y_inputs = send_to_device((x_inputs, y_inputs), self.device, non_blocking=True)
        needs = self.objective.needs_candidate_encoder
        groups = {}
        if self.group_of is not None:
            groups = {"x_groups": self.group_of[0][ids.cpu()].to(self.device),
                      "y_groups": self.group_of[1][ids.cpu()].to(self.device)}
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                zx, zy = self.model(x_inputs, y_inputs)
            beta = self.core.temperature()
            loss = self.loss_fn(zx.float(), zy.float(), ids, beta, encode_x=self.encode_x_by_id if needs else None,
                                encode_y=self.encode_y_by_id if needs else None, **groups)
            if not self._apply(loss):
                return None
        stats = dict(self.loss_fn.last_stats)  # estimator diagnostics, the loss, eq. (1) on the batch (both ways)
        stats["beta"] = beta.detach()
        return loss.detach(), stats

    def evaluate(self) -> dict[str, float]:
        """Recall@1/5/10, MRR and nDCG@10 on the held-out pairs in both directions (empty without a held-out set)."""
        if self.eval_pairs is None:
            return {}
        metrics = retrieval_report(self.core, self.eval_pairs, batch_size=self.cfg.eval.batch_size,
                                   device=self.device, image_size=self.image_size)
        return {k: v for k, v in metrics.items() if "recall_all" not in k}  # eval/retrieval.py reports those too


def checkpoint_model(path: str | Path, cfg: Config | None = None) -> tuple[TwoTowerModel, Config]:
    """Rebuild the two-tower model of a bimodal checkpoint (its own config unless ``cfg`` is given) and load it."""
    from dual_emc2.train.checkpoint import load_checkpoint
    from dual_emc2.train.config import config_from_dict

    payload = load_checkpoint(path, map_location="cpu")
    cfg = cfg or config_from_dict(payload["config"])
    if cfg.mode != "bimodal":
        raise ValueError(f"{path}: not a bimodal checkpoint (mode: {cfg.mode})")
    model = build_two_tower(cfg.towers, cfg.objective.beta, cfg.objective.learnable_beta)
    model.load_state_dict(payload["model"])
    return model, cfg
