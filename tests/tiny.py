"""Tiny offline model, data and rewards for trainer tests."""

from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is two plus three? The answer is five.",
    "Add seven and one to get eight. Four minus two is two.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12. Solve, think, answer, boxed.",
] * 20
PROMPTS = [
    "What is 2 + 3?",
    "What is 7 + 1?",
    "What is 4 - 2?",
    "What is 6 + 6?",
    "Add 5 and 4.",
    "Subtract 3 from 9.",
    "What is 1 + 1?",
    "What is 8 - 5?",
]


def build_tiny_model(directory, model_type: str = "qwen2", hidden_size: int = 16, seed: int = 0) -> str:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    from transformers import Qwen2ForCausalLM

    directory = Path(directory)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if model_type == "qwen2" else (LlamaConfig,
                                                                                          LlamaForCausalLM)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=32,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_dataset(num_prompts: int = 8, conversational: bool = False):
    from datasets import Dataset

    prompts = PROMPTS[:num_prompts]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict({"prompt": prompts})


def length_reward(completions, **kwargs):
    """Varies within every group (random completions have random lengths), so advantages are not 0."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(t) % 7) for t in texts]


def binary_reward(completion_ids, **kwargs):
    """0/1 "correctness": even number of tokens. Gives groups with a single positive, none, or all."""
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def same_length_dataset(model_path, num_prompts: int = 8):
    """Prompts that tokenize to the same length, so a batch needs no prompt padding wherever it is cut."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [p for p, n in zip(prompts, lengths) if n == common][:num_prompts]
    assert len(chosen) == num_prompts
    return Dataset.from_dict({"prompt": chosen})
