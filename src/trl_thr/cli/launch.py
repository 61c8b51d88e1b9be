"""Multi-process runs through `accelerate launch`, never a launcher of our own.

`--accelerate_config` takes what `trl grpo --accelerate_config` takes, resolved by TRL's own
`trl.cli.accelerate_config.resolve_accelerate_config_argument`: an accelerate config file, or the name of a preset
that TRL ships in `trl/accelerate_configs/` (`single_gpu`, `multi_gpu`, `zero1`, `zero2`, `zero3`, `fsdp1`,
`fsdp2`). trl-thr's earlier names stay as aliases: `ddp` is `multi_gpu`, `fsdp` is `fsdp2` (`zero2` and `zero3`
are TRL's names too).

TRL's presets are written for one 8-GPU machine in bf16 (`num_processes: 8`, `mixed_precision: bf16`). For a preset,
trl-thr passes instead `--num_processes` (given, else the GPUs of this machine times `num_machines`, at least 1)
and `--mixed_precision no`, so that the training config decides the precision: `GRPOConfig`'s `bf16` (on by
default), or none with `use_cpu: true, bf16: false`, where the preset's bf16 would otherwise reach the workers'
`TrainingArguments.mixed_precision` through `ACCELERATE_MIXED_PRECISION`. On a machine without GPUs, `multi_gpu`
starts torchrun workers that train on the CPU with gloo. A config file of your own is used as written, apart from
`num_processes` and `num_machines`.

`trl-thr train --num_processes 8 --accelerate_config zero3 ...` is
`accelerate launch --config_file <trl/accelerate_configs/zero3.yaml> --mixed_precision no --num_processes 8
<trl_thr/cli/commands/train.py> ...`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

# TRL's preset files, the same in 1.14 and 1.16 (`tests/test_launch.py` checks this against the installed TRL; any
# file TRL adds is accepted anyway, since TRL's resolver finds it).
TRL_ACCELERATE_PRESETS = ("single_gpu", "multi_gpu", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")
# trl-thr's earlier preset names: each had the same settings as its TRL preset, with mixed precision left to the
# training config (which `--mixed_precision no` keeps).
ACCELERATE_PRESET_ALIASES = {"ddp": "multi_gpu", "fsdp": "fsdp2"}

_PRESETS = f"TRL preset ({', '.join(TRL_ACCELERATE_PRESETS)}; aliases " + (
    f"{', '.join(f'{alias}={preset}' for alias, preset in ACCELERATE_PRESET_ALIASES.items())})"
)


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
        metadata={"help": f"As in `trl grpo`: a {_PRESETS} or an accelerate config file. Presets leave mixed "
                  "precision to bf16/fp16."},
    )
    num_machines: int = field(default=1, metadata={"help": "Machines taking part (multi-node)."})
    machine_rank: int = field(default=0, metadata={"help": "Rank of this machine (multi-node)."})
    main_process_ip: str | None = field(default=None, metadata={"help": "Address of machine 0 (multi-node)."})
    main_process_port: int | None = field(default=None, metadata={"help": "Port on machine 0 (multi-node)."})


def preset_name(name_or_path: str) -> str | None:
    """The TRL preset that `accelerate_config` names (after aliases), or `None` for a config file."""
    if Path(name_or_path).is_file():  # a file wins over a preset of the same name, as in TRL's resolver
        return None
    return ACCELERATE_PRESET_ALIASES.get(name_or_path, name_or_path)


def accelerate_config_file(name_or_path: str) -> str:
    """Path of TRL's preset file for a preset name or alias, or of a user's accelerate config file."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    name = preset_name(name_or_path) or name_or_path
    try:
        _, path = resolve_accelerate_config_argument(["--accelerate_config", name])
    except ValueError:
        raise ValueError(
            f"accelerate_config={name_or_path!r} is neither a {_PRESETS} nor an existing accelerate config file."
        ) from None
    return str(path)


def config_distributed_type(name_or_path: str) -> str | None:
    """The `distributed_type` (e.g. `"FSDP"`, `"MULTI_GPU"`) that a preset or accelerate config file asks for."""
    import yaml

    with open(accelerate_config_file(name_or_path)) as file:
        return (yaml.safe_load(file) or {}).get("distributed_type")


# Set by `trl-thr train` for the processes it launches: the launcher, not they, reports an interruption.
LAUNCHER_VARIABLE = "TRL_THR_LAUNCHER_PID"


def deepspeed_on_this_machine() -> None:
    """Tell DeepSpeed it runs on the CPU where there is no CUDA, before anything imports it: transformers' integrations
    import it even when unused, and it would warn on every run that it "was unable to detect" an accelerator and is
    "Setting accelerator to CPU", which is its choice on such a machine either way."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def inside_launched_process() -> bool:
    """Whether this process was started by `accelerate launch`/torchrun (which set the rank variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def reports_interruption() -> bool:
    """Whether this process prints the one line a Ctrl-C gets: the process the user started. Processes that
    `trl-thr train` launched leave it to their launcher; under a plain `accelerate launch`, rank 0 prints it."""
    if not inside_launched_process():
        return True
    if os.environ.get(LAUNCHER_VARIABLE):
        return False
    return os.environ.get("RANK", "0") == "0"


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
    preset = None if launch.accelerate_config is None else preset_name(launch.accelerate_config)
    if preset == "single_gpu":
        if (launch.num_processes or 1) > 1 or launch.num_machines > 1:
            raise ValueError(
                "accelerate_config=single_gpu runs one process: drop num_processes/num_machines, or use multi_gpu."
            )
        num_processes = 1
    else:
        num_processes = launch.num_processes or max(gpu_count, 1) * launch.num_machines
    args = []
    if launch.accelerate_config is not None:
        args += ["--config_file", accelerate_config_file(launch.accelerate_config)]
        if preset is not None:
            args += ["--mixed_precision", "no"]  # the training config's bf16/fp16 decides, not the preset's bf16
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

    os.environ[LAUNCHER_VARIABLE] = str(os.getpid())  # inherited by the launched processes
    launch_command(launch_command_parser().parse_args(launch_args + [script] + script_args))


def end_processes(trainer) -> None:
    """Leave the process group together, once every process is done with it, and free it without a deadlock.

    Two ways a finished multi-process run can hang instead of exiting, both seen with gloo on CPU:

    - left to interpreter exit, the group is torn down while Python is being dismantled;
    - the last owner of the group is DDP's C++ reducer, freed with the trainer while holding the GIL: the group's
      destructor then joins gloo's worker threads, one of which is still freeing the tensors of the last
      collective and waits for the GIL (py-spy: `~Reducer` -> `~ProcessGroupGloo` -> `thread::join` on the main
      thread, `~AsyncBarrierWork` -> `gil_scoped_acquire` on the worker).

    So: a barrier (rank 0 finishes later: summary, plot, model, run record), then the group is destroyed, the DDP
    wrapper is freed while a Python handle still holds the group, and the handle drops it last; torch releases the
    GIL when a Python handle destroys a group, so gloo's threads can finish.
    """
    import gc

    import torch.distributed as dist

    from trl_thr._trl_compat import shutdown_colocated_vllm

    shutdown_colocated_vllm(trainer)  # vLLM's own teardown needs the groups that accelerate is about to destroy
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1:
        accelerator.end_training()  # Trainer.end() in transformers >= 5.18: finishes trackers
        return
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed's engine asks the group for ranks while it tears itself down: free it while the group lives.
        accelerator.free_memory()
    group = dist.group.WORLD  # a Python handle on the group, dropped at the end of this function
    accelerator.end_training()  # finishes trackers, destroys the group (the handle keeps it alive)
    trainer.model_wrapped = trainer.model  # the DDP wrapper's other owners: the trainer and the accelerator
    accelerator.free_memory()
    gc.collect()  # the wrapper sits in reference cycles
    del group
