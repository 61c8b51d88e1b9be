"""A tiny random causal LM with a real tokenizer, built locally in a second: for tests, examples and smoke runs
on machines without access to a model hub. It learns nothing useful; it exercises every code path."""

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
# The width that gives the 4 attention heads head_dim 64: vLLM's CPU attention does not take the default's head_dim 4.
VLLM_READY_HIDDEN_SIZE = 256


def build_tiny_model(directory, model_type: str = "qwen2", hidden_size: int = 16, seed: int = 0) -> str:
    """Save a 2-layer `model_type` ("qwen2" or "llama") model and a byte-level BPE ChatML tokenizer to `directory`.

    Returns the directory as a string, ready for `from_pretrained` or `THRGRPOTrainer(model=...)`. For vLLM, pass
    `hidden_size=VLLM_READY_HIDDEN_SIZE`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

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


def digit_reward(completions, **kwargs) -> list[float]:
    """Fraction of the completion's characters that are digits.

    A reward a random tiny model can climb: it varies within every group, so advantages are not all 0. For smoke
    runs (`trl-thr train --config tiny_cpu`, `examples/quickstart.py`), not for real training.
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]
