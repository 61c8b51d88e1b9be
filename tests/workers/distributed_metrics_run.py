"""Launched by test_trainer_behaviour.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): one
generation batch per rank, with rewards that differ by rank, a reward-threshold positive set and a per-group
quantile. Each rank saves the kernel's THR, its weights, its positive set and the metrics it logged."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from ragged import LENGTHS, ragged_trainer, two_prompts  # noqa: E402
from trainers import KernelRecorder  # noqa: E402

from trl_thr.cli.launch import end_processes  # noqa: E402

THRESHOLD = 5.0
QUANTILE = 0.4


def rank_dependent_reward(completion_ids, **kwargs):
    """Length on rank 0, 10 - length on rank 1: other advantages and other positive sets on each rank."""
    rank = int(os.environ["RANK"])
    return [float(len(ids)) if rank == 0 else 10.0 - len(ids) for ids in completion_ids]


def main(model_path, output_dir):
    trainer = ragged_trainer(model_path, output_dir, reward_funcs=rank_dependent_reward,
                             thr_strategy="negative-amplify", thr_p=0.2, thr_threshold="quantile",
                             thr_quantile=QUANTILE, thr_positive_reward_threshold=THRESHOLD)
    rank = trainer.accelerator.process_index
    trainer.rollout_func.gen.manual_seed(rank)  # other tokens on each rank too
    recorder = KernelRecorder()
    with recorder.patch:
        batch = trainer._generate_and_score_completions(two_prompts(model_path))
    own_rewards = torch.tensor(rank_dependent_reward([[0] * n for n in LENGTHS]))
    torch.save(
        {
            "thr": recorder.outputs[0].cpu(),
            "weights": batch["thr_weights"].cpu(),
            "mask": batch["completion_mask"].cpu(),
            "advantages": batch["advantages"].cpu(),
            "positive": recorder.kwargs[0]["positive_mask"].cpu(),
            "own_rewards": own_rewards,
            "threshold": THRESHOLD,
            "quantile": QUANTILE,
            "logged": {key: values[-1] for key, values in trainer._metrics["train"].items() if key.startswith("thr/")},
        },
        Path(output_dir) / f"metrics-rank{rank}.pt",
    )
    end_processes(trainer)


if __name__ == "__main__":
    main(*sys.argv[1:3])
