"""Sampling completions for evaluation and analysis: vLLM when available, else batched `transformers` generation.

Both backends take the same request (a rendered prompt, how many samples, sampling settings, a seed) and return the
same thing: for each sample its text and token ids. Each problem is seeded on its own (`seed + index`), so a resumed
run draws the same samples as an uninterrupted one.
"""

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 3072

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclass
class Sample:
    text: str
    token_ids: list[int]


def render_prompt(tokenizer, prompt) -> str:
    """The text a model sees: raw prompts as they are, chat prompts through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise ValueError(
            "the prompt template produces chat messages but the tokenizer has no chat template; use "
            "prompt_template=r1 or a base-model template that renders raw text."
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def adapter_has_tokenizer(adapter: str | None) -> bool:
    """Whether an adapter was saved with its own tokenizer (e.g. by trl-thr train), which is then preferred."""
    return adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()


def load_model_and_tokenizer(model_name_or_path: str, adapter: str | None = None, dtype: str = "auto", device=None):
    """A causal LM (optionally with a LoRA adapter merged in) in eval mode, and its tokenizer (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An adapter saved with its tokenizer (e.g. by trl-thr train) may have added tokens: prefer it.
    tokenizer = AutoTokenizer.from_pretrained(adapter if adapter_has_tokenizer(adapter) else model_name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={dtype!r} must be auto, bfloat16, float16 or float32.")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


class TransformersGenerator:
    """Batched `model.generate`: the samples of one prompt in chunks of `batch_size` sequences."""

    name = "transformers"

    def __init__(self, model, tokenizer, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompt_text: str, num_samples: int, settings: SamplingSettings, seed: int) -> list[Sample]:
        inputs = self.tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        greedy = settings.temperature == 0
        kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": settings.temperature,
                                                      "top_p": settings.top_p}
        torch.manual_seed(seed)
        samples = []
        for start in range(0, num_samples, self.batch_size):
            count = min(self.batch_size, num_samples - start)
            output = self.model.generate(
                **inputs, max_new_tokens=settings.max_new_tokens, num_return_sequences=count,
                pad_token_id=self.tokenizer.pad_token_id, **kwargs,
            )
            for row in output[:, inputs["input_ids"].size(1) :].tolist():
                ids = _until_eos(row, self._stop_ids())
                samples.append(Sample(self.tokenizer.decode(ids, skip_special_tokens=True), ids))
        return samples

    def _stop_ids(self) -> set[int]:
        stop = self.model.generation_config.eos_token_id
        stop = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
        stop.add(self.tokenizer.eos_token_id)
        return {i for i in stop if i is not None}


def _until_eos(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Token ids up to and including the first stop token (generate pads after it)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1]
    return ids


def checkpoint_dtype(model_name_or_path: str) -> str:
    """The dtype a checkpoint's config.json names (`dtype`, or `torch_dtype` in older configs); float32 if none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return str(dtype).removeprefix("torch.")


def vllm_dtype(model_name_or_path: str, dtype: str) -> str:
    """The dtype the vLLM backend runs: `dtype` as asked, but `auto` on vLLM's CPU platform is the checkpoint's own
    (vLLM's `auto` runs a float32 checkpoint in bfloat16 there), as `trl-thr train` gives its colocated engine."""
    from trl_thr._trl_compat import vllm_runs_on_cpu

    if dtype == "auto" and vllm_runs_on_cpu():
        return checkpoint_dtype(model_name_or_path)
    return dtype


class VLLMGenerator:
    """vLLM's offline engine: the fast path for many samples per problem on GPUs."""

    name = "vllm"

    def __init__(self, model_name_or_path: str, tokenizer, seed: int = 0, **engine_kwargs):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_name_or_path, seed=seed, **engine_kwargs)

    def generate(self, prompt_text: str, num_samples: int, settings: SamplingSettings, seed: int) -> list[Sample]:
        from vllm import SamplingParams

        params = SamplingParams(n=num_samples, temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_new_tokens, seed=seed)
        (request,) = self.llm.generate([prompt_text], params, use_tqdm=False)
        return [Sample(output.text, list(output.token_ids)) for output in request.outputs]


def choose_backend(backend: str) -> str:
    """`"vllm"` or `"transformers"` for `backend` in `auto`, `vllm`, `transformers`."""
    from trl.import_utils import is_vllm_available

    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'vllm' or 'transformers'.")
    if backend == "vllm" and not is_vllm_available():
        raise ImportError('backend=vllm needs vLLM: pip install "trl-thr[vllm]".')
    if backend == "auto":
        return "vllm" if is_vllm_available() and torch.cuda.is_available() else "transformers"
    return backend
