"""Bimodal task (CLIP-style): pairs (x_i, y_i), two towers φ and ψ, both directions of the estimator.

Batches (docs/DESIGN.md, section 1): on each process the anchors of direction x→y are its own φ(x_i); the candidates are
ψ(y_j) of the whole global batch, gathered over processes with gradient; anchor i's positive is its own column and
D_neg(x_i) = every other candidate (global sample ids differ).  The reverse batch y→x swaps the roles.  Each
direction has its own estimator state, keyed by the sample index, and the objective is the mean of the two
directions (:class:`~dual_emc2.loss.global_loss.GlobalContrastiveLoss`, ``mode="bimodal"``).

Known false negatives — another pair with the identical x (a WordNet lemma list shared by several synsets) or the
identical y — are removed from D_neg (``pairs.mask_duplicates``) and count as relevant in retrieval evaluation.

EMC²'s chain states (a y sample for each x→y chain, an x sample for each y→x chain) are fetched by the loader's
workers with the batch (:class:`~dual_emc2.data.state_slots.PairStateViews`, images augmented as the batch that drew
them was) and go through each tower in the batch's own forward pass, so text states see the batch's dropout and
image states its augmentation and normalisation (``loss.state_views=exact``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dual_emc2.data.pairs import PairCollator, PairDataset, PairSet, decode_rgb
from dual_emc2.data.samplers import SeededViews
from dual_emc2.data.shards import ShardStream, read_manifest, read_shards
from dual_emc2.data.state_slots import PairStateCollator, PairStateViews, match_slots, select_rows
from dual_emc2.errors import UsageError
from dual_emc2.loss.global_loss import GlobalContrastiveLoss, StateViews
from dual_emc2.loss.registry import build_estimator, options_for
from dual_emc2.towers.two_tower import TwoTowerModel, check_modalities, modality_fix
from dual_emc2.train.models import build_two_tower_model
from dual_emc2.train.pair_sources import load_pair_sets
from dual_emc2.train.retrieval_report import retrieval_report
from dual_emc2.train.schema import Config
from dual_emc2.train.task import Task, forward_in_eval_mode

__all__ = ["PairsTask"]


class _Decode:
    """Raw side (text, or image bytes) → what the collator takes (text, or a transformed image tensor)."""

    def __init__(self, transform: Callable[[Any], Tensor] | None) -> None:
        self.transform = transform

    def __call__(self, value: Any) -> Any:
        return value if self.transform is None else self.transform(decode_rgb(value))


class PairsTask(Task):
    """Pairs of ``pairs.*`` (in memory, or streamed from shards), the towers of ``towers.*`` unless ``model`` is
    given (a :class:`~dual_emc2.towers.two_tower.TwoTowerModel`), retrieval evaluation on the held-out pairs.

    Args:
        cfg: a ``mode: bimodal`` :class:`~dual_emc2.train.schema.Config`.
        accelerator: the run's ``Accelerator``.
        model: the two towers to train, or None for ``towers.*``'s.

    A loader item is ``(ids [b], x_inputs, y_inputs)`` (plus the chain-state slots with ``loss.state_views=exact``);
    :meth:`loss` returns the symmetric global contrastive loss of the b pairs and b.  :meth:`evaluate`: x→y and y→x
    retrieval (R@k) on ``pairs.eval_*``.

    Example::

        cfg = load_config("configs/text_wordnet.yaml")
        acc = build_accelerator(cfg)
        model = build_two_tower(kind="pretrained", x="minilm", y="minilm", proj_dim=256)
        Trainer(cfg, PairsTask(cfg, acc, model=model), acc).fit()
    """

    throughput_key = "pairs_per_s"

    def __init__(self, cfg: Config, accelerator: Accelerator, model: TwoTowerModel | None = None) -> None:
        if cfg.mode != "bimodal":
            raise ValueError(f"PairsTask needs mode: bimodal, got mode: {cfg.mode}")
        super().__init__(cfg, accelerator)
        self.model = build_two_tower_model(cfg) if model is None else model
        self.epoch = 0
        self.state_misses = 0  # states the workers' snapshot did not hold, prepared in this process
        self._build_data(cfg)
        self._build_estimator(cfg)
        self.exact_states = self.estimator.needs_state_features and cfg.loss.state_views == "exact"
        if self.exact_states:  # the workers fetch each pair's chain states with it
            self.train_set = PairStateViews(self.train_set, self.train_pairs)
            self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=PairStateCollator(
                self.model.tower("x").prepare, self.model.tower("y").prepare), num_workers=cfg.data.num_workers,
                pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------------------------------------ building
    def _build_data(self, cfg: Config) -> None:
        p = cfg.pairs
        tx, ty = self.model.tower("x"), self.model.tower("y")
        self.image_size = cfg.data.image_size
        collate = PairCollator(tx.prepare, ty.prepare)
        train_tf = (_Decode(tx.transform(self.image_size, p.augment_images)),
                    _Decode(ty.transform(self.image_size, p.augment_images)))
        self.lookup_tf = (_Decode(tx.transform(self.image_size)), _Decode(ty.transform(self.image_size)))
        self.group_of: tuple[Tensor, Tensor] | None = None
        self.train_pairs: PairSet | None = None
        if p.streaming:
            self._build_stream(cfg, train_tf, collate)
            return
        self.train_pairs, self.eval_pairs = load_pair_sets(p, cfg.data.on_bad_sample)
        check_modalities(self.model, self.train_pairs)
        self.num_keys = self.train_pairs.num_keys
        if p.mask_duplicates:
            self.group_of = tuple(_groups_by_id(self.train_pairs, side) for side in ("x", "y"))
        self.train_set = PairDataset(self.train_pairs, train_tf[0].transform, train_tf[1].transform)
        if p.augment_images:  # augmentations seeded by (seed, epoch, index): exact resume, any worker count
            self.train_set = SeededViews(self.train_set, cfg.seed)
        self.sampler = self.batch_sampler(len(self.train_set))
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=collate,
                                 num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.batches_per_epoch = self.sampler.batches_per_epoch()

    def _build_stream(self, cfg: Config, train_tf: tuple[_Decode, _Decode], collate: PairCollator) -> None:
        """Streaming of ``pairs.path`` in seeded passes, disjoint over ranks and workers (no pair held in memory; no
        re-encoding by id); :meth:`start_epoch` puts the stream at the run's position."""
        p = cfg.pairs
        if cfg.data.batch_sampler != "shuffle":
            raise UsageError(f"data.batch_sampler={cfg.data.batch_sampler} needs every pair in memory; it cannot "
                             "be used with pairs.streaming=true")
        if p.source != "shards" or p.path is None:
            raise UsageError("pairs.streaming=true needs pairs.source=shards and pairs.path")
        manifest = read_manifest(p.path, key="pairs.path")
        if p.mask_duplicates:
            warnings.warn("pairs.mask_duplicates is ignored with pairs.streaming=true (duplicates are only known "
                          "when every pair is in memory); set it false to silence this", stacklevel=2)
        for side in ("x", "y"):
            have, want = manifest[f"{side}_modality"], self.model.tower(side).modality
            if have != want:
                raise UsageError(f"{p.path}: side {side} holds {have} but the {side} tower takes {want}; "
                                 f"{modality_fix(manifest['x_modality'], manifest['y_modality'])}")
        self.eval_pairs = (read_shards(p.eval_path, cfg.data.on_bad_sample, key="pairs.eval_path") if p.eval_path
                           else None)
        self.num_keys = max(s["last_index"] for s in manifest["shards"]) + 1
        decode_x, decode_y = (tf if tf.transform is not None else None for tf in train_tf)  # None: text as is
        self.train_set = ShardStream(p.path, resampled=True, seed=cfg.seed, shuffle_buffer=p.shuffle_buffer,
                                     decode_x=decode_x, decode_y=decode_y, on_error=cfg.data.on_bad_sample,
                                     key="pairs.path", rank=self.acc.process_index,
                                     world_size=self.acc.num_processes)
        self.sampler = None
        self.loader = DataLoader(self.train_set, batch_size=cfg.train.batch_size, collate_fn=collate,
                                 num_workers=cfg.data.num_workers, drop_last=True,
                                 pin_memory=self.device.type == "cuda")
        gb = cfg.train.batch_size * self.acc.num_processes
        n_train = int(manifest["num_samples"])
        if n_train < gb:
            raise ValueError(f"{p.path}: {n_train} pairs, fewer than one global batch of {gb}")
        self.batches_per_epoch = n_train // gb
        # loader batches the trainer takes from an "epoch" of the stream: whole accumulation groups (Trainer.micro_used)
        self.stream_epoch_batches = self.batches_per_epoch - self.batches_per_epoch % cfg.train.grad_accum

    def _build_estimator(self, cfg: Config) -> None:
        # EMC²'s R defaults to the global batch's negatives per anchor on every row and process: with known false
        # negatives masked, rows differ in valid candidates, and R must not depend on which rows a process holds.
        negatives = cfg.train.batch_size * self.acc.num_processes - 1
        self.estimator = build_estimator(
            cfg.loss.estimator, num_keys=self.num_keys, num_candidates=self.num_keys,
            options=options_for(cfg.loss.estimator, cfg.loss.options), symmetric=True,
            defaults={"dim": self.model.x_tower.out_dim, "seed": cfg.seed},
            state_sharding=cfg.loss.state_sharding,
        ).to(self.device)
        if self.estimator.needs_labels:
            raise ValueError(f"estimator {cfg.loss.estimator} is supervised (needs class labels); pairs have none, use "
                             "it in mode: unimodal on a labelled image set")
        if (self.estimator.needs_candidate_encoder or self.estimator.needs_state_features) and self.train_pairs is None:
            raise ValueError(f"estimator {cfg.loss.estimator} with these options re-encodes samples by index, which "
                             "streaming shards cannot serve; use pairs.streaming=false or options that do not "
                             "(e.g. emc2 out_of_batch=drop, state_score=stale)")
        self.estimator.check_batch_shape(negatives)
        self.loss_fn = GlobalContrastiveLoss.wrap(self.estimator, "bimodal", self.num_keys)

    # ------------------------------------------------------------------------------------------------ training
    def start_epoch(self, epoch: int, batch_in_epoch: int) -> None:
        """In-memory pairs: the sampler's epoch.  Streams: continue the stream after the loader batches of the
        epochs before and the batches of this one already trained (a resumed run reads on, it does not restart)."""
        super().start_epoch(epoch, batch_in_epoch)
        if isinstance(self.train_set, ShardStream):
            self.train_set.set_position(epoch * self.stream_epoch_batches + batch_in_epoch, self.cfg.train.batch_size)
        # the views change between epochs only where an image side is augmented; elsewhere a state is the same input
        augmented = self.cfg.pairs.augment_images and "image" in (self.model.tower("x").modality,
                                                                  self.model.tower("y").modality)
        self.epoch = epoch if augmented else 0
        if self.exact_states:
            o = self.estimator
            self.train_set.set_states(x=o.y_to_x.state_views(), y=o.x_to_y.state_views())

    def encode_by_id(self, core: TwoTowerModel, side: str, ids: Tensor) -> Tensor:
        """Tower ``side`` on the un-augmented samples of global indices ``ids`` (caller's grad mode, eval mode): the
        spectral sampler's embeddings, the negative cache, and EMC²'s states with
        ``loss.state_views=unaugmented``."""
        pairs = self.train_pairs
        raw = pairs.x if side == "x" else pairs.y
        decode = self.lookup_tf[0 if side == "x" else 1]
        tower = core.tower(side)
        inputs = send_to_device(tower.prepare([decode(raw[i]) for i in pairs.position_of(ids)]), self.device,
                                non_blocking=True)
        return forward_in_eval_mode(self.acc, tower, inputs)

    def _with_states(self, side: str, need: StateViews, b: int, inputs: Any, slots: dict[str, Any]) -> Any:
        """Side ``side``'s inputs for the forward: the batch's b rows, then the requested states in request order
        (rows the workers prepared; a side whose snapshot missed one is prepared again here)."""
        keys, epochs, values = slots[side]
        pos = match_slots(need.ids, need.epochs, keys, epochs)
        if bool((pos >= 0).all()):
            return select_rows(inputs, torch.cat([torch.arange(b), b + pos]))
        self.state_misses += int((pos < 0).sum())
        tower = self.model.tower(side)
        extra = [values[b + int(p)] if p >= 0 else self.train_set.state_value(side, int(k), int(e))
                 for p, k, e in zip(pos.tolist(), need.ids.tolist(), need.epochs.tolist())]
        return tower.prepare(list(values[:b]) + extra)

    def loss(self, model: nn.Module, item: Any) -> tuple[Tensor, int]:
        ids, x_inputs, y_inputs = item[:3]
        b = int(ids.numel())
        states: dict[str, Any] = {}
        if self.exact_states:  # the chains' states, through each tower with the batch (one forward)
            need = self.loss_fn.state_request(ids, epoch=self.epoch)
            x_inputs = self._with_states("x", need.x, b, x_inputs, item[3])
            y_inputs = self._with_states("y", need.y, b, y_inputs, item[3])
        ids = ids.to(self.device)
        x_inputs, y_inputs = send_to_device((x_inputs, y_inputs), self.device, non_blocking=True)
        core = self.unwrap(model)
        encoders = {}
        if self.estimator.needs_candidate_encoder or (self.estimator.needs_state_features and not self.exact_states):
            encoders = {"encode_x": lambda i: self.encode_by_id(core, "x", i),
                        "encode_y": lambda i: self.encode_by_id(core, "y", i)}
        groups = {}
        if self.group_of is not None:
            groups = {"x_groups": self.group_of[0][ids.cpu()].to(self.device),
                      "y_groups": self.group_of[1][ids.cpu()].to(self.device)}
        with self.acc.autocast():
            zx, zy = model(x_inputs, y_inputs)
        zx, zy = zx.float(), zy.float()
        if self.exact_states:
            states = {"state_x": zx[b:], "state_y": zy[b:]}
        loss = self.loss_fn(zx[:b], zy[:b], ids, core.temperature(), **encoders, **groups, epoch=self.epoch, **states)
        if self.exact_states:
            self.loss_fn.last_stats["state_views"] = torch.tensor(float(len(need)))
        return loss, b

    def spectral_embeddings(self, core: nn.Module, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """(φ(x), ψ(y)) of the training pairs at sampler positions (the spectral sampler's u and v)."""
        ids = torch.from_numpy(self.train_pairs.ids)[positions]
        return self.encode_by_id(core, "x", ids), self.encode_by_id(core, "y", ids)

    @property
    def eval_description(self) -> str:
        n = 0 if self.eval_pairs is None else len(self.eval_pairs)
        return f"retrieval on {n:,} held-out pairs, both directions"

    def evaluate(self, core: nn.Module, out_dir: Path) -> dict[str, float]:
        """Recall@1/5/10, MRR and nDCG@10 on the held-out pairs in both directions (empty without a held-out set)."""
        if self.eval_pairs is None:
            return {}
        metrics = retrieval_report(core, self.eval_pairs, batch_size=self.cfg.eval.batch_size, device=self.device,
                                   image_size=self.image_size)
        return {k: v for k, v in metrics.items() if "recall_all" not in k}  # eval/retrieval.py reports those too


def _groups_by_id(pairs: PairSet, side: str) -> Tensor:
    """Group id of every global index (−1 for indices not in the set); distinct groups never collide."""
    table = torch.full((pairs.num_keys,), -1, dtype=torch.int64)
    table[torch.from_numpy(pairs.ids)] = torch.from_numpy(pairs.groups(side))
    return table
