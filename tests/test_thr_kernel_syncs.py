"""`compute_thr` waits for the device a fixed number of times per batch, however many groups the batch holds.

On a GPU every `.tolist()`, `.item()` or `nonzero` stalls the stream until the device catches up. A CUDA sync
counter does not exist on CPU, so this counts the Python-level calls that cause one (the kernel's one
`torch.unique`, which also waits on CUDA, is once per batch by construction: it runs outside every loop).
"""

import pytest
import torch

from trl_thr.thr import compute_thr


def count_host_syncs(monkeypatch):
    calls = []

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        counting(torch.Tensor, name)
    counting(torch, "nonzero")
    return calls


def batch(num_groups, num_generations=4, length=6, hidden_size=5, vocab_size=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = num_groups * num_generations
    hidden = torch.randn(rows, length, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen)
    ids = torch.randint(0, vocab_size, (rows, length), generator=gen)
    mask = (torch.arange(length) < torch.randint(1, length + 1, (rows, 1), generator=gen)).long()
    advantages = torch.tensor([1.0, -1.0] * (rows // 2))
    logprobs = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None]).squeeze(-1)
    return hidden, ids, mask, weight, advantages, logprobs


@pytest.mark.parametrize("vocab", ["sampled", "full"])
@pytest.mark.parametrize("include_self", [True, False])
def test_host_syncs_do_not_grow_with_the_number_of_groups(monkeypatch, vocab, include_self):
    counts = []
    for num_groups in (1, 3, 12):
        hidden, ids, mask, weight, advantages, logprobs = batch(num_groups)
        calls = count_host_syncs(monkeypatch)
        thr = compute_thr(hidden, ids, mask, weight, advantages, 4, vocab=vocab, include_self=include_self,
                          token_logprobs=logprobs)
        counts.append(len(calls))
        monkeypatch.undo()
        assert thr.abs().sum() > 0  # every group was active: the work really scaled with the groups
    assert counts[0] == counts[1] == counts[2] <= 2, counts


def test_a_batch_without_active_groups_syncs_once(monkeypatch):
    hidden, ids, mask, weight, _, logprobs = batch(5)
    calls = count_host_syncs(monkeypatch)
    thr = compute_thr(hidden, ids, mask, weight, torch.zeros(20), 4, token_logprobs=logprobs)
    assert len(calls) == 1 and (thr == 0).all()
