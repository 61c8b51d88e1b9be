"""An ordinary TRL GRPO script. Switching it to THR is the import line below; nothing else changes.

    python examples/drop_in.py                          # a tiny local model, seconds on a CPU, offline
    python examples/drop_in.py --model Qwen/Qwen2.5-0.5B-Instruct --max_steps 200 --use_cpu false

The THR defaults (positive-amplify, p = 0.1) apply; pass thr_* arguments to GRPOConfig to change them.
"""

import argparse
import tempfile

from datasets import Dataset

# from trl import GRPOConfig, GRPOTrainer
from trl_thr import THRGRPOConfig as GRPOConfig, THRGRPOTrainer as GRPOTrainer  # noqa: I001 - the one-line swap


def reward_len(completions, **kwargs):
    """TRL's quick-start reward: completions close to 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="hub id or path; default: a tiny random local model")
    parser.add_argument("--max_steps", type=int, default=5)
    parser.add_argument("--output_dir", default="outputs/drop-in")
    parser.add_argument("--use_cpu", default="true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from trl_thr.tiny import build_tiny_model

            model = build_tiny_model(tmp)
        dataset = Dataset.from_dict({"prompt": [f"Tell me about the number {n}." for n in range(32)]})
        on_cpu = args.use_cpu.lower() == "true"
        training_args = GRPOConfig(
            output_dir=args.output_dir,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=16,
            max_steps=args.max_steps,
            logging_steps=1,
            learning_rate=1e-3 if args.model is None else 1e-6,
            use_cpu=on_cpu,
            bf16=not on_cpu,
            gradient_checkpointing=not on_cpu,
            report_to="none",
            save_strategy="no",
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=training_args, train_dataset=dataset)
        trainer.train()
        last = [entry for entry in trainer.state.log_history if "reward" in entry][-1]
        print({key: round(value, 4) for key, value in last.items() if key == "reward" or key.startswith("thr/")})


if __name__ == "__main__":
    main()
