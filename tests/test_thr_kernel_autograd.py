"""`compute_thr` against autograd: THR is an inner product of log-prob gradients with respect to the LM head.

With logits `z = s (W h + b) / tau` (a logit scale `s`, a temperature `tau`, no soft-cap), the gradient of a token's
log-prob with respect to the rows `V'` of `W` is `(s / tau) g h^T` restricted to `V'`, so

    THR_{j,t} = sign(A_j) (tau / s)^2 < sum_{i in P} (1/|y_i|) sum_k grad log pi_{i,k},  grad log pi_{j,t} >

This reference never forms a residual: it differentiates the log-probs with `torch.autograd.functional.jacobian`.
(A soft-cap adds a per-logit derivative that THR's residual does not contain; the brute-force reference in
`test_thr_kernel.py` covers it.)
"""

import math

import pytest
import torch

from trl_thr.thr import compute_thr


def autograd_thr(hidden, ids, mask, weight, bias, advantages, num_generations, *, temperature, logit_scale, vocab,
                 include_self):
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for start in range(0, ids.size(0), num_generations):
        rows = slice(start, start + num_generations)
        group_mask, group_ids, group_adv = mask[rows].bool(), ids[rows], advantages[rows]
        positive = (group_adv > 0) & group_mask.any(1)
        if not positive.any() or (group_adv == group_adv[0]).all():
            continue
        kept = group_ids[group_mask].unique() if vocab == "sampled" else torch.arange(weight.size(0))

        def logprobs(kept_rows):  # (G, T) log-probs of the sampled tokens, as a function of W[kept]
            full_weight = weight.index_copy(0, kept, kept_rows)
            logits = (hidden[rows] @ full_weight.T + bias) * logit_scale / temperature
            return torch.log_softmax(logits, -1).gather(-1, group_ids[..., None]).squeeze(-1)

        grads = torch.autograd.functional.jacobian(logprobs, weight[kept])  # (G, T, |V'|, d)
        grads = grads * group_mask[..., None, None]
        row_means = grads.sum(1) / group_mask.sum(1).clamp(min=1)[:, None, None]  # (G, |V'|, d)
        influence = row_means[positive].sum(0)
        for j in range(num_generations):
            received = influence - row_means[j] if not include_self and positive[j] else influence
            thr = (grads[j] * received).sum(dim=(-1, -2)) * (temperature / logit_scale) ** 2
            out[start + j] = torch.sign(group_adv[j]) * thr * group_mask[j]
    return out


@pytest.mark.parametrize("vocab", ["sampled", "full"])
@pytest.mark.parametrize("include_self", [True, False])
def test_thr_is_the_gradient_inner_product(vocab, include_self):
    gen = torch.Generator().manual_seed(21)
    batch, length, hidden_size, vocab_size, num_generations = 8, 5, 4, 11, 4
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=gen, dtype=torch.float64) / math.sqrt(hidden_size)
    bias = torch.randn(vocab_size, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 6, (batch, length), generator=gen)
    mask = (torch.arange(length) < torch.tensor([5, 2, 4, 3, 1, 5, 4, 2])[:, None]).long()
    mask[6, 1] = 0  # a masked token inside a row
    advantages = torch.tensor([1.0, -0.5, 0.5, -1.0, 0.7, 0.0, -0.3, -0.4], dtype=torch.float64)
    transform = dict(temperature=0.7, logit_scale=1.5)
    expected = autograd_thr(hidden, ids, mask, weight, bias, advantages, num_generations, vocab=vocab,
                            include_self=include_self, **transform)
    # Every row receives influence but the zero-advantage one (and, without itself, the group's lone positive).
    assert (expected[[0, 1, 2, 3, 6, 7]].abs().sum(1) > 0).all() and (expected[5] == 0).all()
    got = compute_thr(hidden, ids, mask, weight, advantages, num_generations, vocab=vocab,
                      include_self=include_self, lm_head_bias=bias, **transform)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
