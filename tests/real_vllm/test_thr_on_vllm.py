"""THR of a batch vLLM sampled: equal to THR from a teacher-forced float64 forward of the same completions, read
from TRL's old-log-prob forward when TRL runs one (no extra forward) and from THR's own forward when it does not."""

import gc

import pytest
import torch
from colocate import colocate_trainer
from helpers import same_length_dataset
from trainers import KernelRecorder, full_sequence_forwards
from transformers import AutoModelForCausalLM

from trl_thr.thr import compute_thr


def float64_thr(model_path, batch, recorded_kwargs, temperature):
    """THR from a float64 teacher-forced forward of the batch's prompts and completions, the normaliser exact."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    length = batch["completion_ids"].size(1)
    hidden = hidden[:, -length - 1 : -1]  # the state before each completion token predicts it
    kwargs = {k: v for k, v in recorded_kwargs.items() if k not in ("token_logprobs", "lm_head_bias", "temperature")}
    return compute_thr(hidden, batch["completion_ids"], batch["completion_mask"], model.lm_head.weight,
                       batch["advantages"], 4, temperature=temperature, **kwargs)


@pytest.mark.parametrize("correction", [True, False])
def test_thr_of_a_vllm_batch_equals_a_float64_forwards(correction, vllm_model_path, tmp_path):
    trainer = colocate_trainer(vllm_model_path, tmp_path, "amplify", thr_p=0.3, thr_threshold="none",
                               per_device_train_batch_size=8, vllm_importance_sampling_correction=correction)
    trainer.model.train()
    recorder = KernelRecorder()
    with recorder.patch:
        batch = trainer._generate_and_score_completions(list(same_length_dataset(vllm_model_path))[:2] * 4)
    (thr,) = recorder.outputs
    expected = float64_thr(vllm_model_path, batch, recorder.kwargs[0], trainer.temperature)
    assert (expected != 0).any()
    scale = expected.abs().max().item()
    torch.testing.assert_close(thr.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    assert trainer._metrics["train"].get("thr/own_forward", []) == ([] if correction else [1.0])


@pytest.mark.parametrize("correction", [True, False])
def test_forwards_beyond_grpos_on_the_vllm_path(correction, vllm_model_path, tmp_path):
    """With TRL's importance-sampling correction THR reads TRL's old-log-prob forward (none extra); without it, TRL
    runs no such forward and THR runs one per generation batch, which `thr/own_forward` reports."""
    counts, logs = {}, {}
    for arm in ("grpo", "positive-amplify"):
        trainer = colocate_trainer(vllm_model_path, tmp_path / arm, arm, max_steps=2,
                                   vllm_importance_sampling_correction=correction)
        counts[arm] = full_sequence_forwards(trainer)
        logs[arm] = [entry for entry in trainer.state.log_history if "loss" in entry]
        del trainer
        gc.collect()  # vLLM tears down its process group when its engine is freed: not in the next run's middle
    assert counts["grpo"] == (4 if correction else 2)  # per step: the old-log-prob forward with the correction
    assert counts["positive-amplify"] == counts["grpo"] + (0 if correction else 2)
    own_forward = [entry.get("thr/own_forward") for entry in logs["positive-amplify"]]
    assert own_forward == ([None, None] if correction else [1.0, 1.0])
