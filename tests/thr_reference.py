"""THR computed by autograd on the model itself, sharing no code with trl_thr (see test_trainer_reference.py): the
per-token gradients of the log-probs with respect to the LM head, and docs/theory.md §1's double sum over them."""

import torch
import torch.nn.functional as F


def per_token_gradients(model, batch, lengths, temperature):
    """Autograd gradients of every real completion token's log-prob w.r.t. the LM head, hidden states detached.

    Returns `(grads_delta, grads_weight)`, lists of `(V, d)` float64 tensors in row-major token order:
    - `grads_delta`: w.r.t. a linear head `D` added to the logits the sampler sees, `z = logits / temperature + D h`,
      at `D = 0`. This is `g h^T` whatever transform the model applies, the quantity THR is defined on.
    - `grads_weight`: w.r.t. the LM-head weight itself as used in the output projection (for a tied head, the
      embedding matrix only where it projects), through the model's own logit scale / soft-cap and the
      temperature. Without a soft-cap this is `(scale / temperature) g h^T`.
    """
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone().requires_grad_(True)
    captured = {}

    def project_with_leaf_weight(module, args, output):
        hidden = args[0].detach()
        captured["hidden"] = hidden
        return F.linear(hidden, weight, None if module.bias is None else module.bias.detach())

    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    prompt_length = batch["prompt_ids"].size(1)
    handle = head.register_forward_hook(project_with_leaf_weight)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # the model's own transform
    finally:
        handle.remove()
    positions = slice(prompt_length - 1, input_ids.size(1) - 1)  # the state at position t predicts token t + 1
    logits = logits[:, positions] / temperature
    hidden = captured["hidden"][:, positions]
    delta = torch.zeros_like(weight, requires_grad=True)
    delta_logits = logits.detach() + F.linear(hidden, delta)
    logp_weight = logits.log_softmax(-1)
    logp_delta = delta_logits.log_softmax(-1)
    grads_delta, grads_weight = [], []
    for row, length in enumerate(lengths):
        for t in range(length):
            token = batch["completion_ids"][row, t]
            (grad,) = torch.autograd.grad(logp_delta[row, t, token], delta, retain_graph=True)
            grads_delta.append(grad)
            (grad,) = torch.autograd.grad(logp_weight[row, t, token], weight, retain_graph=True)
            grads_weight.append(grad)
    return grads_delta, grads_weight


def reference_thr(grads, completion_ids, lengths, rewards, num_generations, vocab, positive=None, counted=None):
    """THR `(B, T)` from per-token gradients: the double sum of docs/theory.md §1, token pair by token pair.

    Signs are those of `reward - group mean` (the advantages' signs); `positive` `(B,)` bools default to rewards
    above the group mean (`A > 0`). A group whose rewards are all equal, or whose positive set is empty, gets 0.
    `counted` `(B, T)` bools, default every real token: the tokens the loss counts (TRL's `tool_mask` leaves tool
    outputs out). Only they take part in the sums, the `1/|y_i|` count and the sampled vocabulary, and only they
    get a THR; the others keep 0.
    """
    thr = torch.zeros(len(lengths), completion_ids.size(1), dtype=torch.float64)
    starts = [sum(lengths[:row]) for row in range(len(lengths))]
    for group in range(len(lengths) // num_generations):
        rows = range(group * num_generations, (group + 1) * num_generations)
        mean = sum(rewards[r] for r in rows) / num_generations
        members = [r for r in rows if (rewards[r] > mean if positive is None else positive[r])]
        if not members or len({rewards[r] for r in rows}) == 1:
            continue
        tokens = {r: [t for t in range(lengths[r]) if counted is None or counted[r][t]] for r in rows}
        ids = torch.cat([completion_ids[r, tokens[r]] for r in rows]).unique()  # never a padding position
        restrict = (lambda g: g) if vocab == "full" else (lambda g: g[ids])
        for j in rows:
            sign = (rewards[j] > mean) - (rewards[j] < mean)
            for t in tokens[j]:
                g_jt = restrict(grads[starts[j] + t])
                total = 0.0
                for i in members:
                    total += sum((restrict(grads[starts[i] + k]) * g_jt).sum() for k in tokens[i]) / len(tokens[i])
                thr[j, t] = sign * total
    return thr
