"""THR-GRPO in a minute on CPU, offline: a tiny random model learns to write digits.

    python examples/quickstart.py

Swap `THRGRPOTrainer`/`THRGRPOConfig` for TRL's `GRPOTrainer`/`GRPOConfig` and drop the `thr_*` arguments to get
plain GRPO: nothing else changes.
"""

import tempfile

from datasets import Dataset

from trl_thr import THRGRPOConfig, THRGRPOTrainer
from trl_thr.tiny import build_tiny_model, digit_reward


def main():
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(f"{tmp}/model", hidden_size=32)
        dataset = Dataset.from_dict({"prompt": [f"Count from {n}:" for n in range(64)]})
        args = THRGRPOConfig(
            output_dir=f"{tmp}/run",
            thr_strategy="positive-amplify",  # exploitation; "negative-amplify" for exploration
            thr_p=0.1,
            per_device_train_batch_size=8,
            num_generations=8,
            max_completion_length=16,
            learning_rate=3e-3,
            max_steps=20,
            logging_steps=5,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            save_strategy="no",
        )
        trainer = THRGRPOTrainer(model=model_path, reward_funcs=digit_reward, args=args, train_dataset=dataset)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "reward" in entry]
        print(f"\nreward {logs[0]['reward']:.3f} -> {logs[-1]['reward']:.3f} over {trainer.state.global_step} steps;"
              f" THR kept {logs[-1]['thr/kept_frac']:.0%} of tokens, mean weight {logs[-1]['thr/mean_weight']:.2f}")


if __name__ == "__main__":
    main()
