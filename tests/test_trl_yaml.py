"""A config written for `trl grpo` (TRL's field names, reward names and accelerate preset) runs through
`trl-thr train` with only the `thr_*` fields added: `examples/configs/trl_grpo_style.yaml`."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from trl_thr.cli.launch import accelerate_launch_args
from trl_thr.cli.rewards import load_reward_funcs
from trl_thr.cli.commands.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "configs" / "trl_grpo_style.yaml"


def parse_like_trl_grpo(config: Path):
    """What `trl grpo --config <config>` does with the file: TRL's own parser, then TRL's preset resolver."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.scripts.grpo import make_parser

    *parsed, from_config, from_cli = make_parser().parse_args_and_config(
        ["--config", str(config)], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert from_cli == []
    return parsed, from_config, resolve_accelerate_config_argument


def test_example_is_a_trl_grpo_config_plus_thr_fields():
    (_, _, _, _), leftover, resolve = parse_like_trl_grpo(EXAMPLE)
    keys = [s[2:] for s in leftover if s.startswith("--")]
    thr = [k for k in keys if k.startswith("thr_")]
    launch = [k for k in keys if not k.startswith("thr_")]
    assert thr == ["thr_strategy", "thr_p"] and launch == ["accelerate_config", "num_processes"]
    # `trl grpo` hands the rest to `accelerate launch`, after resolving the preset with TRL's resolver.
    launch_strings = leftover[: leftover.index("--thr_strategy")]
    accelerate_args = launch_command_parser().parse_args(resolve(launch_strings) + ["grpo.py"])
    assert accelerate_args.config_file.endswith("trl/accelerate_configs/multi_gpu.yaml")


def test_trl_thr_reads_every_trl_field_as_trl_grpo_does():
    (trl_script, trl_training, trl_model, _), _, _ = parse_like_trl_grpo(EXAMPLE)
    (script, training, model, _, launch), _ = parse_args(["--config", str(EXAMPLE)])
    written = yaml.safe_load(EXAMPLE.read_text())
    for ours, trls in ((script, trl_script), (training, trl_training), (model, trl_model)):
        for name in {f.name for f in fields(trls)} & set(written):
            assert getattr(ours, name) == getattr(trls, name), name
    assert training.thr_strategy == "positive-amplify" and training.thr_p == 0.1
    assert launch.accelerate_config == "multi_gpu" and launch.num_processes == 2
    names = [f.__name__ for f in load_reward_funcs(script.reward_funcs)]
    assert names == ["accuracy_reward", "think_format_reward", "digit_reward"]


def test_multi_gpu_preset_on_cpu_is_two_float32_workers():
    (_, _, _, _, launch), _ = parse_args(["--config", str(EXAMPLE)])
    args = launch_command_parser().parse_args(accelerate_launch_args(launch, gpu_count=0) + ["train.py"])
    args = _validate_launch_command(args)[0]
    assert args.multi_gpu and args.num_processes == 2 and args.mixed_precision == "no"


def test_example_trains_on_two_cpu_workers(tmp_path):
    """Two torchrun workers (gloo) train the tiny model 2 steps with TRL's rewards, by `trl-thr train` alone."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_THR_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-m", "trl_thr", "train", "--config", str(EXAMPLE), "--output_dir",
                             str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "trl_thr_run.json").read_text())
    assert record["world_size"] == 2 and record["launch_args"]["accelerate_config"] == "multi_gpu"
    assert record["training_args"]["bf16"] is False
    assert json.loads((out / "thr_summary.json").read_text())["steps"] == 2
    for reward in ("accuracy_reward", "think_format_reward", "digit_reward"):
        assert f"rewards/{reward}/mean" in result.stdout + result.stderr, reward
