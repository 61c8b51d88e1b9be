"""Shared by the trainer tests: ragged rollouts, a recorder around the trainer's kernel call, and a THR reference
computed by autograd on the model, sharing no code with trl_thr (see test_trainer_reference.py)."""

from unittest.mock import patch

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoTokenizer

import trl_thr.thr_grpo_trainer as trainer_module
from trl_thr import THRGRPOConfig, THRGRPOTrainer

CPU = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no")
TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 8
# Completion lengths per row (two groups of four). Lengths under the limit end with EOS; 8 is a truncated one. The
# reward is the length, so advantages are known: rows 1 and 3 are the positive set of group 0, rows 4 and 6 of
# group 1.
LENGTHS = [3, 8, 1, 6, 8, 2, 5, 4]
NUM_GENERATIONS = 4


def length_of_completion(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


class RaggedRollout:
    """A `rollout_func` returning fixed random completions of `LENGTHS` tokens, EOS-terminated when short."""

    def __init__(self, tokenizer, seed=0):
        self.tokenizer = tokenizer
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, prompts, trainer):
        assert len(prompts) == len(LENGTHS)
        prompt_ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        completion_ids = []
        for length in LENGTHS:
            ids = torch.randint(3, len(self.tokenizer), (length,), generator=self.gen).tolist()
            if length < MAX_COMPLETION_LENGTH:
                ids[-1] = self.tokenizer.eos_token_id
            completion_ids.append(ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def two_prompts(model_path):
    """Two prompts of the same token length, each repeated for its group (no prompt padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    candidates = [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
    length = len(tokenizer(candidates[0])["input_ids"])
    chosen = [p for p in candidates if len(tokenizer(p)["input_ids"]) == length][:2]
    return [{"prompt": p} for p in chosen for _ in range(NUM_GENERATIONS)]


def ragged_trainer(model_path, output_dir, reward_funcs=length_of_completion, **overrides):
    """A THRGRPOTrainer on two groups of `LENGTHS` completions (see `RaggedRollout`), amplify without a threshold."""
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=NUM_GENERATIONS,
                  max_completion_length=MAX_COMPLETION_LENGTH, max_steps=1, seed=0, temperature=TEMPERATURE,
                  thr_strategy="amplify", thr_p=0.5, thr_threshold="none", **CPU)
    kwargs.update(overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = THRGRPOTrainer(model=model_path, reward_funcs=reward_funcs, args=THRGRPOConfig(**kwargs),
                             train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}),
                             rollout_func=RaggedRollout(tokenizer))
    trainer.model.train()  # as inside `train()`: metrics go to `_metrics["train"]`
    return trainer


class KernelRecorder:
    """Wraps the trainer module's `compute_thr`: keeps each call's output, keyword arguments and the sizes of its
    tensor arguments."""

    def __init__(self):
        self.outputs, self.kwargs, self.argument_numels = [], [], []
        original = trainer_module.compute_thr

        def wrapper(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            self.argument_numels.append([t.numel() for t in tensors])
            self.kwargs.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            thr = original(*args, **kwargs)
            self.outputs.append(thr.detach().clone())
            return thr

        self.patch = patch.object(trainer_module, "compute_thr", wrapper)


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


def reference_thr(grads, completion_ids, lengths, rewards, num_generations, vocab, positive=None):
    """THR `(B, T)` from per-token gradients: the double sum of docs/theory.md §1, token pair by token pair.

    Signs are those of `reward - group mean` (the advantages' signs); `positive` `(B,)` bools default to rewards
    above the group mean (`A > 0`). A group whose rewards are all equal, or whose positive set is empty, gets 0.
    """
    thr = torch.zeros(len(lengths), completion_ids.size(1), dtype=torch.float64)
    starts = [sum(lengths[:row]) for row in range(len(lengths))]
    for group in range(len(lengths) // num_generations):
        rows = range(group * num_generations, (group + 1) * num_generations)
        mean = sum(rewards[r] for r in rows) / num_generations
        members = [r for r in rows if (rewards[r] > mean if positive is None else positive[r])]
        if not members or len({rewards[r] for r in rows}) == 1:
            continue
        ids = torch.cat([completion_ids[r, : lengths[r]] for r in rows]).unique()  # never a padding position
        restrict = (lambda g: g) if vocab == "full" else (lambda g: g[ids])
        for j in rows:
            sign = (rewards[j] > mean) - (rewards[j] < mean)
            for t in range(lengths[j]):
                g_jt = restrict(grads[starts[j] + t])
                total = 0.0
                for i in members:
                    total += sum((restrict(grads[starts[i] + k]) * g_jt).sum() for k in range(lengths[i])) / lengths[i]
                thr[j, t] = sign * total
    return thr
