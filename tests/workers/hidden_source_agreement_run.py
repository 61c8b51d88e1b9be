"""Launched by test_distributed.py on two CPU processes: on rank 1 the generation capture records nothing (its
completions come from GRPOTrainer's own generation step), so its records cannot be aligned; rank 0's can. Each rank
trains one step and writes what it logged and how many full-sequence forwards its model ran."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers

from trainers import distributed_trainer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from trl_thr.cli.launch import end_processes  # noqa: E402


def main(model_path, output_dir):
    trainer = distributed_trainer(model_path, output_dir)
    rank = trainer.accelerator.process_index
    if rank == 1:
        trainer._generate_single_turn = GRPOTrainer._generate_single_turn.__get__(trainer)
    forwards = []

    def count(module, args, kwargs):
        if kwargs.get("use_cache") is False:  # generate decodes with a cache; log-prob forwards run without one
            forwards.append(1)

    trainer.model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        trainer.train()
    finally:
        end_processes(trainer)
    logged = [entry for entry in trainer.state.log_history if "thr/own_forward" in entry]
    record = {"own_forward": [entry["thr/own_forward"] for entry in logged], "forwards": len(forwards)}
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:3])
