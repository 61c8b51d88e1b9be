import math
import textwrap
import time
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx

from .gspo_token import sequence_token_old_logps
from .thr import active_groups, active_tokens, compute_thr, group_thresholds, scheduled_p, thr_weights
from .thr_grpo_config import THRGRPOConfig

THR_TITLE = "Token Hidden Reward: Steering Exploration-Exploitation in Group Relative Deep Reinforcement Learning"

# Keys of the generation batch that `_get_per_token_logps_and_entropies` takes as keyword arguments (multimodal).
_FORWARD_KEYS = (
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


class _HiddenStateCapture:
    """Collects the backbone's final hidden states at completion positions during one log-prob forward."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    @contextmanager
    def attach(self, backbone: torch.nn.Module, logits_to_keep: int):
        def hook(module, args, output):
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            # Same alignment as TRL's fused head: the state at position t predicts token t + 1. A copy, so the
            # prompt positions' storage is freed with the forward.
            self.chunks.append(hidden[:, :-1][:, -logits_to_keep:].detach().clone())

        handle = backbone.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @property
    def hidden_states(self) -> torch.Tensor | None:
        """`(B, T, d)`, or `None` if the forward never reached the backbone."""
        return torch.cat(self.chunks) if self.chunks else None


def _has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` in its current mode is random: dropout modules (LoRA's too) with p > 0, or a
    functional dropout rate in the config (e.g. `attention_dropout`)."""
    if not model.training:
        return False
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules()):
        return True
    config = getattr(model, "config", None)
    config = config.get_text_config() if config is not None else None
    rates = [value for name, value in vars(config or object()).items()
             if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float)]
    return any(rate > 0 for rate in rates)


def logit_transform_from_config(config) -> dict:
    """Logit scale and soft-capping of a model, read the way TRL's fused LM head reads them.

    Mirrors `trl.trainer.utils.add_fused_lm_head` (trl 1.16), so that THR's probabilities are the trainer's.
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

    The kernel reads the weight directly, outside the head's forward, so sharded weights must be gathered: ZeRO-3
    through TRL's `maybe_gather_lm_head_ctx` (the same gather TRL's fused head uses), FSDP2 with `full_tensor()`.
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


def weights_from_config(
    args: THRGRPOConfig,
    thr: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    num_generations: int,
    *,
    p: float,
    positive_mask: torch.Tensor | None = None,
    gather_values=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weights (B, T), taus (B // G,))` of a generation batch under the `thr_*` fields of `args`.

    The trainer's own path from THR to advantage weights, usable outside training (e.g. `trl-thr analyze
    --dynamics`). `p` is the value for this step (see `THRGRPOTrainer.thr_p`); `gather_values` pools the batch
    quantile over processes (see [`group_thresholds`]).
    """
    taus = group_thresholds(
        thr,
        advantages,
        completion_mask,
        num_generations,
        threshold=args.thr_threshold,
        beta=args.thr_beta,
        quantile=args.thr_quantile,
        tau=args.thr_tau,
        quantile_scope=args.thr_quantile_scope,
        positive_mask=positive_mask,
        gather_values=gather_values,
    )
    weights = thr_weights(
        thr, advantages, completion_mask, num_generations, strategy=args.thr_strategy, p=p, taus=taus,
        positive_mask=positive_mask,
    )
    return weights, taus


class THRGRPOTrainer(GRPOTrainer):
    """
    [`trl.GRPOTrainer`] with Token Hidden Reward (THR, [arXiv 2510.03669](https://huggingface.co/papers/2510.03669)).

    For every generation batch, THR is computed per token from the old policy's last hidden states (the same
    no-grad forward that gives `old_per_token_logps`), turned into per-token weights by `args.thr_strategy`, and
    multiplied into the advantages. The weighted `(B, T)` advantages go through TRL's own loss, so every loss type,
    clipping, KL, importance-sampling correction and metric keeps working.

    Takes the same arguments as [`trl.GRPOTrainer`]; `args` must be a [`THRGRPOConfig`].
    """

    _tag_names = ["trl", "grpo", "thr"]
    _name = "THR-GRPO"
    _paper = {
        "title": THR_TITLE,
        "id": "2510.03669",
        # docstyle-ignore
        "citation": textwrap.dedent(f"""\
            @inproceedings{{deng2026thr,
                title     = {{{THR_TITLE}}},
                author    = {{W. Deng and Y. Ren and Y. Li and B. Gong and D. J. Sutherland and X. Li and
                              C. Thrampoulidis}},
                booktitle = {{International Conference on Learning Representations}},
                year      = 2026,
                eprint    = {{arXiv:2510.03669}},
            }}"""),
    }

    def __init__(self, model, reward_funcs=None, args: THRGRPOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = THRGRPOConfig(f"{model_name.split('/')[-1]}-THR")
        elif not isinstance(args, THRGRPOConfig):
            raise TypeError(
                f"THRGRPOTrainer needs a THRGRPOConfig, got {type(args).__name__}. Build one with the same arguments "
                "(THRGRPOConfig accepts every GRPOConfig field) and set thr_strategy."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if args.thr_positive_reward_func is not None and args.thr_positive_reward_func not in self.reward_func_names:
            raise ValueError(
                f"thr_positive_reward_func={args.thr_positive_reward_func!r} is not one of the reward functions "
                f"{self.reward_func_names}."
            )
        # GSPO-token runs TRL's token-level path with rewritten old log-probs (see `gspo_token.py`).
        self._sequence_token = args.importance_sampling_level == "sequence_token"
        if self._sequence_token:
            self.importance_sampling_level = "token"
        self._hidden_capture: _HiddenStateCapture | None = None  # armed around the old-policy forward only
        self._loss_inputs: dict | None = None  # inputs of the running loss forward, for GSPO-token
        self._rewards_per_func: torch.Tensor | None = None

    # ---- schedule -------------------------------------------------------------------------------------------------

    @property
    def thr_p(self) -> float:
        """Value of p for the current optimizer step (follows `thr_p_schedule`)."""
        max_steps = self.state.max_steps
        progress = self.state.global_step / max_steps if max_steps and max_steps > 0 else 0.0
        return scheduled_p(self.args.thr_p, self.args.thr_p_end, self.args.thr_p_schedule, progress)

    # ---- hooks into GRPOTrainer -----------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Kept for `thr_positive_reward_threshold`: the generation batch dict carries advantages, not rewards.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _trl_computes_old_logps(self) -> bool:
        # The condition under which GRPOTrainer._generate_and_score_completions (trl 1.16) runs the old-policy
        # forward itself; THR then reads the hidden states of that forward instead of running another.
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _generate_and_score_completions(self, inputs):
        if self.args.thr_strategy == "none":
            return super()._generate_and_score_completions(inputs)
        capture = _HiddenStateCapture() if self._trl_computes_old_logps() else None
        self._hidden_capture = capture
        try:
            batch = super()._generate_and_score_completions(inputs)
        finally:
            self._hidden_capture = None

        start = time.perf_counter()
        if capture is None:
            old_logps, hidden_states = self._old_policy_forward(batch)
            # TRL uses the training forward's own detached log-probs here (a ratio of exactly 1). Ours equal them
            # unless dropout is active, in which case another mask would turn the ratio into noise: keep TRL's.
            if not _has_active_dropout(self.model):
                batch.setdefault("old_per_token_logps", old_logps)
        else:
            hidden_states, old_logps = capture.hidden_states, batch.get("old_per_token_logps")
            if hidden_states is None or old_logps is None:
                raise RuntimeError(
                    "THRGRPOTrainer expected GRPOTrainer to compute old_per_token_logps in this configuration and "
                    "found none; the installed TRL version is not the one trl-thr supports (trl>=1.16,<1.17)."
                )
        forward_seconds = self._seconds_since(start)
        batch["thr_weights"] = self._compute_thr_weights(batch, hidden_states, forward_seconds, old_logps)
        return batch

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._hidden_capture is not None and model is self.model:
            # Disarm before the call: under PEFT the reference forward that follows also runs through self.model.
            capture, self._hidden_capture = self._hidden_capture, None
            with capture.attach(self._backbone(model), logits_to_keep):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
                )
        outputs = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        if self._loss_inputs is not None:
            loss_inputs, self._loss_inputs = self._loss_inputs, None
            mask = loss_inputs["completion_mask"]
            if "tool_mask" in loss_inputs:
                mask = mask * loss_inputs["tool_mask"]
            # `_compute_loss` reads the old log-probs after this forward returns.
            loss_inputs["old_per_token_logps"] = sequence_token_old_logps(
                outputs[0], loss_inputs.get("old_per_token_logps"), mask
            )
        return outputs

    def _compute_loss(self, model, inputs):
        inputs = dict(inputs)  # the buffered batch is reused across iterations: never mutate it
        weights = inputs.pop("thr_weights", None)
        if weights is not None:
            advantages = inputs["advantages"]
            inputs["advantages"] = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * weights
        if not self._sequence_token:
            return super()._compute_loss(model, inputs)
        self._loss_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    # ---- THR ------------------------------------------------------------------------------------------------------

    def _seconds_since(self, start: float) -> float:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time their completion, not their launch
        return time.perf_counter() - start

    def _unwrapped_causal_lm(self, model=None):
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def _backbone(self, model) -> torch.nn.Module:
        # The module TRL's fused LM head runs (`base_model`); its output is the final-norm hidden state.
        return self._unwrapped_causal_lm(model).base_model

    def _old_policy_forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad forward of the current (old) policy: `(old_per_token_logps (B, T), hidden (B, T, d))`."""
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        forward_kwargs = {key: batch[key] for key in _FORWARD_KEYS if key in batch}
        capture = _HiddenStateCapture()
        self._hidden_capture = capture
        try:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    batch["completion_ids"].size(1),
                    batch_size=batch_size,
                    **forward_kwargs,
                )
        finally:
            self._hidden_capture = None
        return logps, capture.hidden_states

    def _positive_mask(self, num_rows: int) -> torch.Tensor | None:
        """`(B,)` bool from rewards when `thr_positive_reward_threshold` is set; `None` means `A > 0`."""
        threshold = self.args.thr_positive_reward_threshold
        if threshold is None:
            return None
        rewards_per_func = self._rewards_per_func  # (N_global, n_funcs), gathered, NaN where a function gave None
        if self.args.thr_positive_reward_func is not None:
            rewards = rewards_per_func[:, self.reward_func_names.index(self.args.thr_positive_reward_func)]
        else:
            weights = self.reward_weights.to(rewards_per_func.device)
            rewards = (rewards_per_func * weights).nansum(dim=1)
            rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        start = self.accelerator.process_index * num_rows
        return (rewards[start : start + num_rows] >= threshold).nan_to_num(0).bool()

    def _gather_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process, concatenated (lengths may differ by process)."""
        values = self.accelerator.pad_across_processes(values, dim=0, pad_index=math.nan)
        values = self.accelerator.gather(values)
        return values[~torch.isnan(values)]

    def _compute_thr_weights(self, batch: dict, hidden_states: torch.Tensor, forward_seconds: float,
                             token_logprobs: torch.Tensor) -> torch.Tensor:
        """THR weights `(B, T)` for a generation batch whose rows are whole, consecutive groups.

        `token_logprobs` `(B, T)` are the log-probs of the forward that produced `hidden_states`.
        """
        start = time.perf_counter()
        args = self.args
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = batch["advantages"]
        num_rows = advantages.size(0)
        if num_rows % num_generations != 0:
            raise ValueError(
                f"THR needs whole groups on each process, but this process holds {num_rows} completions, not a "
                f"multiple of num_generations={num_generations}. Set per_device_{mode}_batch_size (times "
                "steps_per_generation in training) to a multiple of num_generations."
            )
        mask = batch["completion_mask"]
        if "tool_mask" in batch:
            mask = mask * batch["tool_mask"]
        positive = self._positive_mask(num_rows)

        with full_lm_head(self._unwrapped_causal_lm().get_output_embeddings()) as (weight, bias):
            thr = compute_thr(
                hidden_states,
                batch["completion_ids"],
                mask,
                weight,
                advantages,
                num_generations,
                temperature=self.temperature,
                vocab=args.thr_vocab,
                include_self=args.thr_include_self,
                token_logprobs=token_logprobs,
                positive_mask=positive,
                lm_head_bias=bias,
                block_elements=args.thr_block_elements,
                **logit_transform_from_config(self._unwrapped_causal_lm().config),
            )
        p = self.thr_p
        weights, taus = weights_from_config(args, thr, advantages, mask, num_generations, p=p,
                                            positive_mask=positive, gather_values=self._gather_across_processes)
        self._log_thr_metrics(mode, thr, weights, taus, advantages, mask, num_generations, positive, p,
                              self._seconds_since(start), forward_seconds)
        return weights

    def _log_thr_metrics(self, mode, thr, weights, taus, advantages, mask, num_generations, positive, p, seconds,
                         forward_seconds):
        mask = mask.bool()
        active = active_groups(advantages, mask, num_generations, positive)
        counted = active_tokens(advantages, mask, num_generations, positive)
        finite_tau = torch.isfinite(taus) & active
        dominant = counted & (thr.abs() > taus.repeat_interleave(num_generations).unsqueeze(1))
        local = torch.tensor(
            [
                mask.sum(),
                counted.sum(),
                dominant.sum(),
                (counted & (thr > 0)).sum(),
                (counted & (thr < 0)).sum(),
                weights[mask].sum(),
                thr.abs()[counted].sum(),
                taus[finite_tau].sum(),
                finite_tau.sum(),
                active.numel(),
                (~active).sum(),
                seconds,
                forward_seconds,
                1.0,
            ],
            dtype=torch.float64,
            device=thr.device,
        )
        (tokens, active_count, kept, pos, neg, weight_sum, abs_sum, tau_sum, tau_count, groups, skipped, seconds,
         forward_seconds, processes) = self.accelerator.reduce(local, reduction="sum").tolist()

        def ratio(num, den):
            return num / den if den > 0 else math.nan  # TRL's log() ignores NaN

        metrics = self._metrics[mode]
        metrics["thr/kept_frac"].append(ratio(kept, active_count))
        metrics["thr/pos_frac"].append(ratio(pos, active_count))
        metrics["thr/neg_frac"].append(ratio(neg, active_count))
        metrics["thr/mean_weight"].append(ratio(weight_sum, tokens))
        metrics["thr/tau"].append(ratio(tau_sum, tau_count))
        metrics["thr/abs_mean"].append(ratio(abs_sum, active_count))
        metrics["thr/groups_skipped_frac"].append(ratio(skipped, groups))
        metrics["thr/p"].append(p)
        metrics["thr/seconds"].append(seconds / processes)
        metrics["thr/forward_seconds"].append(forward_seconds / processes)
