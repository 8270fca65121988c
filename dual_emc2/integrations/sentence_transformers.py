"""The global contrastive loss with EMC² (or any estimator of :mod:`dual_emc2.loss.global_loss`) as a
sentence-transformers loss: ``GlobalContrastiveSTLoss(model, num_samples, texts=(anchors, positives))``.

The loss follows sentence-transformers' convention (``model`` first, ``forward(sentence_features, labels)``,
``get_config_dict``, ``citation``), so it drops into ``SentenceTransformerTrainer`` or a plain torch loop.  It needs
each pair's dataset index, which it receives as ``labels``: give the dataset an integer column named ``label`` (the
collator passes the columns ``label``/``labels``/``score``/``scores`` as labels; a column named ``idx`` or ``*_id``
would be tokenised as text).  Needs ``sentence-transformers>=5`` (the ``st`` extra).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dual_emc2.loss.global_loss import GlobalContrastiveLoss

try:
    from sentence_transformers import SentenceTransformer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("dual_emc2.integrations.sentence_transformers needs sentence-transformers>=5 "
                      '(pip install -e ".[st]")') from err

__all__ = ["GlobalContrastiveSTLoss"]


class GlobalContrastiveSTLoss(nn.Module):
    """
    The global contrastive loss (Yau et al., ICML 2024, eq. 1): for each anchor, the positive against *all* other
    positives of the training set, not only those of the batch.  Its gradient is estimated by ``estimator``;
    the default EMC² keeps one persistent Markov chain per anchor over the whole dataset, so small batches
    optimise the full-dataset objective.  With ``estimator="infonce"`` it is exactly
    :class:`MultipleNegativesRankingLoss` (``symmetric=False``) or :class:`MultipleNegativesSymmetricRankingLoss`
    (``symmetric=True``) with the same ``scale``.

    EMC² keeps one chain state per anchor (a positive elsewhere in the dataset), which it needs encoded every
    step: pass the training texts as ``texts=(anchors, positives)``, indexed like ``labels``.  The loss asks
    which states the step needs, tokenises those texts and runs them through the model *in the same forward
    pass as the batch* (train mode, the batch's dropout), so a state is scored by the same function as the
    batch's candidates: one extra row per anchor whose chain state is outside the batch
    (``reencode_fraction=0.25`` encodes a random quarter, still unbiased).  Without ``texts``, build it not to
    need them: ``weights="visits", proposal="batch", state_score="stale", out_of_batch="drop"`` (no extra rows;
    biased at small batch).

    The estimator state (chains, iteration) lives in this module (``loss.estimator`` in ``state_dict()``):
    save and load it with the model to resume.  Under ``torch.distributed`` the embeddings are gathered with
    gradient over processes (like ``gather_across_devices=True``); each process passes its own rows and indices.

    Args:
        model: SentenceTransformer model.
        num_samples: size of the training set; ``labels`` lie in [0, num_samples).
        estimator: ``"emc2"`` (default), ``"infonce"``, ``"sogclr"``, ``"negative_cache"``, ``"hcl"``, ...
            (:class:`dual_emc2.loss.global_loss.GlobalContrastiveLoss`).
        scale: β, the inverse temperature on cosine similarities (``scale=20`` is temperature 0.05).
        texts: ``(anchors, positives)``, the training texts by dataset index, for re-encoding chain states.
        symmetric: also the positive → anchor direction, with its own chains (the loss is the mean of both).
        **options: the estimator's options, e.g. ``reencode_fraction=0.5``, ``seed=0``.

    Call: ``loss(sentence_features, labels)`` → scalar.  sentence_features: the two tokenised text columns
    (anchors, positives), as sentence-transformers' collator gives them.  labels: [b] int, each pair's dataset
    index, distinct within the (global) batch.  ``last_stats``: detached diagnostics of the last call.

    References:
        - Yau et al., EMC²: Efficient MCMC Negative Sampling for Contrastive Learning with Global Convergence,
          ICML 2024: https://arxiv.org/abs/2404.10575

    Requirements:
        1. (anchor, positive) pairs
        2. a label column holding each pair's dataset index (distinct within a batch)

    Inputs:
        +---------------------------------------+------------------------------+
        | Texts                                 | Labels                       |
        +=======================================+==============================+
        | (anchor, positive) pairs              | index in [0, num_samples)    |
        +---------------------------------------+------------------------------+

    Relations:
        - :class:`MultipleNegativesRankingLoss` is this loss with ``estimator="infonce"``: the batch's
          positives only, whose optimum is biased at small batch sizes.

    Example:
        ::

            from sentence_transformers import SentenceTransformer
            from dual_emc2.integrations.sentence_transformers import GlobalContrastiveSTLoss

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            anchors, positives = ["dog", "cat", "oak"], ["a domestic canine", "a small feline", "a tree"]
            loss = GlobalContrastiveSTLoss(model, num_samples=len(anchors), texts=(anchors, positives))
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

            ids = torch.tensor([0, 2])  # the batch's dataset indices
            features = [model.tokenize([anchors[i] for i in ids]), model.tokenize([positives[i] for i in ids])]
            loss(features, ids).backward()
            optimizer.step()

        With ``SentenceTransformerTrainer``: a dataset with columns ``anchor``, ``positive``, ``label``
        (``label`` = row index), and ``loss=GlobalContrastiveSTLoss(model, len(train_dataset),
        texts=(train_dataset["anchor"], train_dataset["positive"]))``.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        num_samples: int,
        estimator: str = "emc2",
        scale: float = 20.0,
        texts: tuple[Sequence[str], Sequence[str]] | None = None,
        symmetric: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_samples = num_samples
        self.estimator_name = estimator
        self.scale = float(scale)
        self.symmetric = bool(symmetric)
        self.options = dict(options)
        self.loss = GlobalContrastiveLoss(estimator, num_samples, mode="bimodal", symmetric=self.symmetric,
                                          **options)
        if texts is not None:
            if len(texts) != 2:
                raise ValueError(f"texts must be (anchors, positives), two sequences of {num_samples} strings, "
                                 f"got {len(texts)} sequences")
            for name, column in zip(("anchors", "positives"), texts):
                if len(column) != num_samples:
                    raise ValueError(f"texts: {name} has {len(column)} texts, expected num_samples={num_samples} "
                                     "(one per dataset index)")
            texts = (list(texts[0]), list(texts[1]))
        elif self.loss.estimator.needs_candidate_encoder or self.loss.estimator.needs_state_features:
            raise ValueError(
                f"estimator {estimator!r} with these options re-encodes samples by dataset index: pass "
                "texts=(anchors, positives), the training texts indexed like labels, or build it without "
                "re-encoding: weights='visits', proposal='batch', state_score='stale', out_of_batch='drop'")
        self.texts = texts

    @property
    def estimator(self) -> nn.Module:
        """The estimator (its state: chains, iteration, ...)."""
        return self.loss.estimator

    @property
    def last_stats(self) -> dict[str, Tensor]:
        """Detached diagnostics of the last call (``loss``, ``batch_objective``, the estimator's statistics)."""
        return self.loss.last_stats

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        preprocess = getattr(self.model, "preprocess", None)  # sentence-transformers >= 6; `tokenize` before
        features = preprocess(texts) if preprocess is not None else self.model.tokenize(texts)
        # under SentenceTransformerTrainer's DDP the loss holds the wrapper, which has no .device
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}

    def _encode_texts(self, column: int, ids: Tensor) -> Tensor:
        """Unit embeddings of ``texts[column]`` at dataset indices ``ids``, model in eval mode (grad mode: the
        caller's): the negative cache's re-encoding by index."""
        assert self.texts is not None
        features = self._tokenize([self.texts[column][i] for i in ids.tolist()])
        was = self.model.training
        self.model.eval()
        try:
            return F.normalize(self.model(features)["sentence_embedding"].float(), dim=-1)
        finally:
            self.model.train(was)

    def encode_anchors(self, ids: Tensor) -> Tensor:
        return self._encode_texts(0, ids)

    def encode_positives(self, ids: Tensor) -> Tensor:
        return self._encode_texts(1, ids)

    def _with_texts(self, features: dict[str, Tensor], texts: list[str]) -> dict[str, Tensor]:
        """The batch's tokenised ``features`` with ``texts`` appended as further rows (both padded to one length)."""
        if not texts:
            return features
        extra = self._tokenize(texts)
        pad_id = getattr(getattr(self.model, "tokenizer", None), "pad_token_id", None) or 0
        out = dict(features)
        for key, value in features.items():
            if not isinstance(value, Tensor) or key not in extra or value.dim() != 2:
                continue
            more = extra[key].to(value.device)
            width = max(value.shape[1], more.shape[1])
            fill = pad_id if key == "input_ids" else 0
            grow = [F.pad(t, (0, width - t.shape[1]), value=fill) for t in (value, more)]
            out[key] = torch.cat(grow)
        return out

    def _embed(self, features: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.model(features)["sentence_embedding"].float(), dim=-1)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        if len(features) != 2:
            raise ValueError(f"GlobalContrastiveSTLoss takes (anchor, positive) pairs: 2 text columns, got "
                             f"{len(features)} (hard-negative columns are not supported; the estimator samples "
                             "negatives from the whole dataset)")
        if labels is None:
            raise ValueError("GlobalContrastiveSTLoss needs each pair's dataset index as labels: add an integer "
                             "column named 'label' holding the row index in [0, num_samples)")
        b = labels.shape[0]
        if self.texts is not None and self.loss.estimator.needs_state_features:
            # the chain states this step needs, in the batch's own forward (train mode, the batch's dropout)
            need = self.loss.state_request(labels)
            x = self._embed(self._with_texts(features[0], [self.texts[0][i] for i in need.x.ids.tolist()]))
            y = self._embed(self._with_texts(features[1], [self.texts[1][i] for i in need.y.ids.tolist()]))
            return self.loss(x[:b], y[:b], labels.to(x.device), self.scale, state_x=x[b:], state_y=y[b:])
        x = self._embed(features[0])
        y = self._embed(features[1])
        encoders = {}
        if self.texts is not None and self.loss.estimator.needs_candidate_encoder:
            encoders = {"encode_x": self.encode_anchors, "encode_y": self.encode_positives}
        return self.loss(x, y, labels.to(x.device), self.scale, **encoders)

    def get_config_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "estimator": self.estimator_name, "scale": self.scale,
                "symmetric": self.symmetric, **self.options}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return """
@inproceedings{yau2024emc2,
    title={{EMC}$^2$: Efficient {MCMC} Negative Sampling for Contrastive Learning with Global Convergence},
    author={Yau, Chung-Yiu and Wai, Hoi-To and Raman, Parameswaran and Sarkar, Soumajyoti and Hong, Mingyi},
    booktitle={International Conference on Machine Learning},
    year={2024},
}
"""
