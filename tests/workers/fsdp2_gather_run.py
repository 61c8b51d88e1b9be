"""Launched by test_fsdp2_gather.py under `torch.distributed.run --nproc_per_node 2` (CPU, gloo): an LM head whose
weight and bias are DTensors sharded by rows over a 2-process mesh, as FSDP2 leaves them, read through
`full_lm_head`. Each rank saves what it got and its own shard."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from trl_thr._trl_compat import full_lm_head, lm_head_sharding  # what THRGRPOTrainer reads its LM head through

VOCAB, HIDDEN = 10, 4


def main(output_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same full head on every rank
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    full_weight, full_bias = head.weight.detach().clone(), head.bias.detach().clone()
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    head.bias = torch.nn.Parameter(distribute_tensor(head.bias.detach(), mesh, [Shard(0)]))
    assert lm_head_sharding(head.weight) == "dtensor"
    with full_lm_head(head) as (weight, bias):
        got = {
            "weight": weight.detach().clone(),
            "bias": bias.detach().clone(),
            "weight_is_dtensor": isinstance(weight, DTensor),
            "bias_is_dtensor": isinstance(bias, DTensor),
        }
    torch.save({**got, "full_weight": full_weight, "full_bias": full_bias,
                "local_rows": head.weight.to_local().size(0)}, Path(output_dir) / f"head-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
