"""One prepared check of trl-thr on one GPU: cost, numerics and memory of THR at Qwen2.5-1.5B's shape.

Run once on the GPU machine (one H100/H200 with torch, transformers, accelerate and peft but no trl or datasets),
from the repository root, with the wheels of `../shared/gpu/wheels` (and `wheels-fallback`) copied into `.gpu/`
(ignored by git) and carried along. This one line installs them into a temporary folder, picks the datasets wheels
that match the installed pyarrow, and runs the check with a hard timeout; results land in `$OUT/results.json`:

    SITE=$(mktemp -d) && WHL=$(python3 -c 'import pyarrow as p; print(".gpu/wheels-fallback/*.whl .gpu/wheels/trl-*.whl" if int(p.__version__.split(".")[0]) < 24 else ".gpu/wheels/*.whl")') && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $WHL && PYTHONPATH="$SITE:$PWD/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 timeout 470 python3 benchmarks/gpu_check.py --out "$OUT"

On a CPU, the same phases run at a tiny scale in about a minute (the test suite runs this):

    python benchmarks/gpu_check.py --scale tiny --device cpu --out outputs/thr-check

Phases, in this order; `results.json` is rewritten atomically when each starts and ends, so a kill at any moment
leaves every finished phase on disk, and a failing phase records its error and traceback while the others run:

- `environment`: versions (python, torch, CUDA, triton, transformers, accelerate, trl, datasets, peft, deepspeed),
  device name and memory, the `thr_*` fields of `THRGRPOConfig`;
- `kernel`: `trl_thr.thr.compute_thr` (sampled and full vocabulary) vs TRL's fused LM-head log-prob pass (the
  `ChunkedLogProbFunction` call of `trl.trainer.utils.add_fused_lm_head`) over the same tokens at d = 1536,
  V = 151,936: time, peak memory, CUDA host syncs, and the algorithmic bound `2 |V'| / V` next to the ratio;
- `numerics`: THR in the shipped precision (bf16 hidden states and head, fp32 accumulation, log-normaliser from
  TRL's bf16 log-probs; and with the streamed fp32 normaliser) vs float64: relative L2 error and the fraction of
  weights that flip under `positive-amplify` with the anchor threshold;
- `generate_capture`: hidden states captured during KV-cache `generate` vs a teacher-forced forward, in bf16, and
  the THR each gives (`trl_thr.generation_capture.GenerationCapture`);
- `trainer_step`: `GRPOTrainer` vs `THRGRPOTrainer` (`thr_hidden_source` "forward" and "generate") on a randomly
  initialised Qwen2.5-1.5B-shaped model with HF generate: per-step wall time after a warm-up, peak memory, and what
  each THR call held (captured states, `|V'|`, the call's own peak);
- `sharded`: a single-process DeepSpeed ZeRO-3 run and an FSDP2 run of `THRGRPOTrainer` through `accelerate
  launch`, each skipped with its reason where it cannot run.

Nothing is asserted: the check measures. `--fail-phase NAME` makes a phase raise at its start (to test that the
others still run). Where TRL's fused-head kernel cannot be imported, the LM-head pass is a chunked float32
log-softmax (the record says which); DeepSpeed, absent on the GPU machine, is skipped with its reason. Timing, memory
and sync counting come from `measure.py`, shared with the other benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import measure
import torch

from trl_thr.files import write_json_atomically

PHASES = ("environment", "kernel", "numerics", "generate_capture", "trainer_step", "sharded")
# Phases are not started with less than this many seconds of the budget left (their expected cost at full scale).
MIN_SECONDS_LEFT = {"environment": 5, "kernel": 40, "numerics": 30, "generate_capture": 30, "trainer_step": 90,
                    "sharded": 60}
# TRL's fused head projects vocabulary chunks of this width (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`).
TRL_VOCAB_CHUNK = 32768


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the check. `h100` is Qwen2.5-1.5B(-Math)'s shape; `tiny` keeps every code path."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_generations: int  # G, completions per prompt
    kernel_groups: int  # groups in the kernel and numerics batch
    kernel_length: int  # completion tokens per row (rows are T/2..T long)
    capture_rows: int
    capture_prompt_length: int
    capture_length: int
    trainer_completion_length: int
    trainer_warmup_steps: int
    trainer_timed_steps: int
    sharded_steps: int
    sharded_completion_length: int
    sharded_timeout_s: int


SCALES = {
    "h100": Scale(hidden_size=1536, vocab_size=151936, num_layers=28, num_heads=12, num_kv_heads=2,
                  intermediate_size=8960, num_generations=8, kernel_groups=2, kernel_length=1024, capture_rows=8,
                  capture_prompt_length=32, capture_length=128, trainer_completion_length=256,
                  trainer_warmup_steps=2, trainer_timed_steps=4, sharded_steps=3, sharded_completion_length=64,
                  sharded_timeout_s=180),
    "tiny": Scale(hidden_size=64, vocab_size=1000, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  num_generations=4, kernel_groups=2, kernel_length=32, capture_rows=4, capture_prompt_length=8,
                  capture_length=12, trainer_completion_length=12, trainer_warmup_steps=1, trainer_timed_steps=2,
                  sharded_steps=2, sharded_completion_length=12, sharded_timeout_s=240),
}


# ---- results on disk -------------------------------------------------------------------------------------------


def error_record(error: BaseException) -> dict:
    """The error in one line and the last frames of its traceback."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"status": "error", "error": f"{type(error).__name__}: {error}".strip()[:2000],
            "traceback": "".join(lines)[-4000:]}


class PhaseFailure(RuntimeError):
    """Raised on purpose by `--fail-phase`."""


# ---- inputs ------------------------------------------------------------------------------------------------------


def synthetic_batch(scale: Scale, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A generation batch whose softmax looks like a language model's, with tokens sampled from it.

    Each hidden state has a target logit 10-16 above the bulk on a Zipf-chosen token, so the group's distinct ids
    `|V'|` are a few thousand at Qwen's shape, as in real completions. Hidden states and head are in `dtype` (bf16,
    the shipped training precision, by default); rows are `T/2..T` tokens long, right-padded; every group has
    positive and negative rows. Returns `hidden (B, T, d)`, `weight (V, d)`, `ids (B, T)`, `mask (B, T)`,
    `advantages (B,)` and `G`.
    """
    gen = torch.Generator().manual_seed(seed)
    d, V, G = scale.hidden_size, scale.vocab_size, scale.num_generations
    B, T = scale.kernel_groups * G, scale.kernel_length
    weight = (torch.randn(V, d, generator=gen) * 0.02).to(device, dtype)
    num_tokens = B * T
    zipf = 1.0 / torch.arange(1, min(V, 3000) + 1, dtype=torch.float64)
    centers = torch.randperm(V, generator=gen)[torch.multinomial(zipf, num_tokens, replacement=True, generator=gen)]
    margin = torch.rand(num_tokens, generator=gen) * 6 + 10
    center_rows = weight[centers.to(device)].float()
    hidden = torch.randn(num_tokens, d, generator=gen).to(device)
    hidden = (hidden + center_rows / center_rows.pow(2).sum(-1, keepdim=True) * margin.to(device)[:, None])
    hidden = hidden.to(dtype)
    ids = torch.empty(num_tokens, dtype=torch.long, device=device)
    rows_per_chunk = max(1, 2**26 // V)
    sample_gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, num_tokens, rows_per_chunk):
        logits = hidden[start : start + rows_per_chunk].float() @ weight.float().T
        ids[start : start + rows_per_chunk] = torch.multinomial(torch.softmax(logits, -1), 1,
                                                                generator=sample_gen).squeeze(1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long().to(device)
    rewards = torch.randint(0, 2, (scale.kernel_groups, G), generator=gen).float()
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group has both signs, so THR applies to every group
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return {"hidden": hidden.view(B, T, d), "weight": weight, "ids": ids.view(B, T), "mask": mask,
            "advantages": advantages.flatten().to(device), "G": G}


def trl_fused_log_probs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs `(B, T)` exactly as TRL 1.16's fused LM head computes them for the trainer.

    `add_fused_lm_head` passes the hidden states and labels of the counted positions to `ChunkedLogProbFunction`
    with the model's weight, bias, temperature, vocabulary chunk, soft-cap and logit scale; this is that call.
    """
    from trl.kernels import ChunkedLogProbFunction

    try:
        from trl.trainer import utils as trl_utils

        chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_VOCAB_CHUNK)
    except ImportError:  # trl.trainer.utils needs datasets and pandas; the kernel itself does not
        chunk = TRL_VOCAB_CHUNK
    counted = mask.bool()
    per_token = ChunkedLogProbFunction.apply(hidden[counted], weight, None, ids[counted], temperature, chunk, None,
                                             1.0, ("log_probs",))
    return torch.zeros(mask.shape, dtype=per_token[0].dtype, device=hidden.device).masked_scatter(counted,
                                                                                                  per_token[0])


def chunked_log_probs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, dtype=torch.float32,
                      chunk_elements: int = 2**26) -> torch.Tensor:
    """Log-probs `(B, T)` over the full vocabulary in `dtype`, token chunks of `chunk_elements` logits at most."""
    flat, targets = hidden.reshape(-1, hidden.size(-1)), ids.reshape(-1)
    out = torch.empty(flat.size(0), dtype=dtype, device=hidden.device)
    rows = max(1, chunk_elements // weight.size(0))
    w = weight.to(dtype)
    for start in range(0, flat.size(0), rows):
        logits = flat[start : start + rows].to(dtype) @ w.T
        out[start : start + rows] = logits.gather(-1, targets[start : start + rows, None]).squeeze(-1) - \
            torch.logsumexp(logits, -1)
    return out.view(ids.shape)


def distinct_ids_per_group(ids: torch.Tensor, mask: torch.Tensor, num_generations: int) -> list[int]:
    """`|V'|` of each group: distinct token ids among its counted tokens."""
    counted = mask.bool()
    return [int(torch.unique(ids[g : g + num_generations][counted[g : g + num_generations]]).numel())
            for g in range(0, ids.size(0), num_generations)]


def thr_weight_flips(thr: torch.Tensor, reference: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     num_generations: int, p: float = 0.1) -> dict:
    """How `thr` differs from `reference` `(B, T)`: relative L2, max abs, sign agreement, flipped weights.

    Weights are the default recipe's: `positive-amplify` with the anchor threshold (beta 1), `p = 0.1`.
    """
    from trl_thr.thr import group_thresholds, thr_weights

    counted = mask.bool()
    a, r = thr[counted].double(), reference[counted].double()

    def weights(values):
        taus = group_thresholds(values.float(), advantages, mask, num_generations, threshold="anchor")
        return thr_weights(values.float(), advantages, mask, num_generations, strategy="positive-amplify", p=p,
                           taus=taus)

    flipped = weights(thr)[counted] != weights(reference)[counted]
    return {"rel_l2": ((a - r).norm() / r.norm().clamp(min=1e-300)).item(), "max_abs": (a - r).abs().max().item(),
            "sign_agree_frac": (a.sign() == r.sign()).double().mean().item(),
            "weights_flipped_frac": flipped.double().mean().item(), "tokens": int(counted.sum())}


def kernel_vs_lm_head(b: dict, device: torch.device, vocabs=("sampled", "full"), repeats: int = 3) -> dict:
    """`compute_thr` vs one LM-head log-prob pass over the same tokens of the batch `b` (see `synthetic_batch`).

    The LM-head pass is TRL's fused head kernel (its `ChunkedLogProbFunction` call), or a chunked float32
    log-softmax where TRL cannot be imported. THR gets that pass's log-probs, as in the trainer. Times are medians
    of `repeats` calls after a warm-up (one call for the full vocabulary); peaks are what each call adds.
    """
    from trl_thr import compute_thr

    G, V = b["G"], b["weight"].size(0)
    res = {"tokens": int(b["mask"].sum()), "rows": b["ids"].size(0), "num_generations": G,
           "hidden_size": b["weight"].size(1), "vocab_size": V,
           "dtype": f"{b['hidden'].dtype} hidden states and head (THR accumulates in float32)"}
    try:
        head = lambda: trl_fused_log_probs(b["hidden"], b["weight"], b["ids"], b["mask"])  # noqa: E731
        head()
        res["lm_head_pass"] = "trl.kernels.ChunkedLogProbFunction (as add_fused_lm_head calls it)"
    except ImportError as error:
        head = lambda: chunked_log_probs(b["hidden"], b["weight"], b["ids"])  # noqa: E731
        res["lm_head_pass"] = f"own chunked float32 log-softmax (TRL's kernel unavailable: {error})"
    log_probs = head()
    distinct = distinct_ids_per_group(b["ids"], b["mask"], G)
    res["distinct_ids_per_group"] = distinct
    # THR needs at least the logits on V' and the projection M h on V' for every token: 2 N |V'| d multiply-adds
    # against the N V d of one LM-head pass.
    res["bound_2V'/V"] = 2 * statistics.fmean(distinct) / V
    res["lm_head_s"] = measure.timed(head, device, repeats)
    peak, res["memory_measured_with"] = measure.peak_tensor_bytes(head, device)
    res["lm_head_peak_MiB"] = measure.mib(peak)

    def thr(vocab):
        return lambda: compute_thr(b["hidden"], b["ids"], b["mask"], b["weight"], b["advantages"], G, vocab=vocab,
                                   token_logprobs=log_probs)

    for vocab in vocabs:
        res[f"thr_{vocab}_s"] = measure.timed(thr(vocab), device, repeats if vocab == "sampled" else 1)
        res[f"thr_{vocab}_peak_MiB"] = measure.mib(measure.peak_tensor_bytes(thr(vocab), device)[0])
        res[f"thr_{vocab}_over_lm_head"] = res[f"thr_{vocab}_s"]["median"] / res["lm_head_s"]["median"]
        res[f"thr_{vocab}_cuda_syncs_per_call"] = measure.count_cuda_syncs(thr(vocab), device)
    if device.type == "cuda" and "sampled" in vocabs:
        previous = torch.backends.cuda.matmul.allow_tf32
        reference = thr("sampled")()
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            res["thr_sampled_tf32_s"] = measure.timed(thr("sampled"), device, repeats)
            res["thr_sampled_tf32_vs_fp32"] = thr_weight_flips(thr("sampled")(), reference, b["advantages"],
                                                               b["mask"], G)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return res


# ---- models ------------------------------------------------------------------------------------------------------


def qwen2_config(scale: Scale, tokenizer):
    """A Qwen2.5-1.5B-shaped (or tiny) `Qwen2Config` with the tokenizer's special ids; weights stay random."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=scale.vocab_size, hidden_size=scale.hidden_size,
                       intermediate_size=scale.intermediate_size, num_hidden_layers=scale.num_layers,
                       num_attention_heads=scale.num_heads, num_key_value_heads=scale.num_kv_heads,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.eos_token_id)


def build_random_model(scale: Scale, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import GenerationConfig, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(scale, tokenizer)).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def tokenizer_at(directory: Path):
    """A small byte-level BPE tokenizer with a ChatML template, built locally (no hub)."""
    from transformers import AutoTokenizer

    from trl_thr.tiny import build_tiny_model

    if not (directory / "tokenizer.json").exists():
        build_tiny_model(directory)
    return AutoTokenizer.from_pretrained(directory)


def id_sum_reward(completion_ids, **kwargs) -> list[float]:
    """Varies within a group for random completions, so advantages are not all 0 and THR has work to do."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def prompt_dataset(num_prompts: int = 64):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"What is {i} + {i + 3}?" for i in range(num_prompts)]})


# The THR arms of `trainer_step` (and of `bench_step.py`): one per hidden-state source.
THR_ARMS = (("thr_forward", {"thr_hidden_source": "forward"}), ("thr_generate", {"thr_hidden_source": "generate"}))


# ---- what THR holds during training ----------------------------------------------------------------------------


@contextlib.contextmanager
def recording_thr_calls(device: torch.device, keep_first_inputs: bool = False):
    """Record every `compute_thr` call the trainer makes: shapes and dtypes of what it holds, `|V'|`, seconds, and
    on CUDA the call's own peak memory. Yields the list of records (filled as calls happen).

    With `keep_first_inputs`, the arguments of each thread's first call with work to do (an active group) are kept
    (its record's `"_inputs"`) so that its memory can be profiled afterwards, outside the timed steps.
    """
    import trl_thr.thr as thr_module
    import trl_thr.thr_grpo_trainer as trainer_module
    from trl_thr.thr import active_groups

    original = thr_module.compute_thr
    records: list[dict] = []
    state = {"running_peak": 0}

    def recorded(hidden_states, completion_ids, completion_mask, lm_head_weight, advantages, num_generations,
                 *args, **kwargs):
        record = {
            "hidden_shape": list(hidden_states.shape), "hidden_dtype": str(hidden_states.dtype),
            "hidden_bytes": hidden_states.numel() * hidden_states.element_size(),
            "lm_head_shape": list(lm_head_weight.shape), "lm_head_dtype": str(lm_head_weight.dtype),
            "lm_head_bytes": lm_head_weight.numel() * lm_head_weight.element_size(),
            "vocab": kwargs.get("vocab", "sampled"),
            "block_elements": kwargs.get("block_elements", thr_module.DEFAULT_BLOCK_ELEMENTS),
            "distinct_ids_per_group": distinct_ids_per_group(completion_ids, completion_mask, num_generations),
            "active_groups": int(active_groups(advantages, completion_mask, num_generations,
                                               kwargs.get("positive_mask")).sum()),
            "thread": threading.current_thread().name,  # which trainer, when several train in turns
        }
        if device.type == "cuda":
            measure.synchronize(device)
            state["running_peak"] = max(state["running_peak"], torch.cuda.max_memory_allocated(device))
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        call = functools.partial(original, hidden_states, completion_ids, completion_mask, lm_head_weight,
                                 advantages, num_generations, *args, **kwargs)
        result, record["seconds"] = measure.clocked(call, device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            state["running_peak"] = max(state["running_peak"], peak)
            record["call_peak_bytes"] = peak - before
        if keep_first_inputs and record["active_groups"] and not any(
                "_inputs" in r and r["thread"] == record["thread"] for r in records):
            record["_inputs"] = ((hidden_states, completion_ids, completion_mask, lm_head_weight, advantages,
                                  num_generations, *args), kwargs)
        records.append(record)
        return result

    patched = (thr_module, trainer_module)  # the trainer calls the name it imported from trl_thr.thr
    for module in patched:
        module.compute_thr = recorded
    try:
        yield records, state
    finally:
        for module in patched:
            module.compute_thr = original


def thr_log_metrics(log_history: list[dict]) -> dict:
    """Every `thr/*` metric the trainer logged, one list per key."""
    keys = sorted({k for entry in log_history for k in entry if k.startswith("thr/")})
    return {k: [entry.get(k) for entry in log_history if k in entry] for k in keys}


def public_records(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


# ---- the check -------------------------------------------------------------------------------------------------


class Check:
    def __init__(self, args):
        self.args = args
        self.scale = SCALES[args.scale]
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        self.out = Path(args.out)
        self.path = self.out / "results.json"
        self.work = Path(tempfile.mkdtemp(prefix="thr-gpu-check-"))  # scratch that does not travel back with $OUT
        self.start = time.time()
        self.results = {
            "command": [sys.executable, *sys.argv], "scale": args.scale, "scale_sizes": asdict(self.scale),
            "device": str(self.device), "budget_s": args.budget_s,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": False,
            "phases": {},
        }
        self._batch = None

    def elapsed(self) -> float:
        return time.time() - self.start

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        write_json_atomically(self.path, self.results)

    def run_phase(self, name: str, fn) -> None:
        phases = self.results["phases"]
        left = self.args.budget_s - self.elapsed()
        needed = MIN_SECONDS_LEFT[name] if self.args.scale == "h100" else 0
        if left < needed:
            phases[name] = {"status": "skipped", "reason": f"{left:.0f} s of the {self.args.budget_s:.0f} s budget "
                                                           f"left, the phase needs about {needed} s"}
            self.save()
            return
        phases[name] = {"status": "running"}
        self.save()
        start = time.time()
        try:
            if name in self.args.fail_phase:
                raise PhaseFailure(f"forced failure of phase {name!r} (--fail-phase)")
            record = {"status": "ok", "results": fn()}
        except Exception as error:  # one failing phase must not hide the others
            record = error_record(error)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        record["seconds"] = round(time.time() - start, 2)
        phases[name] = record
        self.save()
        status = record.get("error", "ok")
        print(f"[gpu_check] {name}: {status} ({record['seconds']} s)", flush=True)

    def batch(self) -> dict:
        if self._batch is None:
            self._batch = synthetic_batch(self.scale, self.device)
        return self._batch

    # ---- phases ----

    def environment(self) -> dict:
        def version(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None

        info = {"python": platform.python_version(), "platform": platform.platform(), "host_cpus": os.cpu_count(),
                "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available":
                torch.cuda.is_available(), "torch_threads": torch.get_num_threads()}
        for package in ("triton", "transformers", "accelerate", "trl", "datasets", "peft", "deepspeed", "pyarrow",
                        "pandas", "numpy", "trl-thr"):
            info[package] = version(package)
        info["trl_importable"] = importlib.util.find_spec("trl") is not None
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(device_name=props.name, device_memory_GiB=round(props.total_memory / 2**30, 2),
                        compute_capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                        bf16_supported=torch.cuda.is_bf16_supported(),
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
            with contextlib.suppress(Exception):
                free, total = torch.cuda.mem_get_info(self.device)
                info["device_memory_free_GiB"] = round(free / 2**30, 2)
        else:
            info["device_name"] = platform.processor() or "cpu"
        try:  # THRGRPOConfig imports TRL, installed on the GPU machine from the carried wheels
            from trl_thr import THRGRPOConfig

            info["thr_config_fields"] = sorted(f.name for f in fields(THRGRPOConfig) if f.name.startswith("thr_"))
        except Exception as error:  # TRL missing or broken: the later phases will say so too
            info["thr_config_fields"] = f"unavailable: {type(error).__name__}: {error}"
        info["load"] = measure.load_averages()
        return info

    def kernel(self) -> dict:
        return kernel_vs_lm_head(self.batch(), self.device)

    def numerics(self) -> dict:
        from trl_thr import compute_thr

        b, G = self.batch(), self.batch()["G"]
        exact = chunked_log_probs(b["hidden"].double(), b["weight"], b["ids"], dtype=torch.float64)
        reference = compute_thr(b["hidden"].double(), b["ids"], b["mask"], b["weight"], b["advantages"], G,
                                token_logprobs=exact)
        try:
            shipped_lp = trl_fused_log_probs(b["hidden"], b["weight"], b["ids"], b["mask"])
            source = "TRL's fused LM head in bf16 (fp32 accumulation)"
        except ImportError as error:
            shipped_lp = chunked_log_probs(b["hidden"], b["weight"], b["ids"])
            source = f"float32 log-softmax of the bf16 inputs (TRL's kernel unavailable: {error})"
        counted = b["mask"].bool()
        lp_error = (shipped_lp.double() - exact)[counted].abs()
        shipped = compute_thr(b["hidden"], b["ids"], b["mask"], b["weight"], b["advantages"], G,
                              token_logprobs=shipped_lp)
        streamed = compute_thr(b["hidden"], b["ids"], b["mask"], b["weight"], b["advantages"], G)
        return {
            "reference": "float64 THR of the same bf16 values, normaliser from float64 log-probs",
            "shipped_log_probs": source,
            "log_prob_abs_error": {"max": lp_error.max().item(), "mean": lp_error.mean().item()},
            "shipped_vs_fp64": thr_weight_flips(shipped, reference, b["advantages"], b["mask"], G),
            "streamed_fp32_normaliser_vs_fp64": thr_weight_flips(streamed, reference, b["advantages"], b["mask"], G),
        }

    def generate_capture(self) -> dict:
        from trl_thr import compute_thr
        from trl_thr.generation_capture import GenerationCapture

        scale, device = self.scale, self.device
        tokenizer = tokenizer_at(self.work / "tokenizer")
        model = build_random_model(scale, tokenizer, device, torch.bfloat16)
        model.eval()
        rows, length, prompt_length = scale.capture_rows, scale.capture_length, scale.capture_prompt_length
        gen = torch.Generator().manual_seed(1)
        # Left-padded prompts of different lengths, the layout TRL hands to generate.
        prompt = torch.randint(300, scale.vocab_size, (rows, prompt_length), generator=gen)
        prompt_mask = torch.ones_like(prompt)
        for row in range(rows):
            pad = row % 3 * (prompt_length // 4)
            prompt[row, :pad], prompt_mask[row, :pad] = tokenizer.pad_token_id, 0
        prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
        weight = model.get_output_embeddings().weight
        generate_kwargs = dict(attention_mask=prompt_mask, do_sample=True, max_new_tokens=length,
                               min_new_tokens=length, top_k=0, top_p=1.0, temperature=1.0, use_cache=True)
        torch.manual_seed(1)
        capture = GenerationCapture.from_model(model, temperature=1.0)
        with torch.no_grad(), capture.recording():
            sequences = model.generate(prompt, **generate_kwargs)
        completion = sequences[:, prompt_length:]
        mask = torch.ones_like(completion)
        aligned = capture.align(completion, mask, weight, prompt_ids=prompt, prompt_mask=prompt_mask)
        if aligned is None:
            raise RuntimeError(f"GenerationCapture.align refused the batch: {capture.reason}")
        captured, lp_captured = aligned
        with torch.no_grad():  # the teacher-forced forward the trainer's forward path runs (TRL passes the mask)
            attention = torch.cat([prompt_mask, mask], dim=1)
            forward = model.base_model(input_ids=sequences, attention_mask=attention).last_hidden_state
        teacher = forward[:, prompt_length - 1 : -1]
        try:
            lp_teacher, teacher_lp_source = trl_fused_log_probs(teacher, weight, completion, mask), "TRL fused head"
        except ImportError:
            lp_teacher, teacher_lp_source = chunked_log_probs(teacher, weight, completion), "float32 log-softmax"
        error = (captured.float() - teacher.float()).norm(dim=-1) / teacher.float().norm(dim=-1)
        advantages = torch.tensor([1.0, -1.0] * (rows // 2), device=device)
        thr_captured = compute_thr(captured, completion, mask, weight, advantages, rows, token_logprobs=lp_captured)
        thr_teacher = compute_thr(teacher, completion, mask, weight, advantages, rows, token_logprobs=lp_teacher)
        return {"capture_method": "trl_thr.generation_capture.GenerationCapture", "dtype": "bfloat16",
                "rows": rows, "completion_tokens": completion.size(1),
                "prompt_padding": "left, 0 / 25 / 50 % of the prompt", "teacher_log_probs": teacher_lp_source,
                "hidden_rel_error": {"mean": error.mean().item(), "max": error.max().item()},
                "log_prob_abs_diff": {"max": (lp_captured - lp_teacher).abs().max().item(),
                                      "mean": (lp_captured - lp_teacher).abs().mean().item()},
                "thr_captured_vs_teacher_forced": thr_weight_flips(thr_captured, thr_teacher, advantages, mask,
                                                                   rows),
                "captured_bytes_per_token": captured.element_size() * captured.size(-1)}

    def trainer_config_kwargs(self, output_dir: Path, steps: int) -> dict:
        scale, cuda = self.scale, self.device.type == "cuda"
        return dict(output_dir=str(output_dir), per_device_train_batch_size=scale.num_generations,
                    gradient_accumulation_steps=2, steps_per_generation=2, num_generations=scale.num_generations,
                    max_completion_length=scale.trainer_completion_length, max_steps=steps, logging_steps=1,
                    report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=cuda,
                    learning_rate=1e-6, seed=0, disable_tqdm=True, dataloader_num_workers=0)

    def trainer_step(self) -> dict:
        from trl import GRPOConfig, GRPOTrainer

        from trl_thr import THRGRPOConfig, THRGRPOTrainer

        scale, device = self.scale, self.device
        tokenizer = tokenizer_at(self.work / "tokenizer")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        steps = scale.trainer_warmup_steps + scale.trainer_timed_steps
        plan = [("grpo", GRPOTrainer, GRPOConfig, {})] + [(n, THRGRPOTrainer, THRGRPOConfig, e) for n, e in THR_ARMS]
        res = {"model": "random Qwen2 " + ("(Qwen2.5-1.5B shape)" if self.args.scale == "h100" else "(tiny)"),
               "generation": "HF generate", "warmup_steps": scale.trainer_warmup_steps,
               "timed_steps": scale.trainer_timed_steps, "arms": {}}
        for name, trainer_cls, config_cls, extra in plan:
            if self.args.scale == "h100" and self.elapsed() > self.args.budget_s - 40:
                res["arms"][name] = {"status": "skipped", "reason": "budget spent"}
                continue
            model = build_random_model(scale, tokenizer, device, dtype)
            clock = measure.step_clock(device)
            config = config_cls(**self.trainer_config_kwargs(self.work / name, steps), **extra)
            trainer = trainer_cls(model=model, reward_funcs=id_sum_reward, args=config,
                                  train_dataset=prompt_dataset(), processing_class=tokenizer, callbacks=[clock])
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with recording_thr_calls(device) as (records, peak_state):
                trainer.train()
            arm = {"step_s": clock.seconds, "timed": measure.summary(clock.seconds[scale.trainer_warmup_steps:]),
                   "thr_metrics": thr_log_metrics(trainer.state.log_history),
                   "thr_calls": public_records(records), "config": extra}
            if device.type == "cuda":
                arm["peak_allocated_GiB"] = max(peak_state["running_peak"],
                                                torch.cuda.max_memory_allocated(device)) / 2**30
            res["arms"][name] = arm
            del trainer, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = res["arms"].get("grpo", {}).get("timed", {}).get("median")
        for name, arm in res["arms"].items():
            median = arm.get("timed", {}).get("median")
            if name != "grpo" and base and median:
                arm["overhead_vs_grpo_pct"] = 100 * (median / base - 1)
            if name != "grpo" and "peak_allocated_GiB" in arm and "peak_allocated_GiB" in res["arms"].get("grpo", {}):
                arm["extra_peak_vs_grpo_GiB"] = arm["peak_allocated_GiB"] - res["arms"]["grpo"]["peak_allocated_GiB"]
        return res

    def sharded(self) -> dict:
        res = {}
        deepspeed_ok = importlib.util.find_spec("deepspeed") is not None
        if not deepspeed_ok:
            res["zero3"] = {"status": "skipped", "reason": "deepspeed is not installed"}
        elif self.device.type != "cuda":
            res["zero3"] = {"status": "skipped", "reason": "DeepSpeed ZeRO-3 needs a CUDA device here"}
        else:
            res["zero3"] = self.launch_sharded("zero3")
        fsdp2 = self.launch_sharded("fsdp2")
        if self.device.type != "cuda" and fsdp2.get("status") == "ok":
            # accelerate shards only on GPUs: on a CPU the same launch trains unsharded. The run still checks the
            # launch and the child; it is not an FSDP2 measurement.
            fsdp2 = {"status": "skipped", "reason": "accelerate runs FSDP2 only on GPUs; on this CPU it trained "
                     f"unsharded (distributed_type {fsdp2.get('distributed_type')})", "unsharded_run": fsdp2}
        res["fsdp2"] = fsdp2
        return res

    def launch_sharded(self, kind: str) -> dict:
        """One `accelerate launch` process running `THRGRPOTrainer` under ZeRO-3 or FSDP2; its record or error."""
        child_out = self.work / f"sharded-{kind}"
        child_out.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--main_process_port", str(port), "--dynamo_backend", "no",
                  "--mixed_precision", "bf16" if self.device.type == "cuda" else "no"]
        if kind == "zero3":
            launch += ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "false"]
        else:
            launch += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                       "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
        launch += [__file__, "--child", kind, "--scale", self.args.scale, "--device", self.device.type,
                   "--out", str(child_out), "--tokenizer", str(self.work / "tokenizer")]
        tokenizer_at(self.work / "tokenizer")
        timeout = self.scale.sharded_timeout_s
        if self.args.scale == "h100":
            timeout = max(30, min(timeout, int(self.args.budget_s - self.elapsed() - 10)))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.time()
        try:
            done = subprocess.run(launch, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as error:
            tail = (error.stderr or b"")[-3000:]
            return {"status": "error", "error": f"timed out after {timeout} s",
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        record_path = child_out / "child.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record["launch_seconds"] = round(time.time() - start, 1)
        record["returncode"] = done.returncode
        if done.returncode != 0 or record.get("status") != "ok":
            record.setdefault("status", "error")
            record.setdefault("error", f"accelerate launch exited with {done.returncode}")
            record["stderr_tail"] = done.stderr[-3000:]
        return record


def run_child(args) -> None:
    """Inside `accelerate launch`: a few THRGRPOTrainer steps under ZeRO-3 or FSDP2; writes child.json."""
    out = Path(args.out)
    record = {"kind": args.child, "status": "running"}
    try:
        from trl_thr import THRGRPOConfig, THRGRPOTrainer
        from trl_thr._trl_compat import lm_head_sharding

        scale = SCALES[args.scale]
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        tokenizer = tokenizer_at(Path(args.tokenizer))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_random_model(scale, tokenizer, device, dtype)  # accelerate shards it in `prepare`
        cuda = device.type == "cuda"
        config = THRGRPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=scale.num_generations,
                               gradient_accumulation_steps=2, steps_per_generation=2,
                               num_generations=scale.num_generations,
                               max_completion_length=scale.sharded_completion_length, max_steps=scale.sharded_steps,
                               logging_steps=1, report_to="none", save_strategy="no", bf16=cuda, use_cpu=False,
                               gradient_checkpointing=False, learning_rate=1e-6, seed=0, disable_tqdm=True)
        clock = measure.step_clock(device)
        trainer = THRGRPOTrainer(model=model, reward_funcs=id_sum_reward, args=config, train_dataset=prompt_dataset(),
                                 processing_class=tokenizer, callbacks=[clock])
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with recording_thr_calls(device) as (records, peak_state):
            trainer.train()
        head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
        record.update(status="ok", distributed_type=str(trainer.accelerator.distributed_type),
                      lm_head_sharding=lm_head_sharding(head) or "whole", step_s=clock.seconds,
                      thr_metrics=thr_log_metrics(trainer.state.log_history), thr_calls=public_records(records))
        if cuda:
            record["peak_allocated_GiB"] = max(peak_state["running_peak"],
                                               torch.cuda.max_memory_allocated(device)) / 2**30
    except Exception as error:
        record.update(error_record(error))
    write_json_atomically(out / "child.json", record)
    if record["status"] != "ok":
        sys.exit(1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="h100", choices=sorted(SCALES))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--out", default=os.environ.get("OUT", "thr-gpu-check"), help="results.json goes here")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="at full scale, phases that need more than what is left of this are skipped")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--fail-phase", nargs="*", default=[], choices=PHASES,
                        help="make these phases raise at their start (tests that the others still run)")
    parser.add_argument("--child", choices=["zero3", "fsdp2"], help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        run_child(args)
        return 0
    check = Check(args)
    check.save()
    for name in PHASES:
        if name in args.phases:
            check.run_phase(name, getattr(check, name))
    check.results["finished"] = True
    check.save()
    print(f"[gpu_check] results in {check.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
