"""Launched by test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): one THR step,
and each rank saves its generation batch (before TRL's shuffle) with the THR weights it computed."""

import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from trainers import distributed_trainer, save_generation_batches  # noqa: E402

from trl_thr.cli.launch import end_processes  # noqa: E402


def main(model_path, output_dir):
    trainer = distributed_trainer(model_path, output_dir)
    save_generation_batches(trainer, output_dir)
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(trainer.state.log_history, Path(output_dir) / "log_history.pt")
    # Leave and free the process group as `trl-thr train` does; the DDP wrapper must be gone with it.
    rank, wrapper = trainer.accelerator.process_index, weakref.ref(trainer.model_wrapped)
    assert type(wrapper()).__name__ == "DistributedDataParallel"
    end_processes(trainer)
    (Path(output_dir) / f"wrapper-freed-rank{rank}").write_text(str(wrapper() is None))


if __name__ == "__main__":
    main(*sys.argv[1:3])
