"""Two groups of ragged completions of known lengths, for trainer tests that need to know every token: a rollout
that returns them and a trainer that generates through it."""

import torch
from datasets import Dataset
from helpers import CPU
from transformers import AutoTokenizer

from trl_thr import THRGRPOConfig, THRGRPOTrainer

TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 8
# Completion lengths per row (two groups of four). Lengths under the limit end with EOS; 8 is a truncated one. The
# reward is the length, so advantages are known: rows 1 and 3 are the positive set of group 0, rows 4 and 6 of
# group 1.
LENGTHS = [3, 8, 1, 6, 8, 2, 5, 4]
NUM_GENERATIONS = 4


def length_of_completion(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


class RaggedRollout:
    """A `rollout_func` returning fixed random completions of `LENGTHS` tokens, EOS-terminated when short."""

    def __init__(self, tokenizer, seed=0, env_mask=None):
        self.tokenizer = tokenizer
        self.gen = torch.Generator().manual_seed(seed)
        self.env_mask = env_mask  # per-row lists of 0/1, returned as TRL's `env_mask` (0: not the model's tokens)

    def __call__(self, prompts, trainer):
        assert len(prompts) == len(LENGTHS)
        prompt_ids = [self.tokenizer(prompt)["input_ids"] for prompt in prompts]
        completion_ids = []
        for length in LENGTHS:
            ids = torch.randint(3, len(self.tokenizer), (length,), generator=self.gen).tolist()
            if length < MAX_COMPLETION_LENGTH:
                ids[-1] = self.tokenizer.eos_token_id
            completion_ids.append(ids)
        output = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}
        if self.env_mask is not None:
            output["env_mask"] = self.env_mask
        return output


def two_prompts(model_path):
    """Two prompts of the same token length, each repeated for its group (no prompt padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    candidates = [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
    length = len(tokenizer(candidates[0])["input_ids"])
    chosen = [p for p in candidates if len(tokenizer(p)["input_ids"]) == length][:2]
    return [{"prompt": p} for p in chosen for _ in range(NUM_GENERATIONS)]


def ragged_trainer(model_path, output_dir, reward_funcs=length_of_completion, env_mask=None, **overrides):
    """A THRGRPOTrainer on two groups of `LENGTHS` completions (see `RaggedRollout`), amplify without a threshold."""
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=NUM_GENERATIONS,
                  max_completion_length=MAX_COMPLETION_LENGTH, max_steps=1, seed=0, temperature=TEMPERATURE,
                  thr_strategy="amplify", thr_p=0.5, thr_threshold="none", **CPU)
    kwargs.update(overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = THRGRPOTrainer(model=model_path, reward_funcs=reward_funcs, args=THRGRPOConfig(**kwargs),
                             train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}),
                             rollout_func=RaggedRollout(tokenizer, env_mask=env_mask))
    trainer.model.train()  # as inside `train()`: metrics go to `_metrics["train"]`
    return trainer
