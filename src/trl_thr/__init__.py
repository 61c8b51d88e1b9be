"""trl-thr: Token Hidden Reward (arXiv 2510.03669) for TRL's GRPOTrainer."""

__version__ = "0.1.0"

from .thr import compute_thr, group_thresholds, scheduled_p, thr_weights  # noqa: E402
