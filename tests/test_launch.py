"""Launch logic (accelerate presets, arguments) and LM-head gathering under sharding, decided on CPU."""

import contextlib
from unittest.mock import patch

import pytest
import torch
import yaml
from accelerate.commands.launch import launch_command_parser

from trl_thr.cli.launch import (
    ACCELERATE_PRESETS,
    LaunchArguments,
    accelerate_config_file,
    accelerate_launch_args,
    inside_launched_process,
    wants_launch,
)
from trl_thr.thr_grpo_trainer import full_lm_head, lm_head_sharding


@pytest.mark.parametrize("preset", ACCELERATE_PRESETS)
def test_presets_are_shipped_and_valid(preset):
    path = accelerate_config_file(preset)
    config = yaml.safe_load(open(path))
    assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
    assert config["mixed_precision"] == "no"  # the training config's bf16/fp16 decides
    args = launch_command_parser().parse_args(accelerate_launch_args(
        LaunchArguments(num_processes=4, accelerate_config=preset), gpu_count=0) + ["train.py"])
    assert args.config_file == path and args.num_processes == 4


def test_launch_args_without_config_are_data_parallel():
    args = accelerate_launch_args(LaunchArguments(num_processes=2), gpu_count=0)
    assert args[:1] == ["--multi_gpu"] and args[args.index("--num_processes") + 1] == "2"


def test_preset_defaults_to_all_gpus_of_all_machines():
    launch = LaunchArguments(accelerate_config="ddp", num_machines=2, main_process_ip="10.0.0.1")
    args = accelerate_launch_args(launch, gpu_count=8)
    assert args[args.index("--num_processes") + 1] == "16"
    assert args[args.index("--main_process_ip") + 1] == "10.0.0.1" and "--machine_rank" in args


def test_user_config_file(tmp_path):
    path = tmp_path / "my_accelerate.yaml"
    path.write_text("distributed_type: MULTI_GPU\n")
    assert accelerate_config_file(str(path)) == str(path)


@pytest.mark.parametrize(
    "launch,message",
    [
        (LaunchArguments(accelerate_config="zero4"), "neither a preset"),
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

    with patch("trl_thr.thr_grpo_trainer.maybe_gather_lm_head_ctx", fake_gather):
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
