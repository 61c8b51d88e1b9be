"""Two CPU processes (accelerate, gloo) compute the same THR weights as one process on the same batch, and
`trl-thr train --num_processes 2` exits every time.

`accelerate launch --cpu` runs a single process; `--multi_gpu` on a machine without GPUs starts torchrun workers that
use the CPU and gloo (the scripts set `use_cpu=True`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import WORKERS, launch_two_processes
from trainers import assert_two_processes_match_one

HERE = Path(__file__).parent


def test_two_processes_match_one(tiny_model_path, tmp_path):
    result = launch_two_processes(WORKERS / "distributed_run.py", tiny_model_path, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"batch-rank{rank}.pt") for rank in (0, 1)]
    assert all(r["prompt_ids"].shape == ranks[0]["prompt_ids"].shape for r in ranks)  # no prompt padding differences
    logs = torch.load(tmp_path / "log_history.pt")
    assert_two_processes_match_one(tiny_model_path, tmp_path, ranks, [logs[0]])
    # the group's last owner is not DDP's reducer (see end_processes): the wrapper is freed on both ranks
    assert [(tmp_path / f"wrapper-freed-rank{rank}").read_text() for rank in (0, 1)] == ["True", "True"]


TINY_CONFIG = str(HERE.parent / "src" / "trl_thr" / "cli" / "configs" / "tiny_cpu.yaml")
TWO_PROCESS_RUNS = 5


def test_two_process_training_exits_every_time(tiny_model_path, tmp_path):
    """The launched run used to hang after saving, now and then: each of several runs must exit, with its results.

    Each run is bounded by its own timeout, so a hang fails the test instead of stopping the suite.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent / "src")}
    for attempt in range(TWO_PROCESS_RUNS):
        out = tmp_path / f"run{attempt}"
        command = [sys.executable, "-m", "trl_thr", "train", "--config", TINY_CONFIG, "--model_name_or_path",
                   tiny_model_path, "--output_dir", str(out), "--num_processes", "2", "--max_steps", "1",
                   "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "8",
                   "--plot", "false", "--seed", str(attempt)]
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        except subprocess.TimeoutExpired as error:
            raise AssertionError(f"run {attempt + 1} of {TWO_PROCESS_RUNS} did not exit within 240 s; its last "
                                 f"output:\n{(error.stderr or b'')[-3000:]}") from error
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((out / "trl_thr_run.json").read_text())["world_size"] == 2
        assert json.loads((out / "thr_summary.json").read_text())["steps"] == 1
        assert (out / "model.safetensors").exists()


def test_processes_agree_on_the_hidden_state_source(tiny_model_path, tmp_path):
    """One process cannot align its generation records, the other can: both must run THR's own forward, since under
    ZeRO-3/FSDP that forward has collectives and a process running it alone would hang."""
    result = launch_two_processes(WORKERS / "hidden_source_agreement_run.py", tiny_model_path, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["own_forward"] for r in ranks] == [[1.0], [1.0]]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]
