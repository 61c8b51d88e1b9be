"""Builders shared by the real-vLLM tests: colocate configs and trainers on the CPU."""

from helpers import CPU, length_reward, same_length_dataset
from trl import GRPOConfig, GRPOTrainer

from trl_thr import THRGRPOConfig, THRGRPOTrainer
from trl_thr._trl_compat import vllm_generation_for_platform


def colocate_kwargs(output_dir, **overrides):
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=8, max_steps=3, logging_steps=1, learning_rate=0.05, seed=0,
                  use_vllm=True, vllm_mode="colocate", **CPU)
    kwargs.update(overrides)
    return kwargs


def colocate_trainer(model_path, output_dir, arm="positive-amplify", **overrides):
    """`GRPOTrainer` (`arm="grpo"`, built the way THRGRPOTrainer builds its engine on a CPU) or `THRGRPOTrainer` with
    `thr_strategy=arm`, generating with vLLM in colocate mode. Prompts of one token length: vLLM runs each prompt
    unpadded, the trainer's forward a padded batch, and only without padding do the two see the same positions."""
    if arm == "grpo":
        args = GRPOConfig(**colocate_kwargs(output_dir, **overrides))
        with vllm_generation_for_platform(args):
            return GRPOTrainer(model=model_path, reward_funcs=length_reward, args=args, train_dataset=same_length_dataset(model_path))
    args = THRGRPOConfig(**colocate_kwargs(output_dir, thr_strategy=arm, **overrides))
    return THRGRPOTrainer(model=model_path, reward_funcs=length_reward, args=args, train_dataset=same_length_dataset(model_path))
