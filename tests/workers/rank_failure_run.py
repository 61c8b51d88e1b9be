"""Launched by test_rank_failure.py on two CPU processes: rank 1 fails inside the THR kernel on its first
generation batch, rank 0 does not. Each rank writes the error it ends with."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from trainers import distributed_trainer  # noqa: E402

import trl_thr.thr_grpo_trainer as thr_grpo_trainer  # noqa: E402
from trl_thr.cli.launch import end_processes  # noqa: E402


def main(model_path, output_dir):
    trainer = distributed_trainer(model_path, output_dir)
    rank = trainer.accelerator.process_index
    if rank == 1:
        def out_of_memory(*args, **kwargs):
            raise MemoryError("planted: no memory for THR on rank 1")

        thr_grpo_trainer.compute_thr = out_of_memory
    try:
        trainer.train()
    except thr_grpo_trainer.THRComputationError as error:
        (Path(output_dir) / f"error-rank{rank}.txt").write_text(str(error))
        raise
    finally:
        end_processes(trainer)  # both ranks fail at the same step, so both get here


if __name__ == "__main__":
    main(*sys.argv[1:3])
