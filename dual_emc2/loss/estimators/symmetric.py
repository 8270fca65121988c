"""Two-direction use for bimodal (CLIP-style) training: x→y and y→x, each with its own estimator state."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from dual_emc2.loss.estimators.base import ContrastiveBatch, Estimator, EstimatorOutput


class SymmetricEstimator(Estimator):
    """Average of an estimator over both directions of a two-tower (bimodal) loss, L = ½ (L_xy + L_yx), each
    direction with its own state (``x_to_y``, ``y_to_x``); ``build_estimator(..., symmetric=True)`` builds it.

    Args:
        make: builds one independent estimator; called once per direction.

    Call: ``sym(batch_xy, beta, reverse=batch_yx)`` → :class:`~dual_emc2.loss.estimators.base.EstimatorOutput`, the
    mean of the two losses, stats prefixed ``x2y/`` and ``y2x/``.

    Example::

        sym = SymmetricEstimator(lambda: SogCLR(num_keys=n))      # n = len(dataset)
        xy, yx = bimodal_contrastive_batches(zx, zy, ids)         # zx, zy: [b, d] unit features, ids: [b]
        out = sym(xy, beta=10.0, reverse=yx)
        out.loss.backward()
    """

    name = "symmetric"

    def __init__(self, make: Callable[[], Estimator]) -> None:
        super().__init__()
        self.x_to_y = make()
        self.y_to_x = make()
        self.needs_candidate_encoder = self.x_to_y.needs_candidate_encoder
        self.needs_state_features = self.x_to_y.needs_state_features
        self.needs_labels = self.x_to_y.needs_labels

    def check_batch_shape(self, negatives_per_anchor: int) -> None:
        self.x_to_y.check_batch_shape(negatives_per_anchor)
        self.y_to_x.check_batch_shape(negatives_per_anchor)

    def forward(self, batch: ContrastiveBatch, beta: Tensor | float, reverse: ContrastiveBatch | None = None
                ) -> EstimatorOutput:
        if reverse is None:
            raise ValueError("SymmetricEstimator needs both direction batches: "
                             "estimator(batch_xy, beta, reverse=batch_yx)")
        a = self.x_to_y(batch, beta)
        c = self.y_to_x(reverse, beta)
        stats = {f"x2y/{k}": v for k, v in a.stats.items()} | {f"y2x/{k}": v for k, v in c.stats.items()}
        return EstimatorOutput(0.5 * (a.loss + c.loss), stats)
