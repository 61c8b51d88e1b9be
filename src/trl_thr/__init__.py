"""trl-thr: Token Hidden Reward (arXiv 2510.03669) for TRL's GRPOTrainer.

The package has two layers. The core (this package: the THR math in `thr.py`, `THRGRPOConfig`, `THRGRPOTrainer`,
GSPO-token and `_trl_compat.py`, the one place that relies on TRL internals) needs torch and TRL only. The
`trl-thr` command line and its recipes (datasets, templates, rewards, evaluation, reports) live in `trl_thr.cli`
and need the `cli` extra (math-verify, matplotlib). The math needs only torch; the trainer and its config import
TRL, which takes a few seconds, so they load on first access.
"""

__version__ = "0.1.0"

from .gspo_token import sequence_token_old_logps
from .metrics import pass_at_k
from .thr import compute_thr, group_thresholds, scheduled_p, thr_weights

_LAZY = {"THRGRPOConfig": ".thr_grpo_config", "THRGRPOTrainer": ".thr_grpo_trainer"}

__all__ = [
    "THRGRPOConfig",
    "THRGRPOTrainer",
    "compute_thr",
    "group_thresholds",
    "pass_at_k",
    "scheduled_p",
    "sequence_token_old_logps",
    "thr_weights",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
