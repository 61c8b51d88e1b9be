"""Token Hidden Reward (THR): the math, as pure functions on tensors.

This module imports nothing but `torch`, so it can be used (and tested) without TRL. Notation follows
`docs/theory.md` and arXiv 2510.03669:

- a batch holds `B` completions of `T` (padded) tokens; rows are grouped consecutively, `num_generations` (`G`)
  rows per prompt;
- `h_{j,t}` (`d`) is the final-norm hidden state that predicts completion token `y_{j,t}`;
- `pi_{j,t} = softmax(transform(W h_{j,t} + b))`, with `transform` the trainer's logit scaling, soft-capping and
  temperature;
- `g_{j,t} = e_{y_{j,t}} - pi_{j,t}` is the softmax residual of that token;
- `P` is the group's set of positive completions (by default those with advantage `A > 0`).

    THR_{j,t} = sign(A_j) * g_{j,t}^T M h_{j,t},     M = sum_{i in P} (1/|y_i|) sum_k g_{i,k} h_{i,k}^T

which equals the paper's double sum over positive tokens of `<g_{i,k}, g_{j,t}> <h_{i,k}, h_{j,t}>` without ever
forming a pairwise (T x T) or a (B x T x V) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

STRATEGIES = ("positive-amplify", "negative-amplify", "amplify", "dominant-only", "nthr", "none")
THRESHOLD_MODES = ("anchor", "quantile", "absolute", "none")
QUANTILE_SCOPES = ("group", "batch")
VOCAB_MODES = ("sampled", "full")
P_SCHEDULES = ("constant", "linear", "cosine")

# Largest (tokens x vocabulary) block the kernel materialises at once: 2**24 float32 values are 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 2**24


def transform_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Apply the logit transform TRL's fused LM head uses: scale, then soft-cap, then divide by the temperature."""
    logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits / temperature


def positive_rows(
    advantages: torch.Tensor, completion_mask: torch.Tensor, positive_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows that belong to the positive set `P`, shape `(B,)` bool.

    `positive_mask` overrides the default rule `A > 0`. A completion without any counted token cannot be in `P`
    (its `1/|y_i|` is undefined).
    """
    positive = advantages > 0 if positive_mask is None else positive_mask.bool()
    return positive & completion_mask.bool().any(dim=1)


def active_groups(
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Groups THR applies to, shape `(B // G,)` bool: a non-empty positive set, and advantages that are not all equal.

    Every other group gets THR 0 and weight 1: its completions all got the same reward, or nothing in it is
    "positive". Equal rewards are recognised by equal advantages rather than zero ones, because the group mean of
    equal rewards can leave a rounding residue that the std normalisation blows up (rewards of 0.3 give A = +3e-4).
    """
    positive = positive_rows(advantages, completion_mask, positive_mask).view(-1, num_generations)
    grouped = advantages.view(-1, num_generations)
    spread = grouped.amax(dim=1) > grouped.amin(dim=1)
    return positive.any(dim=1) & spread


def active_tokens(
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens THR applies to, shape `(B, T)` bool: counted tokens of the [`active_groups`]."""
    active = active_groups(advantages, completion_mask, num_generations, positive_mask)
    return active.repeat_interleave(num_generations).unsqueeze(1) & completion_mask.bool()


def _check_group_layout(name: str, batch_size: int, num_generations: int) -> None:
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    if batch_size % num_generations != 0:
        raise ValueError(
            f"{name} has {batch_size} rows, which is not a multiple of num_generations={num_generations}: THR needs "
            "whole groups of consecutive rows."
        )


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}.")


def _vocab_blocks(
    vocab_ids: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None, block_rows: int, dtype
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield `(ids (C,), W_ids (C, d), b_ids (C,) | None)` blocks covering sorted `vocab_ids`, cast to `dtype`."""
    for start in range(0, vocab_ids.numel(), block_rows):
        ids = vocab_ids[start : start + block_rows]
        weight = lm_head_weight[ids].to(dtype)
        bias = None if lm_head_bias is None else lm_head_bias[ids].to(dtype)
        yield ids, weight, bias


def _block_logits(hidden, weight, bias, logit_kwargs) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return transform_logits(logits, **logit_kwargs)


def _log_normaliser(
    hidden, targets, lm_head_weight, lm_head_bias, token_logprobs, logit_kwargs, block_elements
) -> torch.Tensor:
    """log-sum-exp of the transformed logits over the full vocabulary, shape `(N,)`.

    With the trainer's log-prob of each sampled token this costs one dot product per token: `LSE = z_y - log pi(y)`.
    Without it, the full vocabulary is streamed in blocks.
    """
    dtype = hidden.dtype
    if token_logprobs is not None:
        target_weight = lm_head_weight[targets].to(dtype)
        target_logit = (hidden * target_weight).sum(-1)
        if lm_head_bias is not None:
            target_logit = target_logit + lm_head_bias[targets].to(dtype)
        return transform_logits(target_logit, **logit_kwargs) - token_logprobs.to(dtype)
    vocab_size = lm_head_weight.size(0)
    block_rows = max(1, block_elements // max(1, hidden.size(0)))
    lse = hidden.new_full((hidden.size(0),), -math.inf)
    all_ids = torch.arange(vocab_size, device=hidden.device)
    for _, weight, bias in _vocab_blocks(all_ids, lm_head_weight, lm_head_bias, block_rows, dtype):
        lse = torch.logaddexp(lse, torch.logsumexp(_block_logits(hidden, weight, bias, logit_kwargs), dim=-1))
    return lse


@dataclass
class _GroupTokens:
    """The counted tokens of one group in row-major order: `hidden` (N, d), `targets` (N,), `lse` (N,); row `j`
    owns tokens `row_bounds[j]`."""

    hidden: torch.Tensor
    targets: torch.Tensor
    lse: torch.Tensor
    row_bounds: list[tuple[int, int]]
    logit_kwargs: dict

    def chunks(self, row: int, size: int) -> Iterator[tuple[int, int]]:
        start, end = self.row_bounds[row]
        for chunk_start in range(start, end, size):
            yield chunk_start, min(chunk_start + size, end)

    def residual(self, block, start: int, end: int) -> torch.Tensor:
        """`g = e_y - pi` restricted to the block's ids for tokens `start:end`, shape `(n, C)`."""
        ids, weight, bias = block
        targets = self.targets[start:end]
        residual = (_block_logits(self.hidden[start:end], weight, bias, self.logit_kwargs)
                    - self.lse[start:end, None]).exp_().neg_()
        column = torch.searchsorted(ids, targets).clamp(max=ids.numel() - 1)
        hits = torch.nonzero(ids[column] == targets).squeeze(1)
        residual[hits, column[hits]] += 1
        return residual

    def row_matrix(self, block, row: int, coef: float, chunk: int) -> torch.Tensor:
        """`coef * sum_k g_{row,k} h_{row,k}^T` on the block's ids, shape `(C, d)`."""
        matrix = self.hidden.new_zeros(block[0].numel(), self.hidden.size(1))
        for start, end in self.chunks(row, chunk):
            matrix.addmm_(self.residual(block, start, end).T, self.hidden[start:end], alpha=coef)
        return matrix


def _group_thr(
    tokens: _GroupTokens,
    coef: list[float],
    compute_rows: list[bool],
    blocks: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    include_self: bool,
    block_elements: int,
) -> torch.Tensor:
    """Unsigned THR `g^T M h` for every token of one group, shape `(N,)`.

    Row `j` enters `M` with coefficient `coef[j]` (`1/|y_j|` if positive, else 0) and gets a value only if
    `compute_rows[j]`. `g^T M h` is a sum over vocabulary blocks, so each block is handled on its own and at most
    `block_elements` (tokens x vocabulary) values exist at a time.
    """
    thr = tokens.hidden.new_zeros(tokens.hidden.size(0))
    for block in blocks:
        chunk = max(1, block_elements // block[0].numel())
        influence = tokens.hidden.new_zeros(block[0].numel(), tokens.hidden.size(1))  # M on this block, (C, d)
        for row, c in enumerate(coef):
            if c > 0:
                influence += tokens.row_matrix(block, row, c, chunk)
        for row, wanted in enumerate(compute_rows):
            if not wanted:
                continue
            row_influence = influence
            if not include_self and coef[row] > 0:
                row_influence = influence - tokens.row_matrix(block, row, coef[row], chunk)
            for start, end in tokens.chunks(row, chunk):
                projected = tokens.hidden[start:end] @ row_influence.T  # M h, (n, C)
                thr[start:end] += (tokens.residual(block, start, end) * projected).sum(-1)
    return thr


@torch.no_grad()
def compute_thr(
    hidden_states: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    lm_head_weight: torch.Tensor,
    advantages: torch.Tensor,
    num_generations: int,
    *,
    temperature: float = 1.0,
    vocab: str = "sampled",
    include_self: bool = True,
    token_logprobs: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Token Hidden Reward of every completion token (arXiv 2510.03669, Eq. THR; `docs/theory.md`).

    Args:
        hidden_states (`torch.Tensor`, `(B, T, d)`):
            Final-norm hidden states; `hidden_states[j, t]` is the state that predicts `completion_ids[j, t]`.
        completion_ids (`torch.Tensor`, `(B, T)`):
            Sampled completion token ids.
        completion_mask (`torch.Tensor`, `(B, T)`):
            1 for tokens that count (generated, not padding), 0 elsewhere.
        lm_head_weight (`torch.Tensor`, `(V, d)`):
            The LM head (output embedding) weight.
        advantages (`torch.Tensor`, `(B,)`):
            Per-completion advantages; only their sign and, by default, which are `> 0` matter.
        num_generations (`int`):
            Completions per prompt `G`; rows `[k*G, (k+1)*G)` form group `k`.
        temperature (`float`, defaults to `1.0`):
            Temperature the trainer divides its logits by.
        vocab (`str`, defaults to `"sampled"`):
            `"sampled"` restricts residuals to the token ids that occur in the group's completions (the papers'
            choice, `O(T |V'| d)`); `"full"` is exact over the whole vocabulary, streamed in blocks.
        include_self (`bool`, defaults to `True`):
            Whether a positive completion's own tokens count in the influence on its tokens (`i = j` in the sum).
        token_logprobs (`torch.Tensor`, `(B, T)`, *optional*):
            The trainer's log-prob of each sampled token. When given, the full-vocabulary normaliser is recovered
            from it (`LSE = z_y - log pi(y)`) instead of streaming the whole vocabulary.
        positive_mask (`torch.Tensor`, `(B,)`, *optional*):
            Which completions form the positive set `P`; defaults to `advantages > 0`.
        lm_head_bias (`torch.Tensor`, `(V,)`, *optional*):
            The LM head bias, if the model has one.
        logit_scale (`float`, defaults to `1.0`):
            Multiplier applied to the logits before soft-capping (e.g. Cohere's `logit_scale`).
        logit_softcap (`float`, *optional*):
            Final logit soft-capping (e.g. Gemma 2's `final_logit_softcapping`).
        block_elements (`int`, defaults to `2**24`):
            Largest number of (token x vocabulary) values materialised at once.

    Returns:
        `torch.Tensor` of shape `(B, T)`: THR per token, float32 (float64 when `hidden_states` is float64). It is
        0 on masked tokens, on rows with a zero advantage, and on groups without a positive completion or without
        a non-zero advantage.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must have shape (B, T, d), got {tuple(hidden_states.shape)}.")
    batch_size, length, hidden_size = hidden_states.shape
    _check_group_layout("hidden_states", batch_size, num_generations)
    _check_shape("completion_ids", completion_ids, (batch_size, length))
    _check_shape("completion_mask", completion_mask, (batch_size, length))
    _check_shape("advantages", advantages, (batch_size,))
    if lm_head_weight.dim() != 2 or lm_head_weight.size(1) != hidden_size:
        raise ValueError(
            f"lm_head_weight must have shape (V, {hidden_size}) to match hidden_states, got "
            f"{tuple(lm_head_weight.shape)}. Under ZeRO-3/FSDP gather the LM head before calling compute_thr."
        )
    if token_logprobs is not None:
        _check_shape("token_logprobs", token_logprobs, (batch_size, length))
    if positive_mask is not None:
        _check_shape("positive_mask", positive_mask, (batch_size,))
    if lm_head_bias is not None:
        _check_shape("lm_head_bias", lm_head_bias, (lm_head_weight.size(0),))
    if vocab not in VOCAB_MODES:
        raise ValueError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}.")

    dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    logit_kwargs = {"temperature": temperature, "logit_scale": logit_scale, "logit_softcap": logit_softcap}
    mask = completion_mask.bool()
    lengths = mask.sum(dim=1)
    positive = positive_rows(advantages, completion_mask, positive_mask)
    active = active_groups(advantages, completion_mask, num_generations, positive_mask)
    thr = torch.zeros(batch_size, length, dtype=dtype, device=hidden_states.device)

    for group in torch.nonzero(active).flatten().tolist():
        rows = slice(group * num_generations, (group + 1) * num_generations)
        group_mask = mask[rows]
        hidden = hidden_states[rows][group_mask].to(dtype)  # (N, d), row-major
        targets = completion_ids[rows][group_mask]  # (N,)
        logprobs = None if token_logprobs is None else token_logprobs[rows][group_mask]
        lse = _log_normaliser(
            hidden, targets, lm_head_weight, lm_head_bias, logprobs, logit_kwargs, block_elements
        )

        group_lengths = lengths[rows].tolist()
        ends = torch.tensor(group_lengths).cumsum(0).tolist()
        row_bounds = [(end - n, end) for end, n in zip(ends, group_lengths)]
        group_positive = positive[rows].tolist()
        coef = [1.0 / n if is_pos else 0.0 for n, is_pos in zip(group_lengths, group_positive)]
        signs = advantages[rows].sign()
        compute_rows = [bool(s != 0) and n > 0 for s, n in zip(signs.tolist(), group_lengths)]

        if vocab == "sampled":
            vocab_ids = torch.unique(targets)  # sorted
            vocab_block_rows = vocab_ids.numel()
        else:
            vocab_ids = torch.arange(lm_head_weight.size(0), device=targets.device)
            vocab_block_rows = max(1, block_elements // max(1, max(group_lengths)))
        tokens = _GroupTokens(hidden, targets, lse, row_bounds, logit_kwargs)
        blocks = _vocab_blocks(vocab_ids, lm_head_weight, lm_head_bias, vocab_block_rows, dtype)
        values = _group_thr(tokens, coef, compute_rows, blocks, include_self, block_elements)
        token_signs = signs.to(dtype).repeat_interleave(lengths[rows])
        thr[rows][group_mask] = token_signs * values
    return thr


def group_thresholds(
    thr: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    *,
    threshold: str = "anchor",
    beta: float = 1.0,
    quantile: float | None = None,
    tau: float | torch.Tensor | None = None,
    quantile_scope: str = "group",
    positive_mask: torch.Tensor | None = None,
    gather_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dominance threshold `tau` of each group, shape `(B // G,)`; NaN for groups THR does not apply to.

    A token is dominant when `|THR| > tau`. Modes:

    - `"anchor"`: `beta * min_{i in P} mean_k THR_{i,k}` (the NTHR anchor with THR's normalisation);
    - `"quantile"`: keep the top `quantile` fraction of tokens by `|THR|`, per group or over the whole batch
      (`quantile_scope`); `tau` is the largest `|THR|` left out (`-inf` when every token is kept), so ties at the
      boundary are dropped together. With `quantile_scope="batch"`, `gather_values` maps this process's pooled
      `|THR|` values `(n,)` to those of every process (the trainer passes an all-gather), so the batch is global;
    - `"absolute"`: a fixed `tau` (a float, or one value per group);
    - `"none"`: `-inf`, every token is dominant.
    """
    if threshold not in THRESHOLD_MODES:
        raise ValueError(f"threshold must be one of {THRESHOLD_MODES}, got {threshold!r}.")
    if quantile_scope not in QUANTILE_SCOPES:
        raise ValueError(f"quantile_scope must be one of {QUANTILE_SCOPES}, got {quantile_scope!r}.")
    _check_group_layout("thr", thr.size(0), num_generations)
    _check_shape("advantages", advantages, (thr.size(0),))
    _check_shape("completion_mask", completion_mask, tuple(thr.shape))
    if positive_mask is not None:
        _check_shape("positive_mask", positive_mask, (thr.size(0),))
    num_groups = thr.size(0) // num_generations
    mask = completion_mask.bool()
    active = active_groups(advantages, completion_mask, num_generations, positive_mask)
    taus = torch.full((num_groups,), math.nan, dtype=torch.float32, device=thr.device)

    if threshold == "none":
        taus[active] = -math.inf
    elif threshold == "absolute":
        if tau is None:
            raise ValueError('threshold="absolute" needs tau (a float or a (num_groups,) tensor).')
        tau = torch.as_tensor(tau, dtype=torch.float32, device=thr.device)
        if tau.numel() not in (1, num_groups):
            raise ValueError(f"tau must be a float or have one value per group ({num_groups}), got {tau.numel()}.")
        tau = tau.reshape(-1).expand(num_groups)
        taus[active] = tau[active]
    elif threshold == "anchor":
        row_means = (thr * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        positive = positive_rows(advantages, completion_mask, positive_mask)
        anchored = row_means.float().masked_fill(~positive, math.inf).view(num_groups, num_generations).amin(dim=1)
        taus[active] = beta * anchored[active]
    else:
        if quantile is None or not 0 < quantile <= 1:
            raise ValueError(f'threshold="quantile" needs quantile in (0, 1], got {quantile!r}.')
        magnitudes = thr.abs().float().view(num_groups, num_generations, -1)
        group_mask = mask.view(num_groups, num_generations, -1)
        if quantile_scope == "batch":
            pooled = magnitudes[active][group_mask[active]]
            if gather_values is not None:
                pooled = gather_values(pooled)
            if pooled.numel() > 0:
                taus[active] = top_fraction_threshold(pooled, quantile)
        else:
            for group in torch.nonzero(active).flatten().tolist():
                taus[group] = top_fraction_threshold(magnitudes[group][group_mask[group]], quantile)
    return taus


def top_fraction_threshold(values: torch.Tensor, fraction: float) -> float:
    """Largest value outside the top `ceil(fraction * n)` of the 1-D `values` (`-inf` if all are kept).

    `values > threshold` then keeps at most that many values.
    """
    count = values.numel()
    keep = math.ceil(fraction * count)
    if keep >= count:
        return -math.inf
    return torch.kthvalue(values.float(), count - keep).values.item()


def thr_weights(
    thr: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    *,
    strategy: str,
    p: float = 0.1,
    taus: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token weights on the advantages, shape `(B, T)` float32: `A'_{j,t} = weight_{j,t} * A_j`.

    `taus` `(B // G,)` are the groups' dominance thresholds from [`group_thresholds`] (needed by every strategy
    but `"none"`). With `dominant = |THR| > tau`:

    - `"positive-amplify"` (exploitation): `dominant * (1 + |p| sign(THR))`;
    - `"negative-amplify"` (exploration): `dominant * (1 - |p| sign(THR))`;
    - `"amplify"`: `dominant * (1 + p sign(THR))` with `p` taken with its sign (for a schedule that crosses 0);
    - `"dominant-only"`: `dominant` (p = 0);
    - `"nthr"` (arXiv 2505.18830): tokens of negative-advantage completions with `THR < -tau` get
      `eta = 2 |0.5 - s|`, `s` the group's success rate (fraction of positive completions); all others 1;
    - `"none"`: 1.

    Weights are 0 on masked tokens, 1 on tokens of groups THR does not apply to (see [`active_groups`]), and
    `>= 0` everywhere because `|p| < 1`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not abs(p) < 1:
        raise ValueError(f"|p| must be < 1 so that weights stay non-negative, got p={p}.")
    _check_group_layout("thr", thr.size(0), num_generations)
    _check_shape("advantages", advantages, (thr.size(0),))
    _check_shape("completion_mask", completion_mask, tuple(thr.shape))
    if positive_mask is not None:
        _check_shape("positive_mask", positive_mask, (thr.size(0),))
    ones = completion_mask.float()
    if strategy == "none":
        return ones
    if taus is None:
        raise ValueError(f"strategy={strategy!r} needs taus, the groups' thresholds from group_thresholds().")
    _check_shape("taus", taus, (thr.size(0) // num_generations,))

    row_tau = taus.repeat_interleave(num_generations).unsqueeze(1)  # (B, 1)
    thr = thr.float()
    sign = thr.sign()
    dominant = (thr.abs() > row_tau).float() * ones

    if strategy == "nthr":
        positive = positive_rows(advantages, completion_mask, positive_mask).float()
        success = positive.view(-1, num_generations).mean(dim=1)
        eta = (2 * (0.5 - success).abs()).repeat_interleave(num_generations).unsqueeze(1)
        penalised = (advantages < 0).unsqueeze(1) & (thr < -row_tau) & completion_mask.bool()
        weights = torch.where(penalised, eta, ones)
    elif strategy == "dominant-only":
        weights = dominant
    else:
        signed_p = {"positive-amplify": abs(p), "negative-amplify": -abs(p), "amplify": p}[strategy]
        weights = dominant * (1 + signed_p * sign)

    return torch.where(active_tokens(advantages, completion_mask, num_generations, positive_mask), weights, ones)


def scheduled_p(start: float, end: float | None, schedule: str, progress: float) -> float:
    """Value of `p` at `progress` in [0, 1] of training, from `start` to `end`.

    `"constant"` keeps `start`; `"linear"` interpolates; `"cosine"` follows half a cosine from `start` to `end`.
    """
    if schedule not in P_SCHEDULES:
        raise ValueError(f"schedule must be one of {P_SCHEDULES}, got {schedule!r}.")
    if schedule == "constant" or end is None:
        return start
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
