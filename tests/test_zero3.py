"""DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched with TRL's `zero3` preset:
THR reads the partitioned LM head through TRL's gather, and its weights and `thr/*` metrics equal a one-process
run's on the same data."""

import importlib.resources

import pytest
import torch
from helpers import WORKERS, launch_two_processes
from trainers import assert_two_processes_match_one

pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra: pip install -e '.[dev]'")


def test_zero3_two_processes_match_one(tiny_model_path, tmp_path):
    zero3 = importlib.resources.files("trl.accelerate_configs") / "zero3.yaml"
    result = launch_two_processes(WORKERS / "zero3_run.py", tiny_model_path, tmp_path, config_file=zero3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [(tmp_path / f"distributed-type-rank{r}").read_text() for r in (0, 1)] == ["DistributedType.DEEPSPEED"] * 2

    ranks = [torch.load(tmp_path / f"batch-rank{rank}.pt") for rank in (0, 1)]
    assert all(r["sharding"] == "deepspeed-zero3" and r["local_elements"] == 0 for r in ranks), \
        "the LM head was not partitioned: the run would not exercise ZeRO-3"
    logged = torch.load(tmp_path / "log_history.pt")[0]
    assert_two_processes_match_one(tiny_model_path, tmp_path, ranks, [logged])
