import logging
import math
import os
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id

from . import _trl_compat as compat
from .completion_logs import completion_columns, group_heatmap_html
from .files import write_text_atomically
from .generation_capture import GenerationCapture, capture_unsupported_reason
from .gspo_token import sequence_token_old_logps
from .thr import (
    STRATEGIES_USING_P,
    active_groups,
    active_tokens,
    compute_thr,
    dominant_tokens,
    group_thresholds,
    scheduled_p,
    signed_p,
    thr_weights,
)
from .thr_grpo_config import THRGRPOConfig

logger = logging.getLogger(__name__)

# While no generation batch carries a learning signal, the warning is repeated every this many batches.
NO_SIGNAL_WARNING_EVERY = 10

# `thr/entropy_overlap` compares THR's dominant tokens with this top fraction of the active tokens by entropy: the
# fraction TRL's `top_entropy_quantile` mask is used at in its reference (arXiv 2506.01939, the "80/20" mask).
ENTROPY_OVERLAP_TOP_FRACTION = 0.2

THR_TITLE = "Token Hidden Reward: Steering Exploration-Exploitation in Group Relative Deep Reinforcement Learning"


class THRComputationError(RuntimeError):
    """THR failed on at least one process; raised on every process so that none waits in a collective."""


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


@dataclass
class OldPolicyStates:
    """What THR reads of the old policy for one generation batch."""

    hidden_states: torch.Tensor  # (B, T, d) final-norm states that predict each completion token
    token_logprobs: torch.Tensor  # (B, T) log-probs of the sampled tokens from the same states
    seconds: float  # spent getting them once generation was done (0 when TRL's own forward recorded them)


@dataclass
class THRBatch:
    """THR of one generation batch and what the weights made of it: the input of the metrics and the logs."""

    thr: torch.Tensor  # (B, T)
    weights: torch.Tensor  # (B, T) on the advantages
    taus: torch.Tensor  # (B // G,) the groups' dominance thresholds
    advantages: torch.Tensor  # (B,)
    counted: torch.Tensor  # (B, T) bool: the tokens the loss counts
    active_groups: torch.Tensor  # (B // G,) bool: the groups THR applies to
    active_tokens: torch.Tensor  # (B, T) bool: counted tokens of those groups
    dominant: torch.Tensor  # (B, T) bool: active tokens above their group's threshold
    num_generations: int
    p: float

    @classmethod
    def build(cls, thr, weights, taus, advantages, counted, num_generations: int, positive, p: float) -> "THRBatch":
        """The record of a batch, its group and token masks derived once (`positive` `(B,)` or `None`: `A > 0`)."""
        counted = counted.bool()
        active = active_tokens(advantages, counted, num_generations, positive)
        return cls(
            thr=thr, weights=weights, taus=taus, advantages=advantages, counted=counted,
            active_groups=active_groups(advantages, counted, num_generations, positive), active_tokens=active,
            dominant=dominant_tokens(thr, taus, active, num_generations), num_generations=num_generations, p=p,
        )


def _lm_head_has_adapter(model: torch.nn.Module) -> bool:
    """Whether `model` (unwrapped from accelerate) is a PEFT model with an adapter layer on its LM head."""
    if not is_peft_model(model):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer  # an optional dependency, installed since it built `model`

    return isinstance(model.get_output_embeddings(), BaseTunerLayer)


def _counted_tokens(batch: dict) -> torch.Tensor:
    """`(B, T)` tokens the loss counts: completion tokens, less tool-call outputs when TRL masks them."""
    return batch["completion_mask"] * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"]


class THRGRPOTrainer(GRPOTrainer):
    """
    [`trl.GRPOTrainer`] with Token Hidden Reward (THR, [arXiv 2510.03669](https://huggingface.co/papers/2510.03669)).

    For every generation batch, THR is computed per token from the old policy's last hidden states, turned into
    per-token weights by `args.thr_strategy`, and multiplied into the advantages. The weighted `(B, T)` advantages go
    through TRL's own loss, so every loss type, clipping, KL, importance-sampling correction and metric keeps working.

    Takes the same arguments as [`trl.GRPOTrainer`]; `args` must be a [`THRGRPOConfig`].

    One generation batch, from states to weights (`_generate_and_score_completions`):

    1. `_generate_with_thr_states`: TRL generates and scores the batch while one of two captures records the old
       policy's final-norm states `(B, T, d)`: TRL's own old-log-prob forward where TRL runs one
       (`_recording_old_policy_forward`), else `generate` itself as it decodes (`_recording_generation`), else THR
       runs one no-grad forward of its own (`thr/own_forward` says which).
    2. `_compute_thr`: THR `(B, T)` from those states and the (gathered) LM head, `thr.compute_thr`.
    3. `_thr_weights_and_metrics`: thresholds and weights `(B, T)` (`weights_from_config`), the `thr/*` metrics and
       the completions columns, all from one `THRBatch`.
    4. The weights travel in the batch as `thr_weights` and multiply the advantages in `_compute_loss`.
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
        compat.check_trl_internals()  # the version itself was checked when compat was imported
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = THRGRPOConfig(f"{model_name.split('/')[-1]}-THR")
        elif not isinstance(args, THRGRPOConfig):
            raise TypeError(
                f"THRGRPOTrainer needs a THRGRPOConfig, got {type(args).__name__}. Build one with the same arguments "
                "(THRGRPOConfig accepts every GRPOConfig field) and set thr_strategy."
            )
        refusal = compat.vllm_refusal(args)
        if refusal is None and args.thr_strategy != "none":
            refusal = compat.liger_refusal(args)
        if refusal is not None:
            raise ValueError(refusal)
        with compat.vllm_generation_for_platform(args):
            super().__init__(model, reward_funcs, args=args, **kwargs)
        if compat.fsdp_requested_but_not_built(self.accelerator):
            raise ValueError(compat.fsdp_needs_gpus())
        if args.thr_strategy != "none" and compat.uses_fsdp1(self.accelerator):
            raise ValueError(
                "THR reads the LM-head weight outside the forward, which FSDP version 1 keeps as a flat shard. Use "
                "FSDP2: set fsdp_version: 2 in the accelerate config (trl-thr train --accelerate_config fsdp2)."
            )
        if args.thr_strategy != "none" and _lm_head_has_adapter(self.accelerator.unwrap_model(self.model)):
            # TRL refuses this itself from 1.15 on; 1.14 trains the adapter, which THR would not see.
            raise ValueError(
                "A PEFT adapter on `lm_head` is not supported with THR: THR reads the head's base weight, which the "
                "adapter leaves unchanged, so its THR would not be the policy's. Remove 'lm_head' from target_modules."
            )
        if args.thr_positive_reward_func is not None and args.thr_positive_reward_func not in self.reward_func_names:
            raise ValueError(
                f"thr_positive_reward_func={args.thr_positive_reward_func!r} is not one of the reward functions "
                f"{self.reward_func_names}."
            )
        # The gathered rewards of the running generation batch, for `thr_positive_reward_threshold`: TRL's batch dict
        # carries advantages, not rewards.
        self._rewards_per_func: torch.Tensor | None = None
        # With `log_completions`: one group's tokens, THR, advantages and prompt, drawn as a heatmap at the next
        # `log()` (`group_heatmap_html`'s arguments).
        self._thr_heatmap: dict | None = None
        # Armed only around TRL's generation step, so that its first `generate` call is recorded for THR.
        self._generation_capture: GenerationCapture | None = None
        # Armed only while TRL runs its own old-policy forward inside `_generate_and_score_completions`, so that THR
        # reads that forward's hidden states instead of running another one.
        self._old_policy_capture: compat.BackboneCapture | None = None
        # Generation batches in a row without any learning signal, for `_watch_learning_signal`'s warning.
        self._no_signal_streak = 0
        # Generation batches in a row whose positive set was empty, for `_watch_positive_set`'s warning.
        self._no_positive_streak = 0
        # Armed only while `_compute_loss` runs TRL's loss: THR's `(dominant, active)` `(B, T)` masks of the
        # micro-batch, for `thr/entropy_overlap` on the entropies of that loss's forward.
        self._entropy_overlap_masks: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- schedule -------------------------------------------------------------------------------------------------

    @property
    def thr_p(self) -> float:
        """Value of p for the current optimizer step (follows `thr_p_schedule`).

        Progress is `global_step / (max_steps - 1)`: the first optimizer step uses `thr_p` and the last one
        `thr_p_end`. Weights are computed when a generation batch is made, so with `steps_per_generation` above
        `gradient_accumulation_steps` the steps sharing a batch share its p.
        """
        max_steps = self.state.max_steps
        progress = self.state.global_step / (max_steps - 1) if max_steps and max_steps > 1 else 0.0
        return scheduled_p(self.args.thr_p, self.args.thr_p_end, self.args.thr_p_schedule, progress)

    # ---- hooks into GRPOTrainer -----------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = (super()._generate_and_score_completions(inputs) if self.args.thr_strategy == "none"
                 else self._generate_with_thr_weights(inputs))
        if self.model.training:
            self._watch_learning_signal(batch)
        return batch

    def _generate_with_thr_weights(self, inputs) -> dict:
        """GRPOTrainer's batch with THR's weights (`thr_weights`, `(B, T)`) where they differ from GRPO's."""
        batch, states = self._generate_with_thr_states(inputs)
        start = time.perf_counter()
        positive = self._positive_mask(batch["advantages"].size(0))
        if positive is not None:
            self._watch_positive_set(batch, positive)
        thr = self._compute_thr(batch, states.hidden_states, states.token_logprobs, positive)
        forward_seconds = states.seconds
        # THR is done with the (B, T, d) states (the gathered LM head went when _compute_thr returned): free them now,
        # before the thresholds' and the metrics' collectives, rather than at the end of the batch.
        del states
        weights, record = self._thr_weights_and_metrics(batch, thr, positive, self._seconds_since(start),
                                                        forward_seconds)
        # For `thr/entropy_overlap`, measured in the loss forward on TRL's own entropies (`_compute_loss`): the
        # masks travel with the batch, split into micro-batches along with the advantages.
        batch["thr_dominant"], batch["thr_active"] = record.dominant, record.active_tokens
        # Weight 1 on every counted token is GRPO's update: TRL keeps its (B,) advantages, so the run is GRPO's bit for
        # bit (multiplying by ones reorders some loss types' sums). One check per generation batch.
        if not torch.equal(weights, _counted_tokens(batch).to(weights.dtype)):
            batch["thr_weights"] = weights
        return batch

    def _generate_with_thr_states(self, inputs) -> tuple[dict, OldPolicyStates]:
        """GRPOTrainer's batch and the old policy's states THR reads for it."""
        if compat.trl_computes_old_logps(self):
            capture = compat.BackboneCapture()
            with self._recording_old_policy_forward(capture):
                batch = super()._generate_and_score_completions(inputs)
            start = time.perf_counter()
            hidden_states, token_logprobs = capture.hidden_states(), batch.get("old_per_token_logps")
            if hidden_states is None or token_logprobs is None:
                raise RuntimeError(
                    "THRGRPOTrainer expected GRPOTrainer to compute old_per_token_logps in this configuration and "
                    f"found none; trl-thr is tested with trl {compat.tested_trl()}, found trl "
                    f"{compat.trl.__version__}."
                )
            return batch, OldPolicyStates(hidden_states, token_logprobs, self._seconds_since(start))
        # TRL computes no old log-probs here and uses the training forward's own (a ratio of exactly 1): THR records
        # what it needs during generation, or runs its own no-grad forward, and leaves TRL's ratio alone.
        capture = self._generation_capture_for_batch()
        with self._recording_generation(capture):
            batch = super()._generate_and_score_completions(inputs)
        start = time.perf_counter()
        recorded = None if capture is None else self._align_generation_capture(capture, batch)
        if capture is not None and not self._on_every_process(recorded is not None):
            # Every process takes the same path: THR's forward has collectives under ZeRO-3/FSDP.
            recorded = None
        if recorded is not None:
            hidden_states, token_logprobs = recorded
        else:
            token_logprobs, hidden_states = self._old_policy_forward(batch)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["thr/own_forward"].append(float(recorded is None))
        return batch, OldPolicyStates(hidden_states, token_logprobs, self._seconds_since(start))

    @contextmanager
    def _recording_old_policy_forward(self, capture: compat.BackboneCapture):
        """Arms `capture` for TRL's old-policy forward (`_get_per_token_logps_and_entropies` below) while TRL makes a
        generation batch; disarmed after, whatever happens."""
        self._old_policy_capture = capture
        try:
            yield
        finally:
            self._old_policy_capture = None

    @contextmanager
    def _recording_generation(self, capture: GenerationCapture | None):
        """Arms `capture` (if any) for the batch's first `generate` call (`_generate_single_turn` below) while TRL
        makes a generation batch; disarmed after, whatever happens."""
        self._generation_capture = capture
        try:
            yield
        finally:
            self._generation_capture = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        # Only the first call of a generation batch is recorded: tool turns call it again with other prompts.
        capture, self._generation_capture = self._generation_capture, None
        if capture is None or capture_unsupported_reason(self, images, multimodal_fields) is not None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        with capture.recording():
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        overlap_masks, self._entropy_overlap_masks = self._entropy_overlap_masks, None
        if overlap_masks is not None:  # armed by `_compute_loss` for its training forward, which has entropies
            outputs = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            self._log_entropy_overlap(outputs[1], *overlap_masks)
            return outputs
        capture = self._old_policy_capture
        if capture is None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # Disarm before the call: under PEFT the reference forward that follows also runs through self.model.
        self._old_policy_capture = None
        with capture.attach(compat.backbone(self, model), logits_to_keep):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )

    def _compute_loss(self, model, inputs):
        inputs = dict(inputs)  # the buffered batch is reused across iterations: never mutate it
        weights = inputs.pop("thr_weights", None)
        dominant, active = inputs.pop("thr_dominant", None), inputs.pop("thr_active", None)
        if weights is not None:
            advantages = inputs["advantages"]
            inputs["advantages"] = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * weights
        if dominant is not None:  # every process has them or none: THR runs on every process
            self._entropy_overlap_masks = (dominant, active)
        try:
            if self.args.importance_sampling_level != "sequence_token":
                return super()._compute_loss(model, inputs)
            return self._gspo_token_loss(model, inputs)
        finally:
            self._entropy_overlap_masks = None

    def _gspo_token_loss(self, model, inputs):
        # GSPO-token (see `gspo_token.py`): TRL's token-level ratio with old log-probs that turn it into
        # sg[s_i] * pi / sg[pi]. They depend on the training forward's log-probs, so they are set right after it.
        mask = _counted_tokens(inputs)
        sampling_logps = inputs.get("old_per_token_logps")

        def set_old_logps(per_token_logps):
            inputs["old_per_token_logps"] = sequence_token_old_logps(per_token_logps, sampling_logps, mask)

        with compat.token_level_ratio(self, set_old_logps):
            return super()._compute_loss(model, inputs)

    # ---- THR ------------------------------------------------------------------------------------------------------

    def _seconds_since(self, start: float) -> float:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time their completion, not their launch
        return time.perf_counter() - start

    def _generation_capture_for_batch(self) -> GenerationCapture | None:
        """A capture for the coming generation batch, or `None` where `thr_hidden_source` or the setup rules it out."""
        source = self.args.thr_hidden_source
        if source == "forward":
            return None
        reason = capture_unsupported_reason(self)
        if reason is not None:
            if source == "generate":
                raise ValueError(
                    f"thr_hidden_source='generate' cannot record hidden states during generation with {reason}. "
                    "Set thr_hidden_source='auto' (falls back to one no-grad forward) or 'forward'."
                )
            return None
        return GenerationCapture.from_model(
            self.accelerator.unwrap_model(self.model),
            temperature=self.temperature,
            **compat.logit_transform_from_config(compat.unwrapped_causal_lm(self).config),
        )

    def _align_generation_capture(self, capture: GenerationCapture, batch: dict):
        """`(hidden (B, T, d), token_logprobs (B, T))` recorded during generation for this batch, or `None`."""
        with compat.full_lm_head(compat.unwrapped_causal_lm(self).get_output_embeddings()) as (weight, bias):
            recorded = capture.align(batch["completion_ids"], batch["completion_mask"], weight, bias,
                                     prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"])
        if recorded is None and self.args.thr_hidden_source == "generate":
            raise RuntimeError(
                f"thr_hidden_source='generate': the states recorded during generation do not match the batch "
                f"({capture.reason}). Set thr_hidden_source='auto' to fall back to one no-grad forward."
            )
        return recorded

    def _old_policy_forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad forward of the current (old) policy: `(token log-probs (B, T), hidden (B, T, d))`."""
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logits_to_keep = batch["completion_ids"].size(1)
        capture = compat.BackboneCapture()
        with (
            torch.no_grad(),
            compat.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            capture.attach(compat.backbone(self), logits_to_keep),
        ):
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                **compat.forward_kwargs(batch),
            )
        return logps, capture.hidden_states()

    def _positive_mask(self, num_rows: int) -> torch.Tensor | None:
        """`(B,)` bool from rewards when `thr_positive_reward_threshold` is set; `None` means `A > 0`."""
        threshold = self.args.thr_positive_reward_threshold
        if threshold is None:
            return None
        rewards = self._positive_rewards()
        start = self.accelerator.process_index * num_rows
        return (rewards[start : start + num_rows] >= threshold).nan_to_num(0).bool()

    def _positive_rewards(self) -> torch.Tensor:
        """`(N_global,)` the reward `thr_positive_reward_threshold` is compared with: `thr_positive_reward_func`'s,
        else the weighted sum of the rewards; NaN where no function scored the completion."""
        rewards_per_func = self._rewards_per_func  # (N_global, n_funcs), gathered, NaN where a function gave None
        if self.args.thr_positive_reward_func is not None:
            return rewards_per_func[:, self.reward_func_names.index(self.args.thr_positive_reward_func)]
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return rewards

    def _gather_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process, concatenated (lengths may differ by process)."""
        values = self.accelerator.pad_across_processes(values, dim=0, pad_index=math.nan)
        values = self.accelerator.gather(values)
        return values[~torch.isnan(values)]

    def _thr_group_size(self) -> tuple[str, int]:
        """`(mode, num_generations)` of the batch being generated."""
        mode = "train" if self.model.training else "eval"
        return mode, self.num_generations if mode == "train" else self.num_generations_eval

    def _compute_thr(self, batch: dict, hidden_states: torch.Tensor, token_logprobs: torch.Tensor,
                     positive: torch.Tensor | None) -> torch.Tensor:
        """THR `(B, T)` of a generation batch whose rows are whole, consecutive groups.

        `token_logprobs` `(B, T)` are the log-probs of the forward that produced `hidden_states` `(B, T, d)` (TRL's
        log-prob forward, or those recorded during generation). THR reads the states and the head as stored:
        rounding them like a bf16 projection does not bring THR closer to float64 (benchmarks/bench_precision.py). A
        sharded head is gathered for this call only.
        """
        args = self.args
        mode, num_generations = self._thr_group_size()
        num_rows = batch["advantages"].size(0)
        if num_rows % num_generations != 0:
            raise ValueError(
                f"THR needs whole groups on each process, but this process holds {num_rows} completions, not a "
                f"multiple of num_generations={num_generations}. Set per_device_{mode}_batch_size (times "
                "steps_per_generation in training) to a multiple of num_generations."
            )
        causal_lm = compat.unwrapped_causal_lm(self)
        if args.thr_log_normaliser == "exact":
            token_logprobs = None  # the kernel streams the vocabulary in float32 for the normaliser
        # Every process enters the head gather and the collective below, whatever happens in between: THR's work
        # differs by process (lengths, V'), so a failure on one must not leave the others waiting in a collective.
        thr = error = None
        with compat.full_lm_head(causal_lm.get_output_embeddings()) as (weight, bias):
            try:
                thr = compute_thr(
                    hidden_states,
                    batch["completion_ids"],
                    _counted_tokens(batch),
                    weight,
                    batch["advantages"],
                    num_generations,
                    temperature=self.temperature,
                    vocab=args.thr_vocab,
                    include_self=args.thr_include_self,
                    token_logprobs=token_logprobs,
                    positive_mask=positive,
                    lm_head_bias=bias,
                    block_elements=args.thr_block_elements,
                    **compat.logit_transform_from_config(causal_lm.config),
                )
            except Exception as caught:  # noqa: BLE001 - re-raised below, on every process
                error = caught
        del weight, bias  # a gathered head (V x d) must not outlive the block
        self._raise_if_any_process_failed(error)
        return thr

    def _thr_weights_and_metrics(self, batch: dict, thr: torch.Tensor, positive: torch.Tensor | None,
                                 thr_seconds: float, forward_seconds: float) -> tuple[torch.Tensor, THRBatch]:
        """Per-token weights `(B, T)` from the batch's THR and the batch's record, with the `thr/*` metrics and
        completions columns."""
        start = time.perf_counter()
        mode, num_generations = self._thr_group_size()
        advantages, counted = batch["advantages"], _counted_tokens(batch)
        p = self.thr_p
        weights, taus = weights_from_config(self.args, thr, advantages, counted, num_generations, p=p,
                                            positive_mask=positive, gather_values=self._gather_across_processes)
        record = THRBatch.build(thr, weights, taus, advantages, counted, num_generations, positive, p)
        self._log_thr_metrics(mode, record, thr_seconds + self._seconds_since(start), forward_seconds)
        if self.log_completions:
            self._log_thr_completions(batch, record)
        return weights, record

    def _log_thr_completions(self, batch: dict, record: THRBatch) -> None:
        """THR columns in TRL's completions table, and this process's first THR group as a heatmap."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)

        def decode(token_id: int) -> str:
            return tokenizer.decode([token_id])

        ids, mask, thr, num_generations = batch["completion_ids"], record.counted, record.thr, record.num_generations
        columns = completion_columns(thr, record.weights, record.dominant, ids, mask, decode)
        compat.log_completion_columns(self, columns)
        if not self.accelerator.is_main_process or not record.active_groups.any():
            return
        group = int(record.active_groups.nonzero()[0])
        rows = range(group * num_generations, (group + 1) * num_generations)
        row_masks = [mask[row] for row in rows]
        prompt_row = rows[0]
        prompt_ids = batch["prompt_ids"][prompt_row][batch["prompt_mask"][prompt_row].bool()]
        self._thr_heatmap = dict(
            tokens=[[decode(t) for t in ids[row][row_mask].tolist()] for row, row_mask in zip(rows, row_masks)],
            thr=[thr[row][row_mask].float().tolist() for row, row_mask in zip(rows, row_masks)],
            advantages=record.advantages[group * num_generations : (group + 1) * num_generations].tolist(),
            prompt=tokenizer.decode(prompt_ids.tolist()),
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        heatmap, self._thr_heatmap = self._thr_heatmap, None
        if heatmap is None or not self.accelerator.is_main_process:
            return
        step = self.state.global_step  # the step TRL's completions table, logged just now, gives the same batch
        page = group_heatmap_html(**heatmap, title=f"THR of one group at step {step}")
        trackers = [tracker for tracker in compat.completion_trackers(self) if hasattr(tracker, "Html")]
        for tracker in trackers:
            tracker.log({"thr/heatmap": tracker.Html(page)})
        if not trackers:
            write_text_atomically(os.path.join(self.args.output_dir, "thr_heatmaps", f"step_{step:05d}.html"), page)

    def _watch_learning_signal(self, batch: dict) -> None:
        """Logs `frac_no_learning_signal` (1 for a generation batch whose every counted token has advantage 0) and
        warns, once and then every `NO_SIGNAL_WARNING_EVERY` batches while it lasts, with the cause and the fix."""
        counted = _counted_tokens(batch).sum(dim=1) > 0  # (B,): rows the loss sees
        local = torch.stack([(counted & (batch["advantages"] != 0)).sum(), counted.sum()]).double()
        rows_with_signal, rows_counted = self.accelerator.reduce(local, reduction="sum").tolist()
        no_signal = rows_with_signal == 0
        self._metrics["train"]["frac_no_learning_signal"].append(float(no_signal))
        self._no_signal_streak = self._no_signal_streak + 1 if no_signal else 0
        if not no_signal or (self._no_signal_streak - 1) % NO_SIGNAL_WARNING_EVERY != 0:
            return
        if rows_counted == 0 and self.args.mask_truncated_completions:
            cause = (f"every completion reached max_completion_length={self.args.max_completion_length} and "
                     "mask_truncated_completions=True masks them all. Raise max_completion_length, or set "
                     "mask_truncated_completions=False.")
        else:
            cause = ("every group's completions got equal rewards, so every advantage is 0. Check that the rewards "
                     "can differ within a group (e.g. the answer column and the reward's grading), or make the "
                     "task's difficulty fit the model, or raise num_generations or temperature.")
        if self.accelerator.is_main_process:
            logger.warning("No learning signal for %d generation batch(es) in a row (loss and gradient are 0): %s",
                           self._no_signal_streak, cause)

    def _watch_positive_set(self, batch: dict, positive: torch.Tensor) -> None:
        """Logs `thr/frac_no_positive` (1 for a generation batch with a learning signal whose positive set, set by
        `thr_positive_reward_threshold`, is empty: THR applies to no group and the update is GRPO's) and warns, once
        and then every `NO_SIGNAL_WARNING_EVERY` batches while it lasts, naming the field and the highest reward."""
        rewards = self._positive_rewards()
        local = torch.stack([positive.sum(), (batch["advantages"] != 0).sum()]).double()
        positives, rows_with_signal = self.accelerator.reduce(local, reduction="sum").tolist()
        no_positive = positives == 0 and rows_with_signal > 0
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["thr/frac_no_positive"].append(float(no_positive))
        self._no_positive_streak = self._no_positive_streak + 1 if no_positive else 0
        if not no_positive or (self._no_positive_streak - 1) % NO_SIGNAL_WARNING_EVERY != 0:
            return
        if self.accelerator.is_main_process:
            scored = rewards[~torch.isnan(rewards)]
            highest = f"{scored.max().item():.4g}" if scored.numel() else "none (every reward was None)"
            reward = (f"thr_positive_reward_func={self.args.thr_positive_reward_func!r}"
                      if self.args.thr_positive_reward_func is not None else "the weighted sum of the rewards")
            logger.warning(
                "No completion reached thr_positive_reward_threshold=%s (%s) in %d generation batch(es) in a row: THR "
                "applied to no group, so these updates were plain GRPO. The highest reward in the last batch was %s; "
                "set thr_positive_reward_threshold to what a correct completion scores, or unset it (positive = "
                "advantage > 0).", self.args.thr_positive_reward_threshold, reward, self._no_positive_streak, highest)

    def _on_every_process(self, holds: bool) -> bool:
        """Whether `holds` is true on every process (one all-reduce; no communication in a single process)."""
        if self.accelerator.num_processes == 1:
            return holds
        failing = torch.tensor([0.0 if holds else 1.0], device=self.accelerator.device)
        return self.accelerator.reduce(failing, reduction="sum").item() == 0

    def _raise_if_any_process_failed(self, error: Exception | None) -> None:
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.accelerator.device)
        failed_processes = int(self.accelerator.reduce(failed, reduction="sum").item())
        if failed_processes == 0:
            return
        where = f"on this process: {type(error).__name__}: {error}" if error is not None else "on another process"
        message = (
            f"THR failed on {failed_processes} of {self.accelerator.num_processes} process(es), {where}. For an "
            "out-of-memory error, lower thr_block_elements or per_device_train_batch_size."
        )
        raise THRComputationError(message) from error

    def _log_entropy_overlap(self, entropies: torch.Tensor, dominant: torch.Tensor, active: torch.Tensor) -> None:
        """`thr/entropy_overlap`: of a micro-batch's dominant tokens (all processes), the share that are also among the
        top `ENTROPY_OVERLAP_TOP_FRACTION` of its active tokens by entropy, by TRL's `top_entropy_quantile` rule.

        `entropies` `(B, T)` are those TRL's loss forward computed (no forward of its own); `active` `(B, T)`: the
        counted tokens of groups THR applies to; `dominant` `(B, T)`: those above their group's threshold.
        """
        high_entropy = compat.high_entropy_tokens(self, entropies.detach(), active, ENTROPY_OVERLAP_TOP_FRACTION)
        local = torch.stack([(dominant & high_entropy).sum(), dominant.sum()]).double()
        both, dominant_count = self.accelerator.reduce(local, reduction="sum").tolist()
        if dominant_count > 0:  # a micro-batch without dominant tokens has no overlap to measure
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["thr/entropy_overlap"].append(both / dominant_count)

    def _log_thr_metrics(self, mode: str, record: THRBatch, seconds: float, forward_seconds: float) -> None:
        """The `thr/*` metrics of one generation batch, summed over processes before the ratios are taken."""
        thr, taus, active, in_active = record.thr, record.taus, record.active_groups, record.active_tokens
        finite_tau = torch.isfinite(taus) & active
        local = torch.tensor(
            [
                record.counted.sum(),
                in_active.sum(),
                record.dominant.sum(),
                (in_active & (thr > 0)).sum(),
                (in_active & (thr < 0)).sum(),
                record.weights[record.counted].sum(),
                thr.abs()[in_active].sum(),
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
        if self.args.thr_strategy in STRATEGIES_USING_P:  # the others log no `thr/p`
            metrics["thr/p"].append(signed_p(self.args.thr_strategy, record.p))  # the p the weights use
        metrics["thr/seconds"].append(seconds / processes)
        metrics["thr/forward_seconds"].append(forward_seconds / processes)
