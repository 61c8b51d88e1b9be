"""After every weight sync, vLLM's log-probs of fixed completions equal the trainer's: the linear weights, the norms
and the tied embeddings (which are also the LM head), each changed on its own."""

import pytest
import torch
from colocate import colocate_trainer
from vllm import SamplingParams, TokensPrompt

CHANGES = {
    "linear": lambda name: name.endswith("proj.weight"),
    "norms": lambda name: "norm" in name,
    "embeddings": lambda name: "embed_tokens" in name,
}


def fixed_sequences(tokenizer):
    """Prompt + completion token ids, the same for every check."""
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer("What is 2 + 3?")["input_ids"], tokenizer("Count to three.")["input_ids"]]
    return [ids + torch.randint(3, len(tokenizer), (12,), generator=generator).tolist() for ids in prompts]


def vllm_logprobs(llm, sequences):
    """vLLM's log-prob of every token after the first, as scored by the engine's current weights."""
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in sequences],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
    return [torch.tensor([step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])])
            for out, ids in zip(outputs, sequences)]


def trainer_logprobs(model, sequences):
    with torch.no_grad():
        result = []
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            result.append(logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1))
        return result


def largest_gap(llm, model, sequences):
    return max((a - b).abs().max().item() for a, b in zip(vllm_logprobs(llm, sequences),
                                                          trainer_logprobs(model, sequences)))


@pytest.mark.parametrize("change", list(CHANGES))
def test_vllm_scores_the_trainers_weights_after_each_sync(change, vllm_model_path, tmp_path):
    trainer = colocate_trainer(vllm_model_path, tmp_path)
    llm, model = trainer.vllm_generation.llm, trainer.model
    sequences = fixed_sequences(trainer.processing_class)
    assert largest_gap(llm, model, sequences) < 1e-4  # the engine runs the checkpoint in float32

    generator = torch.Generator().manual_seed(1)
    changed = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if CHANGES[change](name):
                param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean().clamp_min(0.02))
                changed.append(name)
    assert changed
    assert largest_gap(llm, model, sequences) > 1e-2, "the change should move the log-probs well beyond 1e-4"
    trainer.vllm_generation.sync_weights()
    assert largest_gap(llm, model, sequences) < 1e-4, f"{change}: {changed}"


def test_a_prompt_cached_before_a_sync_is_continued_with_the_new_weights(vllm_model_path, tmp_path):
    """vLLM caches a prompt's KV blocks; after a sync they hold the old weights' keys and values. A completion
    sampled from a prompt cached before the sync must be scored by the new weights (the sync resets the cache)."""
    trainer = colocate_trainer(vllm_model_path, tmp_path)
    llm, model = trainer.vllm_generation.llm, trainer.model
    block = llm.llm_engine.vllm_config.cache_config.block_size
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, len(trainer.processing_class), (2 * block + 5,), generator=generator).tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)

    def continued():
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], greedy, use_tqdm=False)
        (completion,) = out.outputs
        tokens = list(completion.token_ids)
        return tokens, torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, tokens)])

    continued()  # fills the prefix cache with the prompt's blocks
    with torch.no_grad():
        for name, param in model.named_parameters():
            if CHANGES["linear"](name):
                param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean().clamp_min(0.02))
    trainer.vllm_generation.sync_weights()
    tokens, logprobs = continued()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
    assert (logprobs - expected).abs().max().item() < 1e-4
