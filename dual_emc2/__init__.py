"""dual_emc2: two-tower contrastive training of the global contrastive loss with EMC² and its baselines."""

__version__ = "0.1.0"
