"""THRGRPOTrainer on a model sharded by FSDP2 over two CPU processes (gloo): the THR weights and `thr/*` metrics
equal a one-process run on the same batch, and a loss backpropagates through the shards.

accelerate builds FSDP only on GPUs, so the worker shards with torch's `fully_shard` itself (see its docstring);
`trl-thr train --accelerate_config fsdp2` on a CPU is refused (test_launch.py)."""

import torch
from helpers import WORKERS, launch_two_processes, length_reward, same_length_dataset
from test_distributed import pad_right
from trainers import distributed_config

from trl_thr import THRGRPOTrainer


def test_fsdp2_two_processes_match_one(tiny_model_path, tmp_path):
    result = launch_two_processes(WORKERS / "fsdp2_run.py", tiny_model_path, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"fsdp2-rank{rank}.pt") for rank in (0, 1)]
    assert all(r["sharded"] for r in ranks), "the LM head was not sharded: the run would not exercise FSDP2"
    assert all(r["head_grad_is_sharded"] and torch.isfinite(r["loss"]) for r in ranks)

    batches = [r["batch"] for r in ranks]
    batch = {key: torch.cat([b[key] for b in batches]) for key in ("prompt_ids", "prompt_mask", "advantages")}
    for key in ("completion_ids", "completion_mask", "thr_weights"):
        batch[key] = pad_right([b[key] for b in batches])
    two_process_weights = batch.pop("thr_weights")

    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward,
                             args=distributed_config(str(tmp_path / "one")),
                             train_dataset=same_length_dataset(tiny_model_path))
    trainer.args.per_device_train_batch_size = 8  # one process holds what the two held
    trainer.model.train()
    logps, hidden = trainer._old_policy_forward(batch)
    thr = trainer._compute_thr(batch, hidden, logps, positive=None)
    one_process_weights = trainer._thr_weights_and_metrics(batch, thr, None, thr_seconds=0.0, forward_seconds=0.0)

    torch.testing.assert_close(one_process_weights, two_process_weights, rtol=1e-5, atol=1e-6)
    kept = (two_process_weights > 0).float().mean()
    assert 0 < kept < 1, "the batch quantile kept everything or nothing: the comparison would be trivial"
    one_process_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("thr/")}
    for rank in ranks:
        compared = {k: v for k, v in rank["metrics"].items() if "seconds" not in k and k != "thr/own_forward"}
        assert compared, "no thr/* metrics were logged"
        for key, value in compared.items():
            assert abs(value - one_process_metrics[key]) <= 1e-5 * max(1.0, abs(value)), key
