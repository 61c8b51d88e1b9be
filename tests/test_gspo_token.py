import torch

from trl_thr import sequence_token_old_logps


def test_ratio_value_is_the_sequence_ratio_and_gradient_is_per_token():
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)

    new_old = sequence_token_old_logps(logps, old, mask)
    assert not new_old.requires_grad
    ratio = torch.exp(logps - new_old)
    sequence_ratio = torch.exp(((logps - old) * mask).sum(-1) / mask.sum(-1)).detach()
    torch.testing.assert_close(ratio, sequence_ratio[:, None].expand(3, 5))

    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (ratio * weights * mask).sum().backward()
    # d/d logp_{i,t} of sg[s_i] * exp(logp - sg[logp]) is s_i at that token alone.
    torch.testing.assert_close(logps.grad, sequence_ratio[:, None] * weights * mask)


def test_on_policy_old_logps_give_ratio_one():
    logps = torch.randn(2, 4)
    torch.testing.assert_close(torch.exp(logps - sequence_token_old_logps(logps, None, torch.ones(2, 4))),
                               torch.ones(2, 4))
