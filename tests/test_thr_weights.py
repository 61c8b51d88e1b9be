"""Strategies, threshold modes and the p schedule on hand-computed cases."""

import math

import pytest
import torch

from trl_thr.thr import active_groups, active_tokens, group_thresholds, positive_rows, scheduled_p, thr_weights

# Group 0 (rows 0-2) is active: one positive completion. Group 1 (rows 3-5) has equal rewards (A = 0).
THR = torch.tensor(
    [
        [0.50, -0.20, 0.00],  # A = +1, last token is padding
        [-0.40, 0.30, 0.10],  # A = -0.5
        [0.05, -0.16, 0.25],  # A = -0.5
        [0.00, 0.00, 0.00],
        [0.00, 0.00, 0.00],
        [0.00, 0.00, 0.00],
    ]
)
ADV = torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
INACTIVE = MASK[3:].float()


def weights(strategy, p=0.1, positive_mask=None, **threshold_kwargs):
    taus = group_thresholds(THR, ADV, MASK, 3, positive_mask=positive_mask, **threshold_kwargs)
    return thr_weights(THR, ADV, MASK, 3, strategy=strategy, p=p, taus=taus, positive_mask=positive_mask)


def check(got, active_rows):
    torch.testing.assert_close(got[:3], torch.tensor(active_rows))
    torch.testing.assert_close(got[3:], INACTIVE)


def test_anchor_threshold_is_beta_times_smallest_positive_mean():
    # The only positive row has mean THR (0.5 - 0.2) / 2 = 0.15.
    taus = group_thresholds(THR, ADV, MASK, 3, threshold="anchor", beta=1.0)
    assert taus[0].item() == pytest.approx(0.15) and math.isnan(taus[1].item())
    assert group_thresholds(THR, ADV, MASK, 3, beta=2.0)[0].item() == pytest.approx(0.30)


def test_equal_advantages_mean_an_inactive_group():
    advantages = torch.full((3,), 2.98e-4)  # equal rewards, rounding residue
    taus = group_thresholds(torch.ones(3, 3), advantages, torch.ones(3, 3), 3)
    got = thr_weights(torch.ones(3, 3), advantages, torch.ones(3, 3), 3, strategy="positive-amplify", taus=taus)
    torch.testing.assert_close(got, torch.ones(3, 3))


def test_positive_amplify():
    check(weights(strategy="positive-amplify", p=0.1),
          [[1.1, 0.9, 0.0], [0.9, 1.1, 0.0], [0.0, 0.9, 1.1]])


def test_negative_amplify_uses_minus_abs_p():
    expected = [[0.9, 1.1, 0.0], [1.1, 0.9, 0.0], [0.0, 1.1, 0.9]]
    check(weights(strategy="negative-amplify", p=0.1), expected)
    check(weights(strategy="negative-amplify", p=-0.1), expected)
    check(weights(strategy="amplify", p=-0.1), expected)


def test_dominant_only():
    check(weights(strategy="dominant-only"), [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])


def test_nthr_scales_negative_completion_tokens_below_minus_tau():
    # success rate 1/3 -> eta = 2 |0.5 - 1/3| = 1/3; penalised: row 1 token 0 (-0.40), row 2 token 1 (-0.16).
    eta = 1 / 3
    check(weights(strategy="nthr"), [[1.0, 1.0, 0.0], [eta, 1.0, 1.0], [1.0, eta, 1.0]])


def test_none_is_all_ones_on_tokens():
    torch.testing.assert_close(weights(strategy="none"), MASK.float())


def test_quantile_per_group_keeps_top_fraction():
    # 8 real tokens; |THR| sorted: .05 .10 .16 .20 .25 .30 .40 .50 -> top 4 are above 0.20.
    taus = group_thresholds(THR, ADV, MASK, 3, threshold="quantile", quantile=0.5)
    assert taus[0].item() == pytest.approx(0.20)
    check(weights(strategy="dominant-only", threshold="quantile", quantile=0.5),
          [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    check(weights(strategy="dominant-only", threshold="quantile", quantile=1.0), MASK[:3].float().tolist())


def test_quantile_batch_scope_pools_active_groups():
    thr = torch.cat([THR[:3], 10 * THR[:3]])
    adv = torch.cat([ADV[:3], ADV[:3]])
    mask = torch.cat([MASK[:3], MASK[:3]])
    per_group = group_thresholds(thr, adv, mask, 3, threshold="quantile", quantile=0.5)
    pooled = group_thresholds(thr, adv, mask, 3, threshold="quantile", quantile=0.5, quantile_scope="batch")
    torch.testing.assert_close(per_group, torch.tensor([0.2, 2.0]))
    torch.testing.assert_close(pooled, torch.tensor([0.5, 0.5]))  # 16 tokens, 8th largest left out is 0.5
    # Another process's 16 larger values join the pool: they are the kept half, so tau is the largest local value.
    gathered = group_thresholds(thr, adv, mask, 3, threshold="quantile", quantile=0.5, quantile_scope="batch",
                                gather_values=lambda local: torch.cat([local, local + 100]))
    torch.testing.assert_close(gathered, torch.tensor([5.0, 5.0]))


def test_weights_need_the_groups_thresholds():
    with pytest.raises(ValueError, match="needs taus"):
        thr_weights(THR, ADV, MASK, 3, strategy="positive-amplify")
    with pytest.raises(ValueError, match="taus must have shape"):
        thr_weights(THR, ADV, MASK, 3, strategy="positive-amplify", taus=torch.zeros(3))


def test_absolute_and_none_thresholds():
    check(weights(strategy="dominant-only", threshold="absolute", tau=0.35),
          [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    check(weights(strategy="positive-amplify", p=0.2, threshold="none"),
          [[1.2, 0.8, 0.0], [0.8, 1.2, 1.2], [1.2, 0.8, 1.2]])
    per_group_tau = torch.tensor([0.35, 100.0])
    check(weights(strategy="dominant-only", threshold="absolute", tau=per_group_tau),
          [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_positive_mask_changes_anchor_and_nthr_success_rate():
    positive = torch.tensor([True, True, False, False, False, False])
    taus = group_thresholds(THR, ADV, MASK, 3, positive_mask=positive)
    # min(0.15, mean(-0.4, 0.3, 0.1) = 0)
    assert taus[0].item() == pytest.approx(0.0, abs=1e-6)
    got = weights(strategy="nthr", positive_mask=positive)
    eta = 2 * abs(0.5 - 2 / 3)
    check(got, [[1.0, 1.0, 0.0], [eta, 1.0, 1.0], [1.0, eta, 1.0]])


@pytest.mark.parametrize("strategy", ["positive-amplify", "negative-amplify", "amplify", "dominant-only", "nthr"])
@pytest.mark.parametrize("threshold", ["anchor", "quantile", "absolute", "none"])
def test_weights_non_negative_and_zero_on_padding(strategy, threshold):
    gen = torch.Generator().manual_seed(0)
    thr = torch.randn(12, 9, generator=gen)
    mask = (torch.rand(12, 9, generator=gen) > 0.3).long()
    thr = thr * mask
    adv = torch.randn(12, generator=gen)
    taus = group_thresholds(thr, adv, mask, 4, threshold=threshold, quantile=0.3, tau=0.5)
    got = thr_weights(thr, adv, mask, 4, strategy=strategy, p=0.99 if strategy != "amplify" else -0.99, taus=taus)
    assert (got >= 0).all() and (got[mask == 0] == 0).all()
    assert got.dtype == torch.float32 and got.shape == thr.shape


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="exploit"), "strategy must be one of"),
        (dict(strategy="positive-amplify", p=1.0), r"\|p\| must be < 1"),
        (dict(strategy="positive-amplify", threshold="median"), "threshold must be one of"),
        (dict(strategy="positive-amplify", threshold="quantile"), "needs quantile in"),
        (dict(strategy="positive-amplify", threshold="quantile", quantile=1.5), "needs quantile in"),
        (dict(strategy="positive-amplify", threshold="absolute"), "needs tau"),
        (dict(strategy="positive-amplify", threshold="quantile", quantile=0.5, quantile_scope="x"), "quantile_scope"),
        (dict(strategy="positive-amplify", quantile_scope="x"), "quantile_scope must be one of"),
        (dict(strategy="dominant-only", threshold="absolute", tau=torch.ones(3)), "one value per group"),
        (dict(strategy="positive-amplify", positive_mask=torch.ones(4, dtype=torch.bool)), "positive_mask must have"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        weights(**kwargs)


def test_p_schedules():
    assert scheduled_p(0.1, None, "constant", 0.7) == 0.1
    assert scheduled_p(-0.1, 0.1, "linear", 0.25) == pytest.approx(-0.05)
    assert scheduled_p(-0.1, 0.1, "cosine", 0.0) == pytest.approx(-0.1)
    assert scheduled_p(-0.1, 0.1, "cosine", 0.5) == pytest.approx(0.0)
    assert scheduled_p(-0.1, 0.1, "cosine", 1.0) == pytest.approx(0.1)
    assert scheduled_p(-0.1, 0.1, "linear", 2.0) == pytest.approx(0.1)  # clamped
    with pytest.raises(ValueError, match="schedule must be one of"):
        scheduled_p(0.1, 0.2, "step", 0.5)


# Boundaries: each case below pins one comparison or one argument the hand-computed batch above does not reach.


def test_positive_rows_need_a_strictly_positive_advantage_and_a_counted_token():
    advantages = torch.tensor([0.0, 1.0, 1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]])
    assert positive_rows(advantages, mask).tolist() == [False, True, False, False]
    # an explicit positive set still needs a counted token
    assert positive_rows(advantages, mask, torch.tensor([1, 0, 1, 1])).tolist() == [True, False, False, True]


def test_active_groups_judge_each_group_on_its_own():
    # group 0 spread without a positive row; group 1 positive without spread; group 2 both
    advantages = torch.tensor([0.0, -1.0, 0.5, 0.5, 1.0, -1.0])
    mask = torch.ones(6, 2)
    assert active_groups(advantages, mask, 2).tolist() == [False, False, True]
    assert active_tokens(advantages, mask, 2).tolist() == [[False] * 2] * 4 + [[True] * 2] * 2


def test_an_explicit_positive_set_decides_which_groups_are_active():
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 2)
    positive = torch.tensor([False, False, True, False])  # group 0 has no positive row under this set
    assert active_groups(advantages, mask, 2, positive).tolist() == [False, True]
    assert active_tokens(advantages, mask, 2, positive)[:2].any().item() is False
    thr = torch.tensor([[0.5, -0.5], [0.5, -0.5], [0.5, -0.5], [0.5, -0.5]])
    for mode in ("none", "anchor"):
        taus = group_thresholds(thr, advantages, mask, 2, threshold=mode, positive_mask=positive)
        assert math.isnan(taus[0].item()) and not math.isnan(taus[1].item())
        got = thr_weights(thr, advantages, mask, 2, strategy="positive-amplify", p=0.5,
                          taus=torch.tensor([-math.inf, -math.inf]), positive_mask=positive)
        torch.testing.assert_close(got[:2], torch.ones(2, 2))  # the inactive group keeps weight 1
        torch.testing.assert_close(got[2:], torch.tensor([[1.5, 0.5], [1.5, 0.5]]))


def test_anchor_mean_of_a_one_token_row_is_its_thr():
    thr = torch.tensor([[0.4, 9.0], [0.1, 0.2]])
    taus = group_thresholds(thr, torch.tensor([1.0, -1.0]), torch.tensor([[1, 0], [1, 1]]), 2)
    assert taus.tolist() == pytest.approx([0.4])


def test_batch_quantile_of_a_single_token_keeps_it():
    thr = torch.tensor([[0.3, 0.0], [0.7, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 0], [0, 0]])  # one counted token in the whole batch
    taus = group_thresholds(thr, advantages, mask, 2, threshold="quantile", quantile=0.5, quantile_scope="batch")
    assert taus.tolist() == [-math.inf]


def test_thresholds_are_float32_whatever_the_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        taus = group_thresholds(THR.double(), ADV.double(), MASK, 3)
    finally:
        torch.set_default_dtype(default)
    assert taus.dtype == torch.float32


def test_nthr_penalises_only_negative_advantages_strictly_below_minus_tau():
    thr = torch.tensor([[-0.5, -0.5], [-0.5, -0.3], [-0.5, -0.5]])
    advantages = torch.tensor([0.5, -0.5, 0.0])  # one group of 3: positive, negative, zero
    mask = torch.ones(3, 2)
    got = thr_weights(thr, advantages, mask, 3, strategy="nthr", taus=torch.tensor([0.3]))
    eta = 2 * abs(0.5 - 1 / 3)
    # THR = -0.3 sits on -tau and is not below it; the positive and the zero-advantage rows are never penalised
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0], [eta, 1.0], [1.0, 1.0]]))


def test_a_zero_thr_token_keeps_weight_one_when_every_token_is_dominant():
    thr = torch.tensor([[0.0, 0.2], [-0.2, 0.0]])
    got = thr_weights(thr, torch.tensor([1.0, -1.0]), torch.ones(2, 2), 2, strategy="positive-amplify", p=0.3,
                      taus=torch.tensor([-math.inf]))
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.3], [0.7, 1.0]]))


@pytest.mark.parametrize("function", ["group_thresholds", "thr_weights"])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(thr=torch.zeros(5, 3), mask=torch.ones(5, 3)), r"^thr has 5 rows, which is not a multiple"),
        (dict(advantages=torch.zeros(5)), r"^advantages must have shape \(6,\), got \(5,\)"),
        (dict(mask=torch.ones(6, 2)), r"^completion_mask must have shape \(6, 3\), got \(6, 2\)"),
        (dict(positive_mask=torch.ones(4)), r"^positive_mask must have shape \(6,\), got \(4,\)"),
    ],
)
def test_shape_errors_name_the_argument(function, change, message):
    thr, advantages, mask = change.get("thr", THR), change.get("advantages", ADV), change.get("mask", MASK)
    kwargs = dict(positive_mask=change.get("positive_mask"))
    if function == "thr_weights":
        kwargs.update(strategy="dominant-only", taus=torch.zeros(thr.size(0) // 3))
    with pytest.raises(ValueError, match=message):
        call = {"group_thresholds": group_thresholds, "thr_weights": thr_weights}[function]
        call(thr, advantages, mask, 3, **kwargs)


def test_threshold_argument_errors_say_what_is_needed():
    with pytest.raises(ValueError, match=r"^taus must have shape \(2,\), got \(3,\)"):
        thr_weights(THR, ADV, MASK, 3, strategy="positive-amplify", taus=torch.zeros(3))
    with pytest.raises(ValueError, match=r'^threshold="absolute" needs tau \(a float'):
        group_thresholds(THR, ADV, MASK, 3, threshold="absolute")
    with pytest.raises(ValueError, match=r'^threshold="quantile" needs quantile in \(0, 1\], got 0'):
        group_thresholds(THR, ADV, MASK, 3, threshold="quantile", quantile=0)


def test_a_constant_schedule_ignores_the_end_value():
    assert scheduled_p(0.1, 0.5, "constant", 0.5) == 0.1
    assert scheduled_p(0.1, 0.5, "linear", 0.5) == pytest.approx(0.3)


def test_nthr_success_rate_counts_the_explicit_positive_set():
    thr = torch.tensor([[0.5], [-0.5], [-0.5], [-0.5]])
    advantages = torch.tensor([1.0, -0.5, -0.2, -0.3])
    mask = torch.ones(4, 1)
    taus = torch.tensor([0.1])
    by_advantage = thr_weights(thr, advantages, mask, 4, strategy="nthr", taus=taus)  # s = 1/4, eta = 0.5
    torch.testing.assert_close(by_advantage[:, 0], torch.tensor([1.0, 0.5, 0.5, 0.5]))
    positive = torch.tensor([True, True, False, False])  # s = 2/4, eta = 0
    by_set = thr_weights(thr, advantages, mask, 4, strategy="nthr", taus=taus, positive_mask=positive)
    torch.testing.assert_close(by_set[:, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
