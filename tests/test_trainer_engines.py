"""THRGRPOTrainer on TRL's generation back-ends other than `generate`: vLLM in colocate and in server mode, each with
the engine mocked (vLLM is never installed on a CPU machine), and TRL's install hint when vLLM is missing."""

from unittest.mock import patch

import pytest
import torch
from helpers import CPU, length_reward, tiny_dataset
from trainers import KernelRecorder, changed, count_generation_forwards, make_config, snapshot

from trl_thr import THRGRPOConfig, THRGRPOTrainer


class FakeVLLMGeneration:
    """Stands in for trl's VLLMGeneration: samples token ids and returns a log-prob per token."""

    def __init__(self, model, processing_class, max_completion_length, **kwargs):
        self.vocab = len(processing_class)
        self.max_completion_length = max_completion_length
        self.eos = processing_class.eos_token_id
        self.syncs = 0
        self.gen = torch.Generator().manual_seed(0)

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        completions, logprobs = [], []
        for _ in prompts:
            n = int(torch.randint(1, self.max_completion_length, (1,), generator=self.gen))
            ids = torch.randint(3, self.vocab, (n,), generator=self.gen).tolist() + [self.eos]
            completions.append(ids)
            logprobs.append([[-2.0] for _ in ids])
        return prompts, completions, logprobs, None


@pytest.mark.parametrize("correction", [True, False])
def test_vllm_generation_path(correction, tiny_model_path, tmp_path):
    args = make_config(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=correction)
    with patch("trl.trainer.grpo_trainer.VLLMGeneration", FakeVLLMGeneration):
        trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                                 train_dataset=tiny_dataset())
    calls, batch = count_generation_forwards(trainer)
    assert calls == 1  # TRL's own importance-sampling forward, or THR's one
    assert ("importance_sampling_ratio" in batch) == correction
    assert batch["thr_weights"].shape == batch["completion_ids"].shape
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert trainer.vllm_generation.syncs >= 1


def test_vllm_missing_gives_trls_install_hint(tiny_model_path, tmp_path):
    args = make_config(tmp_path, use_vllm=True)
    with pytest.raises(ImportError, match="vLLM"):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())


class FakeVLLMServerGeneration(FakeVLLMGeneration):
    """Stands in for trl's VLLMGeneration in server mode: no server; samples ids and per-token log-probs."""

    def __init__(self, model, processing_class, max_completion_length, **kwargs):
        assert kwargs.get("mode", "server") == "server"
        super().__init__(model, processing_class, max_completion_length, **kwargs)
        self.vllm_client = self  # TRL asks the server how it computes log-probs

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}


@pytest.mark.parametrize("correction", [True, False])
def test_vllm_server_mode(correction, tiny_model_path, tmp_path):
    """THR's data flow in vLLM server mode (the generation backend mocked). The trainer runs on CPU here, where a
    real server is refused (next test): the fake server needs no NCCL weight transfer."""
    from unittest.mock import patch

    args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, seed=0, use_vllm=True, vllm_mode="server",
                         vllm_importance_sampling_correction=correction, **CPU)
    with (patch("trl.trainer.grpo_trainer.VLLMGeneration", FakeVLLMServerGeneration),
          patch("trl_thr._trl_compat.vllm_refusal", return_value=None)):
        trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args,
                                 train_dataset=tiny_dataset())
    recorder = KernelRecorder()
    with recorder.patch:
        trainer.train()
    assert len(recorder.outputs) == 1 and trainer.vllm_generation.syncs >= 1
    assert "thr/kept_frac" in trainer.state.log_history[0]


def test_vllm_server_mode_on_cpu_is_refused_up_front(tiny_model_path, tmp_path):
    """TRL would wait for the server, then fail in its NCCL weight transfer: refused before anything loads."""
    from unittest.mock import patch

    args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, use_vllm=True, vllm_mode="server", **CPU)
    built = []
    with (patch("trl.trainer.grpo_trainer.VLLMGeneration", lambda *a, **k: built.append(1)),
          pytest.raises(ValueError, match="vllm_mode='server' needs the trainer on a CUDA device.*colocate")):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
    assert not built  # refused before TRL's client would wait for a server


def test_fsdp_config_that_accelerate_did_not_build_is_refused(tiny_model_path, tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP config on a CPU: accelerate builds DDP and says nothing; the trainer says."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = THRGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, **CPU)
    with pytest.raises(ValueError, match="asks for FSDP, which accelerate builds only on GPUs.*multi_gpu"):
        THRGRPOTrainer(model=tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=tiny_dataset())
