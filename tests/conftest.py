import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import start_study, tiny_dataset, train_invocations  # noqa: E402

from trl_thr.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A 2-layer Qwen2 with a byte-level BPE tokenizer, saved locally (no hub)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_train_dataset():
    return tiny_dataset()


# Tiny models beyond the default tied Qwen2: an untied head, a soft-capped head (Gemma 2), a scaled head (Cohere).
# Weights are drawn larger than the default 0.02 so that logits are O(1): a transform that is wrong (temperature,
# scale, soft-cap) then changes the softmax residuals by far more than float32 round-off.
VARIANTS = {
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "gemma2-softcap": ("Gemma2Config", dict(head_dim=4, query_pre_attn_scalar=4, final_logit_softcapping=2.0,
                                            attn_logit_softcapping=None, sliding_window=64)),
    "cohere-scale": ("CohereConfig", dict(logit_scale=2.5)),
}


@pytest.fixture(scope="session")
def tiny_variant_path(tiny_model_path, tmp_path_factory):
    """`tiny_variant_path(name, dtype=torch.float32)`: one of `VARIANTS` with the tiny tokenizer, saved locally."""
    import torch
    import transformers

    built = {}

    def build(name, dtype=None):
        dtype = dtype or torch.float32
        key = (name, str(dtype))
        if key not in built:
            config_name, overrides = VARIANTS[name]
            tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_path)
            config = getattr(transformers, config_name)(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, **overrides,
            )
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
            model.generation_config = transformers.GenerationConfig(
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
            )
            directory = tmp_path_factory.mktemp(f"tiny-{name}")
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            built[key] = str(directory)
        return built[key]

    return build


@pytest.fixture(scope="session")
def local_tiny_study(tmp_path_factory):
    """The packaged tiny study made by local workers as a user might: one worker is killed (kill -9 on its process
    group) after its first run, then two start together. What happened, for test_study.py to check, and the finished
    directory, which other tests read (and copy before changing)."""
    import os
    import signal
    import time

    directory = tmp_path_factory.mktemp("local-tiny-study") / "study"
    first = start_study(directory)
    deadline = time.time() + 300
    while not list((directory / "records").glob("*.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    seen = {"directory": directory, "first_output": first.stdout.read(),
            "finished_first": [path.stem for path in (directory / "records").glob("*.json")],
            "started_before": train_invocations(directory)}
    workers = [start_study(directory) for _ in range(2)]
    seen["outputs"] = [worker.communicate(timeout=600)[0] for worker in workers]
    seen["returncodes"] = [worker.returncode for worker in workers]
    return seen
