"""Launched by test_zero3.py under `accelerate launch` with TRL's `zero3` preset on two CPU processes (DeepSpeed's CPU
accelerator, gloo): one THR step with a batch quantile, and each rank saves its generation batch (before TRL's
shuffle) with the THR weights it computed, and how the LM head was held while THR read it."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from trainers import distributed_trainer, save_generation_batches  # noqa: E402

from trl_thr import _trl_compat as compat  # noqa: E402
from trl_thr.cli.launch import end_processes  # noqa: E402


def main(model_path, output_dir):
    trainer = distributed_trainer(model_path, output_dir)
    rank = trainer.accelerator.process_index
    head = compat.unwrapped_causal_lm(trainer).get_output_embeddings()
    # ZeRO-3 leaves an empty placeholder outside its gather
    save_generation_batches(trainer, output_dir, lambda: {"sharding": compat.lm_head_sharding(head.weight),
                                                          "local_elements": head.weight.numel()})
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(trainer.state.log_history, Path(output_dir) / "log_history.pt")
    (Path(output_dir) / f"distributed-type-rank{rank}").write_text(str(trainer.accelerator.distributed_type))
    end_processes(trainer)


if __name__ == "__main__":
    main(*sys.argv[1:3])
