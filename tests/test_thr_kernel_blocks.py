"""How `compute_thr` spends its memory budget, and the input dtypes it accepts.

The values do not depend on the blocking (`test_small_blocks_give_the_same_values`), so these tests watch the
blocks themselves: every residual block `(groups, G, n, C)` and the influence `M` of a pass `(groups, G or 1, C, d)`
stay within `block_elements` (above the floor of one position per row and one column), the budget is used rather
than wasted, groups are batched, and a residual is computed twice only when its tokens come in several chunks.
"""

import math
from collections import Counter

import pytest
import torch
from kernel_reference import make_batch, reference_thr, true_logprobs

import trl_thr.thr as thr_module
from trl_thr.thr import compute_thr, transform_logits


def watch_residuals(monkeypatch):
    """Record `(pass, vocabulary block start, first position, residual shape)` of every residual computed."""
    calls = []
    residual = thr_module._GroupTokens.residual

    def recording(self, block, positions):
        out = residual(self, block, positions)
        calls.append((self.hidden.data_ptr(), block.start, positions.start, tuple(out.shape)))
        return out

    monkeypatch.setattr(thr_module._GroupTokens, "residual", recording)
    return calls


def active_batch(num_groups=3, num_generations=2, length=6, hidden_size=8, vocab_size=40, seed=0):
    hidden, ids, mask, weight, _ = make_batch(seed, num_groups * num_generations, length, hidden_size, vocab_size,
                                              num_generations, ragged=False)
    advantages = torch.tensor([1.0, -1.0] * num_groups, dtype=torch.float64)
    if num_generations != 2:
        advantages = torch.tensor(([1.0] + [-1.0] * (num_generations - 1)) * num_groups, dtype=torch.float64)
    return hidden, ids, mask, weight, advantages


def watch_logit_blocks(monkeypatch):
    """Record the number of values of every logits block the kernel computes (residuals and the normaliser)."""
    sizes = []
    block_logits = thr_module._block_logits

    def recording(*args):
        out = block_logits(*args)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(thr_module, "_block_logits", recording)
    return sizes


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("vocab", ["sampled", "full"])
@pytest.mark.parametrize("hidden_size", [8, 2])
@pytest.mark.parametrize("block_elements", [1, 3, 8, 30, 100, 333, 1000, 10**6])
def test_residual_and_influence_blocks_stay_within_the_budget(block_elements, hidden_size, vocab, include_self,
                                                              monkeypatch):
    num_generations = 2
    hidden, ids, mask, weight, advantages = active_batch(num_generations=num_generations, hidden_size=hidden_size)
    calls, logit_blocks = watch_residuals(monkeypatch), watch_logit_blocks(monkeypatch)
    # without the trainer's log-probs the normaliser streams the vocabulary in blocks too
    for logprobs in (true_logprobs(hidden, ids, weight), None):
        compute_thr(hidden, ids, mask, weight, advantages, num_generations, vocab=vocab, include_self=include_self,
                    token_logprobs=logprobs, block_elements=block_elements)
    assert calls and logit_blocks
    assert max(logit_blocks) <= max(block_elements, num_generations)
    # M holds one matrix per group (include_self) or, per row, its share and what it receives (2 x G matrices)
    matrices = 1 if include_self else 2 * num_generations
    for _, _, _, (groups, rows, positions, columns) in calls:
        assert groups * rows * positions * columns <= max(block_elements, num_generations)
        assert groups * matrices * columns * hidden_size <= max(block_elements, matrices * hidden_size)


@pytest.mark.parametrize("include_self", [True, False])
def test_the_influence_block_uses_the_whole_budget(include_self, monkeypatch):
    """Where the influence `M` is what limits a block, it takes the budget: `k` columns of `d` values per
    matrix for a budget of `k` such columns, not a fraction of it."""
    num_generations, hidden_size, columns = 2, 8, 5
    matrices = 1 if include_self else 2 * num_generations
    hidden, ids, mask, weight, advantages = active_batch(num_generations=num_generations, hidden_size=hidden_size,
                                                         length=3)
    block_elements = matrices * columns * hidden_size
    calls = watch_residuals(monkeypatch)
    compute_thr(hidden, ids, mask, weight, advantages, num_generations, vocab="full", include_self=include_self,
                block_elements=block_elements)
    assert max(groups * matrices * width * hidden_size for _, _, _, (groups, _, _, width) in calls) == block_elements


def test_groups_are_batched_when_they_fit(monkeypatch):
    """A budget that holds every group's residuals and influence gives one pass, one block, one chunk."""
    hidden, ids, mask, weight, advantages = active_batch(num_groups=4)
    calls = watch_residuals(monkeypatch)
    compute_thr(hidden, ids, mask, weight, advantages, 2, block_elements=10**6)
    assert len(calls) == 1 and calls[0][3][0] == 4


@pytest.mark.parametrize("block_elements,chunked", [(10**6, False), (4, True), (10, True)])
def test_a_residual_is_recomputed_only_when_its_tokens_come_in_chunks(block_elements, chunked, monkeypatch):
    """Pass 1 (building M) and pass 2 (projecting on it) need the same residuals: kept when one chunk holds all
    positions, recomputed (to stay within the budget) when there are several."""
    hidden, ids, mask, weight, advantages = active_batch(length=6)
    calls = watch_residuals(monkeypatch)
    compute_thr(hidden, ids, mask, weight, advantages, 2, block_elements=block_elements)
    chunks = {start for _, _, start, _ in calls}
    assert (len(chunks) > 1) == chunked
    times = Counter((pass_, block, start) for pass_, block, start, _ in calls)
    assert set(times.values()) == ({2} if chunked else {1})


def test_half_precision_inputs_are_computed_in_float32():
    """bf16 states and head (a bf16 training run) are read as stored and computed in float32, as are a float64
    log-prob and a bf16 bias; the result is float32 and as close to the float64 sum as float32 allows."""
    hidden, ids, mask, weight, advantages = make_batch(3, 6, 5, 4, 11, 3)
    bias = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    exact_logprobs = true_logprobs(hidden.double(), ids, weight.double(), 0.7, bias=bias.double())
    for vocab in ("sampled", "full"):
        expected = reference_thr(hidden.double(), ids, mask, weight.double(), advantages, 3, temperature=0.7,
                                 bias=bias.double(), vocab=vocab)
        assert expected.abs().sum() > 0
        for logprobs in (None, exact_logprobs):
            got = compute_thr(hidden, ids, mask, weight, advantages.float(), 3, temperature=0.7, vocab=vocab,
                              token_logprobs=logprobs, lm_head_bias=bias)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-6)


def test_the_logit_transform_defaults_to_the_identity():
    logits = torch.tensor([[-3.0, 0.5, 2.0]])
    torch.testing.assert_close(transform_logits(logits), logits)


def test_one_completion_per_prompt_is_a_valid_layout():
    """With `num_generations=1` no group has two different advantages, so THR is 0 everywhere."""
    hidden, ids, mask, weight, advantages = make_batch(4, 3, 4, 3, 9, 1)
    assert torch.equal(compute_thr(hidden, ids, mask, weight, advantages.sign(), 1), torch.zeros(3, 4).double())


def test_group_layout_errors_say_what_to_change():
    args = dict(hidden_states=torch.zeros(4, 5, 3), completion_ids=torch.zeros(4, 5, dtype=torch.long),
                completion_mask=torch.ones(4, 5), lm_head_weight=torch.zeros(7, 3), advantages=torch.zeros(4))
    with pytest.raises(ValueError, match=r"^num_generations must be >= 1, got 0\.$"):
        compute_thr(**args, num_generations=0)
    with pytest.raises(ValueError, match=r"^hidden_states has 4 rows, which is not a multiple of num_generations=3: "
                                         r"THR needs whole groups of consecutive rows\.$"):
        compute_thr(**args, num_generations=3)
    assert math.isfinite(compute_thr(**args, num_generations=4).sum().item())
