"""THRGRPOTrainer on a model sharded by FSDP2 over two CPU processes (gloo): the THR weights and `thr/*` metrics
equal a one-process run on the same batch, and a loss backpropagates through the shards.

accelerate builds FSDP only on GPUs, so the worker shards with torch's `fully_shard` itself (see its docstring);
`trl-thr train --accelerate_config fsdp2` on a CPU is refused (test_launch.py)."""

import torch
from helpers import WORKERS, launch_two_processes
from trainers import assert_two_processes_match_one


def test_fsdp2_two_processes_match_one(tiny_model_path, tmp_path):
    result = launch_two_processes(WORKERS / "fsdp2_run.py", tiny_model_path, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"fsdp2-rank{rank}.pt") for rank in (0, 1)]
    assert all(r["sharded"] for r in ranks), "the LM head was not sharded: the run would not exercise FSDP2"
    assert all(r["head_grad_is_sharded"] and torch.isfinite(r["loss"]) for r in ranks)

    batches, metrics = [r["batch"] for r in ranks], [r["metrics"] for r in ranks]
    assert_two_processes_match_one(tiny_model_path, tmp_path, batches, metrics)
