"""Launched by test_fsdp2.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): the model sharded
by torch's FSDP2 (`fully_shard`, each decoder layer and the root, as accelerate's FSDP2 plugin wraps a transformer)
over a 2-process CPU mesh, one THR generation batch per rank, then a loss and its backward through the sharded model.
Each rank saves its batch, its THR weights, the `thr/*` metrics it logged and whether the parameters were sharded.

accelerate runs FSDP only on GPUs (on a CPU it builds DDP instead), so the sharding is applied here directly."""

import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from trainers import distributed_trainer  # noqa: E402

from trl_thr.cli.launch import end_processes  # noqa: E402

PROMPTS_PER_RANK = 2


def main(model_path, output_dir):
    trainer = distributed_trainer(model_path, output_dir)
    dataset = trainer.train_dataset
    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    mesh = init_device_mesh("cpu", (world,))
    model = trainer.model
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    head = model.get_output_embeddings().weight
    sharded = isinstance(head, DTensor) and head.to_local().size(0) < head.size(0)

    mine = list(dataset)[rank * PROMPTS_PER_RANK : (rank + 1) * PROMPTS_PER_RANK]
    inputs = [row for row in mine for _ in range(trainer.num_generations)]
    model.train()
    batch = trainer._generate_and_score_completions(inputs)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this worker does not run
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grad = model.get_output_embeddings().weight.grad
    torch.save(
        {
            "batch": {k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)},
            "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("thr/")},
            "sharded": sharded,
            "loss": loss.detach(),
            "head_grad_is_sharded": isinstance(grad, DTensor),
        },
        Path(output_dir) / f"fsdp2-rank{rank}.pt",
    )
    end_processes(trainer)


if __name__ == "__main__":
    main(*sys.argv[1:3])
