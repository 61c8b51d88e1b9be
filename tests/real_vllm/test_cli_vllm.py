"""`trl-thr train --use_vllm true` on a CPU: colocate trains (the builtin tiny model in a shape vLLM runs); server
mode and sleep mode are refused in one line before anything loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "src" / "trl_thr" / "cli" / "configs" / "tiny_cpu.yaml")


def run_cli(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_THR_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "trl_thr", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)


def test_train_with_vllm_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "--config", TINY, "--output_dir", str(out), "--use_vllm", "true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 3 steps" in result.stdout
    # vLLM's engine is shut down while its process groups exist, not by a finalizer at exit after them
    assert "Exception ignored" not in result.stderr and "Invalid process group" not in result.stderr, \
        result.stderr[-3000:]
    summary = json.loads((out / "thr_summary.json").read_text())
    assert summary["steps"] == 3
    config = json.loads((tmp_path / "cache" / "models" / "tiny-qwen2-vllm" / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64


def test_server_mode_on_cpu_is_refused_in_one_line(tmp_path):
    result = run_cli(["train", "--config", TINY, "--output_dir", str(tmp_path / "run"), "--use_vllm", "true",
                      "--vllm_mode", "server"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("trl-thr ")]
    assert lines == ["trl-thr train: error: vllm_mode='server' needs the trainer on a CUDA device: TRL sends the "
                     "weights to the server over NCCL. On a CPU, set vllm_mode='colocate' (vLLM runs inside the "
                     "training process)."]
    assert not (tmp_path / "cache" / "models").exists()  # refused before any model was built or loaded


def test_sleep_mode_on_cpu_is_refused_in_one_line(tmp_path):
    result = run_cli(["train", "--config", TINY, "--output_dir", str(tmp_path / "run"), "--use_vllm", "true",
                      "--vllm_enable_sleep_mode", "true"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("trl-thr ")]
    assert lines == ["trl-thr train: error: vllm_enable_sleep_mode=True: vLLM's CPU platform has no sleep mode. Set "
                     "it to False."]
