"""`compute_thr` against a slow, obvious float64 double sum over token pairs (docs/theory.md §1-3)."""

import math

import pytest
import torch
from kernel_reference import make_batch, reference_thr, true_logprobs

from trl_thr.thr import compute_thr


@pytest.mark.parametrize("vocab", ["sampled", "full"])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize(
    "seed,batch,length,hidden_size,vocab_size,num_generations,temperature",
    [(0, 4, 5, 3, 11, 2, 1.0), (1, 6, 4, 5, 9, 3, 0.7), (2, 8, 3, 4, 13, 4, 1.3)],
)
def test_matches_reference(seed, batch, length, hidden_size, vocab_size, num_generations, temperature, vocab,
                           include_self):
    hidden, ids, mask, weight, advantages = make_batch(seed, batch, length, hidden_size, vocab_size, num_generations)
    expected = reference_thr(hidden, ids, mask, weight, advantages, num_generations, temperature=temperature,
                             vocab=vocab, include_self=include_self)
    assert expected.abs().sum() > 0, "degenerate case: no active group"
    for logprobs in (None, true_logprobs(hidden, ids, weight, temperature)):
        got = compute_thr(hidden, ids, mask, weight, advantages, num_generations, temperature=temperature,
                          vocab=vocab, include_self=include_self, token_logprobs=logprobs)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_float32_inputs_give_float32_close_to_reference():
    hidden, ids, mask, weight, advantages = make_batch(3, 6, 6, 8, 17, 3)
    expected = reference_thr(hidden, ids, mask, weight, advantages, 3)
    got = compute_thr(hidden.float(), ids, mask, weight.float(), advantages.float(), 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_bias_scale_and_softcap_match_reference():
    hidden, ids, mask, weight, advantages = make_batch(4, 4, 5, 4, 10, 2)
    bias = torch.randn(10, dtype=torch.float64)
    kwargs = dict(temperature=0.8, logit_scale=2.5, logit_softcap=3.0)
    expected = reference_thr(hidden, ids, mask, weight, advantages, 2, bias=bias, **kwargs)
    for vocab in ("sampled", "full"):
        got = compute_thr(hidden, ids, mask, weight, advantages, 2, lm_head_bias=bias, vocab=vocab, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def hard_batch():
    """Six groups of three that cover every case at once: an ordinary group, equal advantages, no positive
    completion, a fully padded row and a row with masked tokens in its middle (tool output), a zero-advantage row;
    the last position is padding everywhere."""
    hidden, ids, _, weight, _ = make_batch(13, 18, 7, 4, 13, 3, ragged=False)
    mask = torch.ones(18, 7, dtype=torch.long)
    mask[:, -1] = 0
    mask[[1, 4, 13], 3:] = 0  # ragged lengths
    mask[10] = 0  # a positive completion without tokens, in the middle of the batch: not in P
    mask[11, 1:3] = 0  # padding inside a row
    mask[15, 2:5] = 0
    advantages = torch.tensor([1.2, -0.6, -0.6,  0.4, 0.4, 0.4,  -0.5, -1.0, -0.2,
                               0.8, 0.5, -1.3,  1.0, 0.0, -1.0,  0.3, -0.9, 0.6], dtype=torch.float64)
    bias = torch.randn(13, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    return hidden, ids, mask, weight, advantages, bias


@pytest.mark.parametrize("vocab", ["sampled", "full"])
@pytest.mark.parametrize("include_self", [True, False])
def test_transform_ragged_masks_and_inactive_groups_match_reference(vocab, include_self):
    hidden, ids, mask, weight, advantages, bias = hard_batch()
    transform = dict(temperature=0.7, logit_scale=1.7, logit_softcap=2.5)
    expected = reference_thr(hidden, ids, mask, weight, advantages, 3, vocab=vocab, include_self=include_self,
                             bias=bias, **transform)
    logprobs = true_logprobs(hidden, ids, weight, bias=bias, **transform)
    for token_logprobs in (None, logprobs):
        got = compute_thr(hidden, ids, mask, weight, advantages, 3, vocab=vocab, include_self=include_self,
                          token_logprobs=token_logprobs, lm_head_bias=bias, **transform)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # The cases the batch is built for really occur: values where THR applies, exact zeros everywhere else.
    assert (got.view(6, 3, 7)[[0, 3, 4, 5]].abs().sum(dim=(1, 2)) > 0).all()
    assert (got.view(6, 3, 7)[[1, 2]] == 0).all() and (got[10] == 0).all() and (got[13] == 0).all()
    assert (got[mask == 0] == 0).all()


def test_garbage_at_padding_does_not_leak():
    """Whatever a caller leaves at uncounted positions (NaN hidden states, log-probs or ids) changes nothing."""
    hidden, ids, mask, weight, advantages, bias = hard_batch()
    logprobs = true_logprobs(hidden, ids, weight, bias=bias)
    expected = compute_thr(hidden, ids, mask, weight, advantages, 3, lm_head_bias=bias, token_logprobs=logprobs)
    padding = mask == 0
    hidden, logprobs, ids = hidden.clone(), logprobs.clone(), ids.clone()
    hidden[padding] = math.nan
    logprobs[padding] = math.nan
    ids[padding] = 12  # an id no counted token uses
    for vocab in ("sampled", "full"):
        got = compute_thr(hidden, ids, mask, weight, advantages, 3, lm_head_bias=bias, token_logprobs=logprobs,
                          vocab=vocab)
        if vocab == "sampled":
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(got).all() and (got[padding] == 0).all()


def test_the_logit_transform_changes_thr():
    """Guards the test above: temperature, scale and soft-cap each move THR by far more than its tolerance."""
    hidden, ids, mask, weight, advantages, bias = hard_batch()
    base = compute_thr(hidden, ids, mask, weight, advantages, 3, lm_head_bias=bias)
    for transform in (dict(temperature=0.7), dict(logit_scale=1.7), dict(logit_softcap=2.5)):
        moved = compute_thr(hidden, ids, mask, weight, advantages, 3, lm_head_bias=bias, **transform)
        assert (moved - base).abs().max() > 1e-3 * base.abs().max()


def test_small_blocks_give_the_same_values():
    """Chunking over tokens and vocabulary is an implementation detail: results must not depend on it."""
    hidden, ids, mask, weight, advantages = make_batch(5, 6, 7, 4, 23, 3)
    for vocab in ("sampled", "full"):
        whole = compute_thr(hidden, ids, mask, weight, advantages, 3, vocab=vocab)
        for block in (1, 3, 16):
            tiny = compute_thr(hidden, ids, mask, weight, advantages, 3, vocab=vocab, block_elements=block)
            torch.testing.assert_close(tiny, whole, rtol=1e-10, atol=1e-12)


def test_groups_with_equal_rewards_or_no_positive_are_zero():
    hidden, ids, mask, weight, _ = make_batch(6, 6, 4, 3, 9, 3, ragged=False)
    advantages = torch.tensor([0.0, 0.0, 0.0, -1.0, -1.0, -1.0], dtype=torch.float64)  # equal / all negative
    assert compute_thr(hidden, ids, mask, weight, advantages, 3).abs().sum() == 0


def test_equal_rewards_with_a_rounding_residue_are_skipped():
    """TRL's group mean of equal rewards can be off by one ulp; normalised, that is a small non-zero advantage."""
    hidden, ids, mask, weight, _ = make_batch(6, 8, 4, 3, 9, 8, ragged=False)
    rewards = torch.full((8,), 0.3)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # TRL's formula, float32
    assert (advantages != 0).all() and (advantages == advantages[0]).all()
    assert compute_thr(hidden, ids, mask, weight, advantages.double(), 8).abs().sum() == 0


def test_single_positive_completion():
    hidden, ids, mask, weight, _ = make_batch(7, 4, 5, 3, 9, 4)
    advantages = torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64)
    for include_self in (True, False):
        expected = reference_thr(hidden, ids, mask, weight, advantages, 4, include_self=include_self)
        got = compute_thr(hidden, ids, mask, weight, advantages, 4, include_self=include_self)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # Without itself, the lone positive completion has no influence to receive.
    alone = compute_thr(hidden, ids, mask, weight, advantages, 4, include_self=False)
    assert alone[0].abs().sum() == 0 and alone[1:].abs().sum() > 0


def test_zero_length_completions():
    hidden, ids, mask, weight, _ = make_batch(8, 4, 5, 3, 9, 4, ragged=False)
    mask[0] = 0  # a "positive" completion with no token cannot be in P
    mask[2] = 0
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    expected = reference_thr(hidden, ids, mask, weight, advantages, 4)
    got = compute_thr(hidden, ids, mask, weight, advantages, 4)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert got[0].abs().sum() == 0 and got[2].abs().sum() == 0
    mask[1] = 0  # now the only positives are empty: the group is inactive
    assert compute_thr(hidden, ids, mask, weight, advantages, 4).abs().sum() == 0


def test_positive_mask_overrides_advantage_sign():
    hidden, ids, mask, weight, advantages = make_batch(9, 6, 4, 3, 9, 3)
    positive = torch.tensor([True, False, False, False, True, True])
    expected = reference_thr(hidden, ids, mask, weight, advantages, 3, positive=positive)
    got = compute_thr(hidden, ids, mask, weight, advantages, 3, positive_mask=positive)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_padding_and_zero_advantage_rows_are_zero():
    hidden, ids, mask, weight, advantages = make_batch(10, 6, 6, 3, 9, 3)
    advantages[1] = 0.0
    got = compute_thr(hidden, ids, mask, weight, advantages, 3)
    assert (got[mask == 0] == 0).all()
    assert (got[1] == 0).all()


def block_shapes(monkeypatch):
    """Record `(groups, tokens per group, columns)` of every logits block the kernel builds (groups = 1 for a
    block of tokens that is not split by group)."""
    import trl_thr.thr as thr_module

    shapes, real = [], thr_module._block_logits

    def recording(hidden, weight, bias, logit_kwargs):
        out = real(hidden, weight, bias, logit_kwargs)
        shapes.append((1,) * (3 - out.dim()) + tuple(out.shape))
        return out

    monkeypatch.setattr(thr_module, "_block_logits", recording)
    return shapes


def test_sampled_mode_with_token_logprobs_touches_only_the_groups_ids(monkeypatch):
    """Never B x T x V: with the trainer's log-probs, sampled mode projects onto the group's ids only."""
    hidden, ids, mask, weight, _ = make_batch(11, 4, 5, 3, 400, 2)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    shapes = block_shapes(monkeypatch)
    compute_thr(hidden, ids, mask, weight, advantages, 2, token_logprobs=true_logprobs(hidden, ids, weight))
    distinct = max(int(ids[g * 2 : g * 2 + 2][mask[g * 2 : g * 2 + 2].bool()].unique().numel()) for g in range(2))
    assert shapes and max(columns for _, _, columns in shapes) <= distinct
    assert max(tokens for _, tokens, _ in shapes) <= 2 * 5  # each group's slice holds that group's tokens only


def test_full_mode_respects_the_block_budget(monkeypatch):
    hidden, ids, mask, weight, _ = make_batch(12, 4, 5, 3, 400, 2)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    shapes = block_shapes(monkeypatch)
    compute_thr(hidden, ids, mask, weight, advantages, 2, vocab="full", block_elements=60)
    assert shapes and max(groups * tokens * columns for groups, tokens, columns in shapes) <= 60
    assert sum(columns for _, _, columns in shapes) > 400  # the whole vocabulary was visited, block by block


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_generations=3), "multiple of num_generations"),
        (dict(vocab="top-k"), "vocab must be one of"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(lm_head_weight=torch.zeros(5, 2)), "lm_head_weight must have shape"),
        (dict(advantages=torch.zeros(3)), "advantages must have shape"),
        (dict(token_logprobs=torch.zeros(4, 2)), "token_logprobs must have shape"),
        (dict(hidden_states=torch.zeros(4, 5)), "hidden_states must have shape"),
    ],
)
def test_bad_input_errors(kwargs, message):
    args = dict(hidden_states=torch.zeros(4, 5, 3), completion_ids=torch.zeros(4, 5, dtype=torch.long),
                completion_mask=torch.ones(4, 5), lm_head_weight=torch.zeros(7, 3), advantages=torch.zeros(4),
                num_generations=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_thr(**args)
