"""Multi-process runs through `accelerate launch`, never a launcher of our own.

`trl-thr train --num_processes 8 --accelerate_config zero3 ...` is the same as
`accelerate launch --config_file <zero3.yaml> --num_processes 8 <trl_thr/cli/train.py> ...`.
"""

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path

ACCELERATE_PRESETS = ("ddp", "zero2", "zero3", "fsdp")


@dataclass
class LaunchArguments:
    """How many processes to run, and with which `accelerate` configuration."""

    num_processes: int | None = field(
        default=None,
        metadata={
            "help": "Processes over all machines, as in `accelerate launch` (usually the number of GPUs). Above 1, "
            "the run goes through accelerate. Default with a preset: the GPUs of this machine times num_machines."
        },
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": f"Accelerate preset ({', '.join(ACCELERATE_PRESETS)}) or an accelerate config file."},
    )
    num_machines: int = field(default=1, metadata={"help": "Machines taking part (multi-node)."})
    machine_rank: int = field(default=0, metadata={"help": "Rank of this machine (multi-node)."})
    main_process_ip: str | None = field(default=None, metadata={"help": "Address of machine 0 (multi-node)."})
    main_process_port: int | None = field(default=None, metadata={"help": "Port on machine 0 (multi-node)."})


def accelerate_config_file(name_or_path: str) -> str:
    """Path of a shipped preset, or of a user's accelerate config file."""
    if name_or_path in ACCELERATE_PRESETS:
        return str(importlib.resources.files("trl_thr.cli.accelerate_configs").joinpath(f"{name_or_path}.yaml"))
    if Path(name_or_path).is_file():
        return name_or_path
    raise ValueError(
        f"accelerate_config={name_or_path!r} is neither a preset ({', '.join(ACCELERATE_PRESETS)}) nor an existing "
        "accelerate config file."
    )


def inside_launched_process() -> bool:
    """Whether this process was started by `accelerate launch`/torchrun (which set the rank variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(launch: LaunchArguments) -> bool:
    """Whether to hand the run to `accelerate launch` rather than train in this process."""
    if inside_launched_process():
        return False
    return launch.accelerate_config is not None or (launch.num_processes or 1) > 1 or launch.num_machines > 1


def accelerate_launch_args(launch: LaunchArguments, gpu_count: int) -> list[str]:
    """Arguments for `accelerate launch` (before the script path)."""
    if launch.num_processes is not None and launch.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {launch.num_processes}.")
    if launch.num_machines < 1 or not 0 <= launch.machine_rank < launch.num_machines:
        raise ValueError(
            f"machine_rank={launch.machine_rank} must be in [0, num_machines={launch.num_machines})."
        )
    if launch.num_machines > 1 and launch.main_process_ip is None:
        raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0).")
    num_processes = launch.num_processes or max(gpu_count, 1) * launch.num_machines
    args = []
    if launch.accelerate_config is not None:
        args += ["--config_file", accelerate_config_file(launch.accelerate_config)]
    else:
        # Without a config file accelerate starts one process unless told it is data parallel. --multi_gpu also
        # works without GPUs: the workers then train on the CPU with the gloo backend.
        args += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args += ["--num_processes", str(num_processes), "--num_machines", str(launch.num_machines)]
    if launch.num_machines > 1:
        args += ["--machine_rank", str(launch.machine_rank), "--main_process_ip", launch.main_process_ip]
    if launch.main_process_port is not None:
        args += ["--main_process_port", str(launch.main_process_port)]
    return args


def launch_script(script: str, launch_args: list[str], script_args: list[str]) -> None:
    """Run `accelerate launch <launch_args> <script> <script_args>` and wait for it."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(launch_args + [script] + script_args))
