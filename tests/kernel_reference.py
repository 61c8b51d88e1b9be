"""The slow, obvious float64 reference for `compute_thr` (docs/theory.md §1-3): THR as a double sum over token
pairs with the softmax coupling spelled out, the logit transform written out, and the random batches it runs on."""

import math

import torch


def reference_logits(hidden, weight, bias=None, temperature=1.0, logit_scale=1.0, logit_softcap=None):
    """TRL's fused-head transform, written out here so that the reference does not share code with the kernel:
    `z = W h + b`, times `logit_scale`, soft-capped as `cap * tanh(z / cap)`, divided by the temperature."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits / temperature


def reference_thr(
    hidden,
    ids,
    mask,
    weight,
    advantages,
    num_generations,
    *,
    temperature=1.0,
    vocab="sampled",
    include_self=True,
    positive=None,
    bias=None,
    logit_scale=1.0,
    logit_softcap=None,
):
    """THR_{j,t} = sign(A_j) sum_{i in P} 1/|y_i| sum_k alpha((i,k),(j,t)) <h_ik, h_jt>, alpha spelled out."""
    hidden, weight = hidden.double(), weight.double()
    bias = None if bias is None else bias.double()
    probs = torch.softmax(reference_logits(hidden, weight, bias, temperature, logit_scale, logit_softcap), dim=-1)
    batch, length = ids.shape
    out = torch.zeros(batch, length, dtype=torch.float64)
    tokens = lambda row: [t for t in range(length) if mask[row, t]]  # noqa: E731
    for start in range(0, batch, num_generations):
        rows = range(start, start + num_generations)
        is_positive = lambda r: bool(advantages[r] > 0 if positive is None else positive[r])  # noqa: E731
        pos = [r for r in rows if is_positive(r) and tokens(r)]
        if not pos or len({float(advantages[r]) for r in rows}) == 1:  # empty P, or equal rewards
            continue
        if vocab == "sampled":
            kept = sorted({int(ids[r, t]) for r in rows for t in tokens(r)})
        else:
            kept = list(range(weight.size(0)))
        kept = torch.tensor(kept)
        for j in rows:
            for t in tokens(j):
                total = 0.0
                for i in pos:
                    if not include_self and i == j:
                        continue
                    for k in tokens(i):
                        y_ik, y_jt = int(ids[i, k]), int(ids[j, t])
                        pi_ik, pi_jt = probs[i, k], probs[j, t]
                        alpha = float(y_ik == y_jt)
                        alpha -= pi_jt[y_ik] if y_ik in kept else 0.0
                        alpha -= pi_ik[y_jt] if y_jt in kept else 0.0
                        alpha += (pi_ik[kept] * pi_jt[kept]).sum()
                        total += alpha * (hidden[i, k] @ hidden[j, t]) / len(tokens(i))
                out[j, t] = math.copysign(1.0, advantages[j]) * total if advantages[j] != 0 else 0.0
    return out


def make_batch(seed, batch, length, hidden_size, vocab_size, num_generations, ragged=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=gen, dtype=torch.float64) / math.sqrt(hidden_size)
    # A small id range makes tokens repeat across completions, so the 1[y = y'] term is exercised.
    ids = torch.randint(0, min(vocab_size, 7), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if ragged:
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (batch,), generator=gen).double()
    grouped = rewards.view(-1, num_generations)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    return hidden, ids, mask, weight, advantages


def true_logprobs(hidden, ids, weight, temperature=1.0, bias=None, logit_scale=1.0, logit_softcap=None):
    logits = reference_logits(hidden, weight, bias, temperature, logit_scale, logit_softcap)
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
