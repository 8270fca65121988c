"""Per-anchor estimator state keyed by global anchor key (:mod:`~dual_emc2.loss.state.keyed`), which process holds
which rows (:mod:`~dual_emc2.loss.state.layout`, torch-free) and how rows move between processes
(:mod:`~dual_emc2.loss.state.exchange`)."""
