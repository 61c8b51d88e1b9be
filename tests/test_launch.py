"""Launch logic (accelerate presets, arguments) and LM-head gathering under sharding, decided on CPU."""

import contextlib
import sys
import importlib.resources
from unittest.mock import patch

import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser

from trl_thr.cli.launch import (
    ACCELERATE_PRESET_ALIASES,
    TRL_ACCELERATE_PRESETS,
    LaunchArguments,
    accelerate_config_file,
    accelerate_launch_args,
    inside_launched_process,
    wants_launch,
)
from trl_thr._trl_compat import full_lm_head, lm_head_sharding

TRL_PRESET_DIR = importlib.resources.files("trl.accelerate_configs")


def accelerate_view(launch: LaunchArguments, gpu_count: int = 0):
    """What `accelerate launch` makes of our arguments, through accelerate's own validation of them."""
    from accelerate.commands.launch import _validate_launch_command

    args = launch_command_parser().parse_args(accelerate_launch_args(launch, gpu_count) + ["train.py"])
    return _validate_launch_command(args)[0]


def test_trl_presets_are_the_ones_trl_ships():
    shipped = {p.name.removesuffix(".yaml") for p in TRL_PRESET_DIR.iterdir() if p.name.endswith(".yaml")}
    assert set(TRL_ACCELERATE_PRESETS) == shipped


@pytest.mark.parametrize("name", TRL_ACCELERATE_PRESETS + tuple(ACCELERATE_PRESET_ALIASES))
def test_presets_are_trls_own_files(name):
    expected = ACCELERATE_PRESET_ALIASES.get(name, name)
    assert accelerate_config_file(name) == str(TRL_PRESET_DIR.joinpath(f"{expected}.yaml"))


@pytest.mark.parametrize(
    "alias,expected",
    [
        ("ddp", {"distributed_type": "MULTI_GPU"}),
        ("fsdp", {"distributed_type": "FSDP", "fsdp_config.fsdp_version": 2,
                  "fsdp_config.fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}),
        ("zero2", {"distributed_type": "DEEPSPEED", "deepspeed_config.zero_stage": 2,
                   "deepspeed_config.zero3_init_flag": False}),
        ("zero3", {"distributed_type": "DEEPSPEED", "deepspeed_config.zero_stage": 3,
                   "deepspeed_config.zero3_init_flag": True, "deepspeed_config.zero3_save_16bit_model": True}),
    ],
)
def test_our_old_preset_names_keep_their_meaning(alias, expected):
    config = yaml.safe_load(open(accelerate_config_file(alias)))
    for key, value in expected.items():
        section, _, name = key.rpartition(".")
        assert (config[section] if section else config)[name] == value, key


@pytest.mark.parametrize("preset", ["multi_gpu", "ddp", "zero2", "zero3", "fsdp1", "fsdp2"])
def test_presets_leave_process_count_and_precision_to_us(preset):
    """TRL's files say 8 processes in bf16; the given count and the training config's precision win."""
    config = yaml.safe_load(open(accelerate_config_file(preset)))
    assert config["num_processes"] == 8 and config["mixed_precision"] == "bf16"
    args = accelerate_view(LaunchArguments(num_processes=4, accelerate_config=preset))
    assert args.config_file == accelerate_config_file(preset)
    assert args.num_processes == 4 and args.mixed_precision == "no"


def test_multi_gpu_without_gpus_is_two_torchrun_workers():
    """On a CPU machine `multi_gpu` (like `ddp`) goes to accelerate's multi-GPU launcher: torchrun, gloo."""
    for name in ("multi_gpu", "ddp"):
        args = accelerate_view(LaunchArguments(num_processes=2, accelerate_config=name), gpu_count=0)
        assert args.multi_gpu and not (args.use_deepspeed or args.use_fsdp or args.cpu)
        assert args.num_processes == 2 and args.mixed_precision == "no"


def test_single_gpu_is_one_process():
    args = accelerate_view(LaunchArguments(accelerate_config="single_gpu"), gpu_count=8)
    assert args.num_processes == 1 and not args.multi_gpu
    with pytest.raises(ValueError, match="single_gpu runs one process"):
        accelerate_launch_args(LaunchArguments(accelerate_config="single_gpu", num_processes=2), gpu_count=2)


def test_launch_args_without_config_are_data_parallel():
    args = accelerate_launch_args(LaunchArguments(num_processes=2), gpu_count=0)
    assert args[:1] == ["--multi_gpu"] and args[args.index("--num_processes") + 1] == "2"


def test_preset_defaults_to_all_gpus_of_all_machines():
    launch = LaunchArguments(accelerate_config="ddp", num_machines=2, main_process_ip="10.0.0.1")
    args = accelerate_launch_args(launch, gpu_count=8)
    assert args[args.index("--num_processes") + 1] == "16"
    assert args[args.index("--main_process_ip") + 1] == "10.0.0.1" and "--machine_rank" in args


def test_user_config_file_is_used_as_written(tmp_path, monkeypatch):
    path = tmp_path / "my_accelerate.yaml"
    path.write_text("distributed_type: MULTI_GPU\nmixed_precision: fp16\n")
    assert accelerate_config_file(str(path)) == str(path)
    args = accelerate_launch_args(LaunchArguments(num_processes=2, accelerate_config=str(path)), gpu_count=2)
    assert "--mixed_precision" not in args
    (tmp_path / "ddp").write_text("distributed_type: MULTI_GPU\n")  # a file wins over a preset, as in TRL
    monkeypatch.chdir(tmp_path)
    assert accelerate_config_file("ddp") == "ddp"


@pytest.mark.parametrize(
    "launch,message",
    [
        (LaunchArguments(accelerate_config="zero4"), r"neither a TRL preset \(single_gpu, multi_gpu.*ddp=multi_gpu"),
        (LaunchArguments(num_processes=0), "num_processes must be >= 1"),
        (LaunchArguments(num_machines=2), "needs main_process_ip"),
        (LaunchArguments(num_machines=2, machine_rank=2, main_process_ip="h"), r"machine_rank=2 must be in \[0, "),
    ],
)
def test_launch_errors(launch, message):
    with pytest.raises(ValueError, match=message):
        accelerate_launch_args(launch, gpu_count=1)


def test_when_to_launch(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not wants_launch(LaunchArguments())
    assert not wants_launch(LaunchArguments(num_processes=1))
    assert wants_launch(LaunchArguments(num_processes=2))
    assert wants_launch(LaunchArguments(accelerate_config="ddp"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert inside_launched_process() and not wants_launch(LaunchArguments(num_processes=2))


def test_whole_lm_head_is_used_as_is():
    head = torch.nn.Linear(4, 10, bias=True)
    assert lm_head_sharding(head.weight) is None
    with full_lm_head(head) as (weight, bias):
        assert weight is head.weight and bias is head.bias


def test_zero3_lm_head_is_gathered_through_trl():
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 adds to partitioned parameters
    assert lm_head_sharding(head.weight) == "deepspeed-zero3"
    entered = []

    @contextlib.contextmanager
    def fake_gather(*params):
        entered.append(params)
        yield

    with patch("trl_thr._trl_compat.maybe_gather_lm_head_ctx", fake_gather):
        with full_lm_head(head) as (weight, bias):
            assert entered == [(head.weight, None)] and weight is head.weight


def test_fsdp2_dtensor_lm_head_is_gathered(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.randn(10, 4)
        head = torch.nn.Linear(4, 10, bias=False)
        head.weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        assert lm_head_sharding(head.weight) == "dtensor"
        with full_lm_head(head) as (weight, bias):
            assert not isinstance(weight, DTensor)
            torch.testing.assert_close(weight, full)
            assert bias is None
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "num_processes,distributed_type,expected",
    [
        (2, "MULTI_CPU", ["wait_for_everyone", "end_training", "free_memory"]),
        # DeepSpeed's engine needs the group while it tears down: freed before the group goes (test_zero3.py runs it)
        (2, "DEEPSPEED", ["wait_for_everyone", "free_memory", "end_training", "free_memory"]),
        (1, "NO", ["end_training"]),
    ],
)
def test_training_processes_leave_the_group_together_before_exit(num_processes, distributed_type, expected):
    """Every process waits for the others, destroys the group itself rather than at interpreter exit, and frees the
    DDP wrapper before the last handle on the group goes."""
    from trl_thr.cli.launch import end_processes

    calls = []

    class Accelerator:
        def __init__(self):
            self.num_processes = num_processes
            self.distributed_type = distributed_type

        def wait_for_everyone(self):
            calls.append("wait_for_everyone")

        def end_training(self):
            calls.append("end_training")

        def free_memory(self):
            calls.append("free_memory")

    class Trainer:
        accelerator = Accelerator()
        model = object()
        model_wrapped = object()

    end_processes(Trainer)
    assert calls == expected
    assert (Trainer.model_wrapped is Trainer.model) is (num_processes > 1)


@pytest.mark.parametrize(
    "variables, prints",
    [
        ({}, True),  # the process the user started
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "RANK": "0", "TRL_THR_LAUNCHER_PID": "123"}, False),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1", "TRL_THR_LAUNCHER_PID": "123"}, False),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2", "RANK": "0"}, True),  # a plain `accelerate launch`: rank 0 only
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1"}, False),
    ],
)
def test_an_interruption_is_reported_once_per_run(variables, prints, monkeypatch, capsys):
    """Ctrl-C reaches the launcher and every launched process: only one of them prints the line."""
    import types

    from trl_thr import cli

    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "TRL_THR_LAUNCHER_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "interrupted", ("fake_interrupted_command", ""))
    monkeypatch.setitem(sys.modules, "fake_interrupted_command", types.SimpleNamespace(main=interrupted))
    assert cli.run("interrupted", []) == 130
    assert ("trl-thr interrupted: interrupted:" in capsys.readouterr().err) is prints
