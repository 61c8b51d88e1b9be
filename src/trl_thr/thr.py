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
from dataclasses import dataclass, replace

import torch

STRATEGIES = ("positive-amplify", "negative-amplify", "amplify", "dominant-only", "nthr", "none")
THRESHOLD_MODES = ("anchor", "quantile", "absolute", "none")
QUANTILE_SCOPES = ("group", "batch")
VOCAB_MODES = ("sampled", "full")
P_SCHEDULES = ("constant", "linear", "cosine")
# The strategies whose weights read p: `positive-amplify` takes |p|, `negative-amplify` -|p|, `amplify` p as given.
STRATEGIES_USING_P = ("positive-amplify", "negative-amplify", "amplify")

# Largest block (tokens x vocabulary, or influence rows x d) the kernel holds at once: 2**24 float32 values are 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 2**24


def transform_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Apply the logit transform TRL's log-probs use: scale, then soft-cap, then divide by the temperature."""
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


def dominant_tokens(
    thr: torch.Tensor, taus: torch.Tensor, active_token_mask: torch.Tensor, num_generations: int
) -> torch.Tensor:
    """Dominant tokens, shape `(B, T)` bool: tokens of `active_token_mask` (see [`active_tokens`]) whose `|THR|`
    exceeds their group's threshold in `taus` `(B // G,)` (from [`group_thresholds`])."""
    row_tau = taus.repeat_interleave(num_generations).unsqueeze(1)  # (B, 1)
    return active_token_mask & (thr.abs() > row_tau)


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


def _block_logits(hidden, weight, bias, logit_kwargs) -> torch.Tensor:
    """Transformed logits of `hidden` `(..., n, d)` on a block of `C` vocabulary rows, shape `(..., n, C)`.

    `weight` is `(C, d)` (shared by every group) or `(..., C, d)` (one block per group); `bias` `(C,)` or `(..., C)`.
    """
    logits = hidden @ weight.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.unsqueeze(-2)
    return transform_logits(logits, **logit_kwargs)


def _log_normaliser(
    hidden, targets, lm_head_weight, lm_head_bias, token_logprobs, logit_kwargs, block_elements
) -> torch.Tensor:
    """log-sum-exp of the transformed logits over the full vocabulary, shape `(N,)`.

    With the trainer's log-prob of each sampled token this costs one dot product per token: `LSE = z_y - log pi(y)`.
    Without it, the full vocabulary is streamed in `(tokens x vocabulary)` blocks of at most `block_elements`.
    """
    dtype = hidden.dtype
    if token_logprobs is not None:
        target_weight = lm_head_weight[targets].to(dtype)
        target_logit = (hidden * target_weight).sum(-1)
        if lm_head_bias is not None:
            target_logit = target_logit + lm_head_bias[targets].to(dtype)
        return transform_logits(target_logit, **logit_kwargs) - token_logprobs.to(dtype)
    num_tokens, vocab_size = hidden.size(0), lm_head_weight.size(0)
    token_rows = min(num_tokens, block_elements)
    vocab_rows = max(1, block_elements // token_rows)
    lse = hidden.new_full((num_tokens,), -math.inf)
    for start in range(0, num_tokens, token_rows):
        part = slice(start, start + token_rows)
        for column in range(0, vocab_size, vocab_rows):
            columns = slice(column, column + vocab_rows)
            bias = None if lm_head_bias is None else lm_head_bias[columns].to(dtype)
            logits = _block_logits(hidden[part], lm_head_weight[columns].to(dtype), bias, logit_kwargs)
            lse[part] = torch.logaddexp(lse[part], torch.logsumexp(logits, dim=-1))
    return lse


@dataclass
class _GroupTokens:
    """The groups THR applies to, laid out as `(A, G, L)`: `A` groups of `G` rows, each row cut at `L`, the last
    counted position of any of them. Positions that do not count (padding, masked tool output) keep their place so
    that rows stay rectangular. Their hidden state is 0, so they neither add to `M` (a sum of `g h^T`) nor receive
    anything (`M h = 0`), and their `lse` is `+inf`, so that whatever the caller left there cannot become a NaN.

    The vocabulary `V'` is either the full one (`vocab_ids is None`, column `c` is token id `c`) or each group's own
    sampled ids, sorted and padded to the largest `|V'|` of the batch: `vocab_ids` `(A, V'_max)`, with
    `vocab_valid` marking the real columns.
    """

    hidden: torch.Tensor  # (A, G, L, d)
    lse: torch.Tensor  # (A, G, L), full-vocabulary log-normaliser
    target_column: torch.Tensor  # (A, G, L), column of the sampled token in its group's V'
    coef: torch.Tensor  # (A, G), 1/|y_i| for rows in the positive set P, else 0
    vocab_ids: torch.Tensor | None  # (A, V'_max)
    vocab_valid: torch.Tensor | None  # (A, V'_max)
    vocab_width: int  # V'_max, or V for the full vocabulary
    logit_kwargs: dict

    def groups(self, start: int, end: int) -> _GroupTokens:
        """The same layout restricted to groups `start:end` (views, no copy)."""
        def cut(tensor):
            return None if tensor is None else tensor[start:end]

        return replace(self, hidden=cut(self.hidden), lse=cut(self.lse), target_column=cut(self.target_column),
                       coef=cut(self.coef), vocab_ids=cut(self.vocab_ids), vocab_valid=cut(self.vocab_valid))

    def residual(self, block: _VocabBlock, positions: slice) -> torch.Tensor:
        """`g = e_y - pi` on the block's columns for the tokens at `positions` of every row, shape `(A, G, n, C)`."""
        groups, rows, _, hidden_size = self.hidden.shape
        hidden = self.hidden[:, :, positions].reshape(groups, -1, hidden_size)  # (A, G*n, d)
        logits = _block_logits(hidden, block.weight, block.bias, self.logit_kwargs)  # (A, G*n, C)
        residual = logits.sub_(self.lse[:, :, positions].reshape(groups, -1, 1)).exp_().neg_()
        columns = torch.arange(block.start, block.start + logits.size(-1), device=logits.device)
        residual += self.target_column[:, :, positions].reshape(groups, -1, 1) == columns  # e_y
        if block.valid is not None:
            residual.masked_fill_(~block.valid[:, None, :], 0)  # a group's V' padded to V'_max
        return residual.view(groups, rows, -1, residual.size(-1))


@dataclass
class _VocabBlock:
    """Columns `start:start + C` of the groups' vocabularies: `weight` `(C, d)` or `(A, C, d)`, `bias` likewise,
    `valid` `(A, C)` for padded sampled vocabularies."""

    start: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    valid: torch.Tensor | None


def _vocab_blocks(
    tokens: _GroupTokens, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None, width: int
) -> Iterator[_VocabBlock]:
    """Yield the blocks of `width` columns covering `tokens.vocab_width`, with the LM head rows cast to float."""
    dtype = tokens.hidden.dtype
    for start in range(0, tokens.vocab_width, width):
        if tokens.vocab_ids is None:
            ids, valid = slice(start, start + width), None
        else:
            ids, valid = tokens.vocab_ids[:, start : start + width], tokens.vocab_valid[:, start : start + width]
        bias = None if lm_head_bias is None else lm_head_bias[ids].to(dtype)
        yield _VocabBlock(start, lm_head_weight[ids].to(dtype), bias, valid)


def _gather_groups(
    hidden_states, completion_ids, mask, lm_head_weight, lm_head_bias, token_logprobs, coef, rows, vocab,
    logit_kwargs, block_elements, dtype,
) -> _GroupTokens:
    """Lay out the rows `rows` `(A*G,)` of the active groups as [`_GroupTokens`], on the device.

    Besides `compute_thr`'s count of active groups, this is the only place the host waits for the device, once
    per batch: `torch.unique` sizes its output, and `L` and `V'_max` size every buffer that follows.
    """
    num_rows = rows.numel()
    num_groups, num_generations = coef.shape
    vocab_size = lm_head_weight.size(0)
    device = hidden_states.device
    counted = mask[rows]  # (A*G, T)
    targets = completion_ids[rows]
    positions = torch.arange(1, counted.size(1) + 1, device=device)
    last_position = (counted * positions).amax()
    if vocab == "sampled":
        # One sorted pass over (group, id) keys gives every group's V' at once; uncounted tokens get a key past
        # every group's range, so they sort last and never enter a V'.
        group_of_row = torch.arange(num_groups, device=device).repeat_interleave(num_generations)[:, None]
        keys = torch.where(counted, group_of_row * vocab_size + targets, num_groups * vocab_size)
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        group_starts = torch.searchsorted(unique_keys, torch.arange(num_groups + 1, device=device) * vocab_size)
        sizes = group_starts.diff()  # |V'| per group, (A,)
        length, vocab_width = torch.stack([last_position, sizes.max()]).tolist()
        key_group = unique_keys // vocab_size  # A for the uncounted key
        key_column = torch.arange(unique_keys.numel(), device=device) - group_starts[key_group]
        # One spare row holds the uncounted key, so the scatter needs no filtering.
        vocab_ids = torch.zeros(num_groups + 1, vocab_width, dtype=torch.long, device=device)
        vocab_ids[key_group, key_column] = unique_keys % vocab_size
        vocab_valid = torch.zeros(num_groups + 1, vocab_width, dtype=torch.bool, device=device)
        vocab_valid[key_group, key_column] = True
        vocab_ids, vocab_valid = vocab_ids[:num_groups], vocab_valid[:num_groups]
        target_column = key_column[inverse]
    else:
        length = last_position.item()
        vocab_width, vocab_ids, vocab_valid = vocab_size, None, None
        target_column = targets

    counted, targets, target_column = counted[:, :length], targets[:, :length], target_column[:, :length]
    hidden = hidden_states[rows, :length].to(dtype).masked_fill_(~counted[..., None], 0)  # (A*G, L, d)
    logprobs = None if token_logprobs is None else token_logprobs[rows, :length].flatten()
    lse = _log_normaliser(hidden.flatten(0, 1), targets.flatten(), lm_head_weight, lm_head_bias, logprobs,
                          logit_kwargs, block_elements).view(num_rows, length)
    shape = (num_groups, num_generations, length)
    return _GroupTokens(
        hidden=hidden.view(*shape, -1),
        lse=lse.masked_fill(~counted, math.inf).view(shape),
        target_column=target_column.view(shape),
        coef=coef,
        vocab_ids=vocab_ids,
        vocab_valid=vocab_valid,
        vocab_width=vocab_width,
        logit_kwargs=logit_kwargs,
    )


def _group_thr(
    tokens: _GroupTokens,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    include_self: bool,
    block_elements: int,
) -> torch.Tensor:
    """Unsigned THR `g^T M h` of every position of `tokens`, shape `(A, G, L)`.

    `g^T M h` is a sum over vocabulary columns, so each block of columns is handled on its own: pass 1 accumulates
    the block's rows of `M`, pass 2 projects every token on them. With `include_self=False` pass 1 keeps each
    row's own share of `M` and each row receives `M` minus its share. Blocks are sized so that a residual block
    `(groups, G, n, C)` and the influence blocks `(groups, G or 1, C, d)` each hold at most `block_elements` values
    (but never less than one position per row and one column); as many groups as fit are batched together.
    """
    num_groups, rows, length, hidden_size = tokens.hidden.shape
    influence_rows = 1 if include_self else 2 * rows  # each row's share, then what each row receives
    positions = min(length, max(1, block_elements // rows))
    width = min(tokens.vocab_width, max(1, block_elements // (rows * positions)),
                max(1, block_elements // (influence_rows * hidden_size)))
    groups_per_pass = max(1, min(num_groups, block_elements // (rows * positions * width),
                                 block_elements // (influence_rows * width * hidden_size)))
    chunks = [slice(start, start + positions) for start in range(0, length, positions)]

    thr = tokens.hidden.new_zeros(num_groups, rows, length)
    for first in range(0, num_groups, groups_per_pass):
        part = tokens.groups(first, first + groups_per_pass)
        groups = part.hidden.size(0)
        # The rows of a group share one M, so a group's tokens form one matmul; to remove each row's own share,
        # the matmuls are per row instead.
        batch = groups if include_self else groups * rows
        weighted = part.hidden * part.coef[:, :, None, None]  # (groups, G, L, d): the 1/|y_i| of M, 0 outside P
        for block in _vocab_blocks(part, lm_head_weight, lm_head_bias, width):
            influence, residuals = None, []
            for chunk in chunks:  # pass 1: M on this block, (batch, C, d)
                residual = part.residual(block, chunk)
                columns = residual.size(-1)
                share = residual.reshape(batch, -1, columns).transpose(1, 2) @ weighted[:, :, chunk].reshape(
                    batch, -1, hidden_size)
                influence = share if influence is None else influence.add_(share)
                residuals.append(residual if len(chunks) == 1 else None)  # recomputed in pass 2 unless one chunk
            if not include_self:
                own = influence.view(groups, rows, columns, hidden_size)
                influence = (own.sum(1, keepdim=True) - own).view(batch, columns, hidden_size)
            for chunk, residual in zip(chunks, residuals):  # pass 2: g^T (M h) on this block
                residual = part.residual(block, chunk) if residual is None else residual
                projected = part.hidden[:, :, chunk].reshape(batch, -1, hidden_size) @ influence.transpose(1, 2)
                thr[first : first + groups, :, chunk] += (residual * projected.view(residual.shape)).sum(-1)
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

    The groups THR applies to are laid out together on the device, `(groups, G, L)` tokens and each group's `V'`
    padded to the largest, and processed in batches of groups. The host waits for the device a fixed number of
    times per batch, to size those buffers, never once per group or row.

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
            Largest block the kernel holds at once, in values: residuals `(tokens x vocabulary columns)` and the
            influence `M` `(groups x vocabulary columns x d)` are processed in blocks of at most this size, as many
            groups at once as fit (never less than one position per row and one column).

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
    thr = torch.zeros(batch_size, length, dtype=dtype, device=hidden_states.device)
    active = active_groups(advantages, completion_mask, num_generations, positive_mask)
    group_index = torch.nonzero(active).flatten()  # a host sync, once per batch: how many groups to lay out
    if group_index.numel() == 0:
        return thr
    num_groups = group_index.numel()
    rows = (group_index[:, None] * num_generations + torch.arange(num_generations, device=group_index.device))
    rows = rows.flatten()  # (A*G,), the rows of the active groups in order

    mask = completion_mask.bool()
    lengths = mask[rows].sum(dim=1)
    positive = positive_rows(advantages, completion_mask, positive_mask)[rows]
    coef = torch.where(positive, 1.0 / lengths.clamp(min=1).to(dtype), 0.0).view(num_groups, num_generations)
    tokens = _gather_groups(hidden_states, completion_ids, mask, lm_head_weight, lm_head_bias, token_logprobs, coef,
                            rows, vocab, logit_kwargs, block_elements, dtype)
    values = _group_thr(tokens, lm_head_weight, lm_head_bias, include_self, block_elements)  # (A, G, L)
    signs = advantages[rows].sign().to(dtype).view(num_groups, num_generations, 1)
    thr[rows, : values.size(-1)] = (signs * values).flatten(0, 1)
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


def signed_p(strategy: str, p: float) -> float:
    """The `p` that `strategy`'s weights `dominant * (1 + p sign(THR))` use: `|p|` for `"positive-amplify"`
    (exploitation), `-|p|` for `"negative-amplify"` (exploration), `p` with its own sign for `"amplify"`, and 0 for
    the strategies that do not read `p`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "positive-amplify":
        return abs(p)
    if strategy == "negative-amplify":
        return -abs(p)
    return p if strategy == "amplify" else 0.0


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

    thr = thr.float()
    active = active_tokens(advantages, completion_mask, num_generations, positive_mask)
    if strategy == "nthr":
        positive = positive_rows(advantages, completion_mask, positive_mask).float()
        success = positive.view(-1, num_generations).mean(dim=1)
        eta = (2 * (0.5 - success).abs()).repeat_interleave(num_generations).unsqueeze(1)
        row_tau = taus.repeat_interleave(num_generations).unsqueeze(1)  # (B, 1)
        penalised = (advantages < 0).unsqueeze(1) & (thr < -row_tau) & completion_mask.bool()
        weights = torch.where(penalised, eta, ones)
    else:  # dominant-only reads p as 0: the mask alone
        dominant = dominant_tokens(thr, taus, active, num_generations).float()
        weights = dominant * (1 + signed_p(strategy, p) * thr.sign())

    return torch.where(active, weights, ones)


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
