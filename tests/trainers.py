"""Trainer set-ups shared by the trainer test files and the worker scripts: configs, parameter snapshots, one loss
and its gradients, and recorders around the trainer's forwards and its kernel call."""

from unittest.mock import patch

import torch
from helpers import CPU, tiny_dataset
from trl import GRPOTrainer

import trl_thr.thr_grpo_trainer as trainer_module
from trl_thr import THRGRPOConfig


def make_config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=2, logging_steps=1, learning_rate=0.1, seed=0, **CPU)
    kwargs.update(overrides)
    return THRGRPOConfig(**kwargs)


def distributed_config(output_dir):
    """One THR step with a batch quantile (pooled over processes), as the two-process runs train."""
    return THRGRPOConfig(
        output_dir=output_dir, **CPU, per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=1, logging_steps=1, seed=0, thr_threshold="quantile", thr_quantile=0.3, thr_quantile_scope="batch",
    )


def distributed_trainer(model_path, output_dir):
    """The THRGRPOTrainer the multi-process workers train: `distributed_config` on same-length prompts."""
    from helpers import length_reward, same_length_dataset

    from trl_thr import THRGRPOTrainer

    return THRGRPOTrainer(model=model_path, reward_funcs=length_reward, args=distributed_config(output_dir),
                          train_dataset=same_length_dataset(model_path))


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(before, model):
    return [name for name, param in model.named_parameters() if not torch.equal(before[name], param)]


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


class ForwardCounter:
    def __init__(self):
        self.policy_calls = 0

    def __call__(self, original):
        counter = self

        def wrapper(trainer, model, *args, **kwargs):
            if model is trainer.model and not torch.is_grad_enabled():
                counter.policy_calls += 1
            return original(trainer, model, *args, **kwargs)

        return wrapper


def count_generation_forwards(trainer):
    counter = ForwardCounter()
    original = GRPOTrainer._get_per_token_logps_and_entropies
    with patch.object(GRPOTrainer, "_get_per_token_logps_and_entropies", counter(original)):
        batch = trainer._generate_and_score_completions(list(tiny_dataset())[:2] * 2)
    return counter.policy_calls, batch


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


def full_sequence_forwards(trainer) -> int:
    """Train and count backbone calls without a KV cache: the log-prob forwards (generation decodes with a cache, or
    runs in vLLM)."""
    calls = []

    def count(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            calls.append(1)

    handle = trainer.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    return len(calls)


def pad_right(tensors, value=0):
    width = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.size(1)), value=value) for t in tensors])


def assert_two_processes_match_one(model_path, output_dir, rank_batches, rank_metrics=()):
    """The same check for every multi-process run: the ranks' generation batches (each with the `thr_weights` it
    computed), put together, get the same weights from one process, and each rank's `thr/*` metrics (timings and
    `thr/own_forward` aside) equal that one process's. The batch quantile must keep some tokens and drop others."""
    batch = {key: torch.cat([r[key] for r in rank_batches]) for key in ("prompt_ids", "prompt_mask", "advantages")}
    for key in ("completion_ids", "completion_mask", "thr_weights"):
        batch[key] = pad_right([r[key] for r in rank_batches])
    two_process_weights = batch.pop("thr_weights")

    trainer = distributed_trainer(model_path, str(output_dir / "one"))
    trainer.args.per_device_train_batch_size = 8  # one process holds what the two held
    trainer.model.train()
    logps, hidden = trainer._old_policy_forward(batch)
    thr = trainer._compute_thr(batch, hidden, logps, positive=None)
    one_process_weights, _ = trainer._thr_weights_and_metrics(batch, thr, None, thr_seconds=0.0, forward_seconds=0.0)

    torch.testing.assert_close(one_process_weights, two_process_weights, rtol=1e-5, atol=1e-6)
    kept = (two_process_weights > 0).float().mean()
    assert 0 < kept < 1, "the batch quantile kept everything or nothing: the comparison would be trivial"
    one_process_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("thr/")}
    for metrics in rank_metrics:
        # thr/entropy_overlap is measured in the loss forward, which the one-process recomputation does not run
        compared = {k: v for k, v in metrics.items() if k.startswith("thr/") and "seconds" not in k
                    and k not in ("thr/own_forward", "thr/entropy_overlap")}
        assert compared, "no thr/* metrics were logged"
        for key, value in compared.items():
            assert abs(value - one_process_metrics[key]) <= 1e-5 * max(1.0, abs(value)), key


def save_generation_batches(trainer, output_dir, extra=dict):
    """Make `trainer` save each generation batch it makes (tensors, before TRL's shuffle, with the THR weights) to
    `output_dir/batch-rank{rank}.pt`, with what `extra()` returns, taken just before the batch was made."""
    from pathlib import Path

    generate = trainer._generate_and_score_completions
    rank = trainer.accelerator.process_index

    def record(inputs):
        before = extra()
        batch = generate(inputs)
        tensors = {k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}
        torch.save({**tensors, **before}, Path(output_dir) / f"batch-rank{rank}.pt")
        return batch

    trainer._generate_and_score_completions = record
