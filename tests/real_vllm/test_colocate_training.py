"""GRPOTrainer and THRGRPOTrainer (every strategy) train with vLLM generating on a CPU, in colocate mode."""

import gc

import pytest
import torch
from colocate import colocate_trainer

from trl_thr.thr import STRATEGIES

ARMS = ["grpo", *STRATEGIES]


@pytest.mark.parametrize("arm", ARMS)
def test_colocate_training(arm, vllm_model_path, tmp_path):
    trainer = colocate_trainer(vllm_model_path, tmp_path, arm)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    # After every weight sync vLLM samples from the policy the trainer holds (TRL's own measure of the gap).
    assert max(entry["sampling/sampling_logp_difference/max"] for entry in logs) < 1e-4
    thr_logged = all("thr/kept_frac" in entry for entry in logs)
    assert thr_logged == (arm not in ("grpo", "none")), arm


def test_thr_none_is_grpo_on_vllm(vllm_model_path, tmp_path):
    """thr_strategy='none' is GRPO: the same samples, losses and weights as GRPOTrainer with the same engine."""
    runs = {}
    for arm in ("grpo", "none"):
        trainer = colocate_trainer(vllm_model_path, tmp_path / arm, arm)
        trainer.train()
        runs[arm] = ([entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                     {name: p.detach().clone() for name, p in trainer.model.named_parameters()})
        del trainer
        gc.collect()  # vLLM tears down its process group when its engine is freed: not in the next run's middle
    assert runs["grpo"][0] == runs["none"][0]
    assert any(loss != 0 for loss in runs["grpo"][0])
    for name, param in runs["grpo"][1].items():
        assert torch.equal(param, runs["none"][1][name]), name


def test_sleep_mode_is_refused_before_the_model_loads(vllm_model_path, tmp_path):
    from unittest.mock import patch

    with (patch("trl.trainer.grpo_trainer.VLLMGeneration", side_effect=AssertionError("an engine was built")),
          pytest.raises(ValueError, match="vllm_enable_sleep_mode=True: vLLM's CPU platform has no sleep mode")):
        colocate_trainer(vllm_model_path, tmp_path, vllm_enable_sleep_mode=True)
