"""FSDP2's LM head on two real processes: `full_lm_head` must hand the kernel the whole weight on every rank.

On one rank a shard is the whole tensor, so only a mesh of two tells `full_tensor()` from `to_local()`."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import WORKERS

HERE = Path(__file__).parent


def test_full_lm_head_gathers_a_row_sharded_dtensor_on_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE.parent / "src")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / "fsdp2_gather_run.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"head-rank{rank}.pt")
        assert got["local_rows"] == got["full_weight"].size(0) // 2, "the weight was not sharded"
        assert not got["weight_is_dtensor"] and not got["bias_is_dtensor"]
        assert torch.equal(got["weight"], got["full_weight"]), f"rank {rank} got {tuple(got['weight'].shape)}"
        assert torch.equal(got["bias"], got["full_bias"]), f"rank {rank}"
