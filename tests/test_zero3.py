"""DeepSpeed ZeRO-3 on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched with TRL's `zero3` preset:
THR reads the partitioned LM head through TRL's gather, and its weights and `thr/*` metrics equal a one-process
run's on the same data."""

import importlib.resources

import pytest
import torch
from helpers import WORKERS, launch_two_processes, length_reward, same_length_dataset
from test_distributed import pad_right
from trainers import distributed_config

from trl_thr import THRGRPOTrainer

pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra: pip install -e '.[dev]'")


def test_zero3_two_processes_match_one(tiny_model_path, tmp_path):
    zero3 = importlib.resources.files("trl.accelerate_configs") / "zero3.yaml"
    result = launch_two_processes(WORKERS / "zero3_run.py", tiny_model_path, tmp_path, config_file=zero3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [(tmp_path / f"distributed-type-rank{r}").read_text() for r in (0, 1)] == ["DistributedType.DEEPSPEED"] * 2

    ranks = [torch.load(tmp_path / f"batch-rank{rank}.pt") for rank in (0, 1)]
    assert all(r["sharding"] == "deepspeed-zero3" and r["local_elements"] == 0 for r in ranks), \
        "the LM head was not partitioned: the run would not exercise ZeRO-3"
    batch = {key: torch.cat([r[key] for r in ranks]) for key in ("prompt_ids", "prompt_mask", "advantages")}
    for key in ("completion_ids", "completion_mask", "thr_weights"):
        batch[key] = pad_right([r[key] for r in ranks])
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
    logged = torch.load(tmp_path / "log_history.pt")[0]
    one_process = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("thr/")}
    compared = {k: v for k, v in logged.items() if k.startswith("thr/") and "seconds" not in k
                and k != "thr/own_forward"}
    assert compared, "no thr/* metrics were logged"
    for key, value in compared.items():
        assert abs(value - one_process[key]) <= 1e-5 * max(1.0, abs(value)), key
