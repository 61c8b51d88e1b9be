"""GSPO-token (arXiv 2507.18071, §4.3) expressed through token-level importance sampling.

GSPO-token uses, for token `t` of completion `i`,

    w_{i,t} = sg[s_i] * pi(y_{i,t}) / sg[pi(y_{i,t})],    log s_i = mean_t (log pi(y_{i,t}) - log pi_old(y_{i,t}))

whose value is the sequence ratio `s_i` (so clipping acts on the sequence) but whose gradient is per token (so
per-token advantages, e.g. THR weights, keep their effect). TRL's token-level path computes
`exp(log pi - old)`; giving it the "old" log-probs below yields exactly `w_{i,t}`, value and gradient.
"""

import torch


def sequence_token_old_logps(
    per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """Old log-probs `(B, T)` that make TRL's token-level ratio equal GSPO-token's `w_{i,t}`.

    Args:
        per_token_logps (`torch.Tensor`, `(B, T)`): current log-probs (with gradient).
        old_per_token_logps (`torch.Tensor`, `(B, T)`, *optional*): log-probs of the sampling policy; `None` means
            on-policy (equal to the current log-probs).
        mask (`torch.Tensor`, `(B, T)`): tokens that count in the sequence mean.

    Returns:
        `sg[log pi] - sg[log s]`, detached, so that `log pi - result = log s + (log pi - sg[log pi])`.
    """
    logps = per_token_logps.detach()
    old = logps if old_per_token_logps is None else old_per_token_logps
    mask = mask.to(logps.dtype)
    log_sequence_ratio = ((logps - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return logps - log_sequence_ratio
