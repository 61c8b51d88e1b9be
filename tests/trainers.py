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
