"""What THR needs from the old policy, recorded while TRL's plain `generate` decodes: no extra forward.

THR (`trl_thr.thr.compute_thr`) needs, for every completion token `y_{j,t}`, the final-norm hidden state
`h_{j,t}` `(d,)` that predicted it and the full-vocabulary log-normaliser `LSE_{j,t}` of the trainer's
transformed logits (it recovers `LSE` from `token_logprobs` as `z_y - log pi(y)`). A KV-cache decoder computes
exactly these while it samples: the prefill's last position predicts completion token 0, decode step `t` predicts
token `t`. [`GenerationCapture`] records them around one `model.generate(...)` call:

- a forward hook on the backbone (whose output TRL's log-probs project) keeps the last position of each call:
  `(B, d)` per step, a detached copy; `output_hidden_states` is never requested (it holds every layer);
- a forward hook on the LM head reduces that step's last-position logits to `(B,)` at once, in float32, under
  the trainer's transform (logit scale, then soft-cap, then / temperature, as `trl_thr.thr.transform_logits` and
  TRL's log-probs): no `(B, V)` tensor outlives a step;
- a forward pre-hook on the backbone notes each call's input length, cache length and input ids, so that
  [`GenerationCapture.align`] can prove the records are one contiguous decode of the batch it is given.

[`GenerationCapture.align`] then returns `(hidden (B, T, d), token_logprobs (B, T))` aligned 1:1 with TRL's
`completion_ids` / `completion_mask`, or `None` (with the reason in `GenerationCapture.reason`) whenever the
records cannot be proven to belong to those completions. The caller then runs the teacher-forced forward instead;
capture never silently misaligns.

Where it plugs into TRL 1.14 and 1.16 (`trl/trainer/grpo_trainer.py`)
--------------------------------------------------------------------
`GRPOTrainer._generate_and_score_completions` calls `_generate(prompts)`, which calls
`_generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)` once per generation batch (and
again per tool turn from `_tool_call_loop`). On the transformers path (`use_vllm=False`,
`use_transformers_continuous_batching=False`) that method left-pads the prompts of the whole generation batch
(`per_device_train_batch_size * steps_per_generation` rows on this process, not in chunks; to the longest prompt on
1.14, to `pad_to_multiple_of` on 1.16) and calls
`unwrapped_model.generate(**generate_inputs, generation_config=self.generation_config)` exactly once, inside
`unwrap_model_for_generation(self.model_wrapped, ...)`, `torch.no_grad()` and FSDP1's `summon_full_params`.
`self.generation_config` is built with `disable_compile=True` (no compiled decode step whose graph could skip
hooks), `max_new_tokens=max_completion_length` and the trainer's `eos_token_ids`. It then keeps the tokens up to
and including the first EOS of each row; `_generate_and_score_completions` right-pads them into `completion_ids`
/ `completion_mask` (with `pad_to_multiple_of`) and left-pads the prompts the same way into `prompt_ids`.

- `generate` runs the model's original forward: 1.14 has no fused head, and 1.16's `add_fused_lm_head` only takes
  the fused path when `fused_lm_head=True` is passed, which `generate` never does, so the backbone and LM head
  modules run once per decoding step, and the hooks see every step.
- `unwrap_model_for_generation` yields `accelerator.unwrap_model(model_wrapped)`, the same module objects as
  `accelerator.unwrap_model(self.model)`; under ZeRO-3 it gathers the weights (`GatheredParameters`) and removes
  only DeepSpeed's own hooks (`remove_hooks` clears the `forward_hooks` list DeepSpeed keeps), so hooks
  registered here still fire, on gathered weights. Under ZeRO-3 or FSDP with several processes, transformers sets
  `synced_gpus=True`: a process that has finished keeps calling forward until all have; those extra steps come
  after its last token and [`align`](GenerationCapture.align) drops them (as it drops the step `DeferredStopCheck`
  undoes on MPS).

What the trainer wraps: `_generate_single_turn`, only for the first call of a generation batch, and only on the
plain path (see [`capture_unsupported_reason`]): no vLLM, no continuous batching, no tools or environments (they
call `generate` again per turn), no `rollout_func`, no images or other multimodal fields. Build the capture from
`accelerator.unwrap_model(self.model)` with [`GenerationCapture.from_model`], which finds the modules the way
TRL's log-prob forward does: under PEFT `get_base_model()` first (the LoRA layers live inside it, so the states are
the adapted policy's), then `base_model` (the backbone, e.g. `Qwen2Model`, whose output is the final-norm hidden
state) and `get_output_embeddings()` (the LM head). After `super()._generate_and_score_completions` returns,
call `align(batch["completion_ids"], batch["completion_mask"], weight, bias, prompt_ids=batch["prompt_ids"],
prompt_mask=batch["prompt_mask"])` inside `full_lm_head(...)` (the whole head weight, also under ZeRO-3/FSDP2),
and fall back to the teacher-forced forward on `None`.

Exactness and its limits
------------------------
In float32 the captured states equal a teacher-forced forward over prompt + completion to round-off (tested to
1e-5 relative on CPU): the key/value cache holds the same keys and values, and rotary position ids shifted by
left padding (`generate` counts positions from the first real token, a plain forward from the first column)
leave attention unchanged because rotary attention depends on relative positions only. In bfloat16 on a GPU,
KV-cache decoding is *not* bit-identical to a full forward: a decode step multiplies `(B, 1, d)` against the
cache with other kernels and reduction orders than a `(B, L, d)` forward, and the step's logits are rounded to
the model dtype before the float32 log-sum-exp. Captured states, log-probs and hence THR then differ from the
forward path's at bfloat16 round-off, as vLLM's log-probs differ from the trainer's; the trainer's config can
force the teacher-forced forward where that matters. With dropout active in training mode, generation and a teacher-forced forward draw
different masks; neither is more correct.

Memory: the captured states total `(B, T, d)` in the model dtype, what the forward path holds today, plus `(B,)`
float32 and `(B,)` ids per step. `align` stacks the per-step lists once and frees them (the stack briefly holds
both, after `generate` has released its KV cache, which is larger).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .thr import transform_logits

# Largest number of gathered LM-head values (tokens x d) `align` materialises at once: 64 MiB in float32.
_ALIGN_BLOCK_ELEMENTS = 2**24


@dataclass
class _BackboneCall:
    """One backbone call as the pre-hook saw it: input length, cache length before the call (`None` if the call
    carried no cache), its input ids `(B, L)` (`None` if it ran on `inputs_embeds`) and, for the first call only,
    its 2-D attention mask `(B, L)` (the prompts' left padding)."""

    length: int
    cache_length: int | torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None


def _cache_length(cache) -> int | torch.Tensor | None:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return None
    return cache.get_seq_length()


class GenerationCapture:
    """Records, around one `model.generate(...)` call, what THR needs: per step the final-norm hidden state
    `(B, d)` that predicts the next token and the full-vocabulary log-normaliser `(B,)` of the transformed logits.

    Args:
        backbone (`torch.nn.Module`):
            The module whose output's `last_hidden_state` the LM head projects (TRL's log-probs project the same
            one: `causal_lm.base_model`).
        lm_head (`torch.nn.Module`):
            The LM head (`causal_lm.get_output_embeddings()`), called once per step on the backbone's output.
        temperature, logit_scale, logit_softcap:
            The trainer's logit transform (see `trl_thr.thr.transform_logits`).

    Use [`recording`] around the `generate` call, then [`align`] on the completions TRL built from its output.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        lm_head: torch.nn.Module,
        *,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        logit_softcap: float | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.backbone = backbone
        self.lm_head = lm_head
        self.logit_kwargs = {"temperature": temperature, "logit_scale": logit_scale, "logit_softcap": logit_softcap}
        self.reason: str | None = None  # why the last `align` returned None
        self._recording = False
        self._reset()

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        *,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        logit_softcap: float | None = None,
    ) -> GenerationCapture:
        """A capture on the backbone and LM head of `model`, found as TRL's log-prob forward finds them.

        `model` is the unwrapped causal LM (`accelerator.unwrap_model(trainer.model)`), a PEFT model or not: under
        PEFT its `get_base_model()` is used, whose modules carry the adapter layers, so the states are the adapted
        policy's.
        """
        causal_lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        backbone = getattr(causal_lm, "base_model", None)
        if not isinstance(backbone, torch.nn.Module) or backbone is causal_lm:
            raise ValueError(
                f"{type(causal_lm).__name__} exposes no backbone through `base_model`; generation capture needs a "
                "transformers causal LM whose `base_model` returns the final-norm hidden states."
            )
        lm_head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
        if not isinstance(lm_head, torch.nn.Module):
            raise ValueError(
                f"{type(causal_lm).__name__} has no output embeddings (`get_output_embeddings()` is None); "
                "generation capture needs the LM head module."
            )
        return cls(backbone, lm_head, temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap)

    # ---- recording ------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._calls: list[_BackboneCall] = []
        self._hidden_steps: list[torch.Tensor] = []  # (B, d) each, model dtype
        self._lse_steps: list[torch.Tensor] = []  # (B,) each, float32
        self._head_mismatch: torch.Tensor | None = None  # 0-d bool on device: head input != backbone output
        self._problems: list[str] = []

    @property
    def num_steps(self) -> int:
        """Forward calls recorded by the last [`recording`] block."""
        return len(self._hidden_steps)

    def _before_backbone(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = input_ids if input_ids is not None else embeds
        if source is None:
            self._problems.append("a backbone call had neither input_ids nor inputs_embeds")
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        self._calls.append(
            _BackboneCall(
                length=source.shape[1],
                cache_length=_cache_length(cache),
                input_ids=None if input_ids is None else input_ids.detach(),
                # The prompt check only needs the prefill's 2-D padding mask; later masks grow by one per step.
                attention_mask=mask.detach() if isinstance(mask, torch.Tensor) and not self._calls else None,
            )
        )

    def _after_backbone(self, module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)) and output:
            hidden = output[0]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            self._problems.append(f"the backbone returned no (B, L, d) last_hidden_state ({type(output).__name__})")
            return
        # The last position predicts the next token; a copy so the step's (B, L, d) output is freed with it.
        self._hidden_steps.append(hidden[:, -1].detach().clone())

    def _after_lm_head(self, module, args, kwargs, output) -> None:
        head_input = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3) or not isinstance(head_input,
                                                                                                  torch.Tensor):
            self._problems.append("the LM head was called with or returned something other than a tensor")
            return
        if len(self._lse_steps) != len(self._hidden_steps) - 1:
            self._problems.append("the LM head ran without a backbone call before it")
            return
        logits = output[:, -1] if output.dim() == 3 else output
        self._lse_steps.append(transform_logits(logits.detach().float(), **self.logit_kwargs).logsumexp(-1))
        # The log-normaliser belongs to the backbone's state only if the head projected that very state (some
        # models transform it in between). Checked on the device; read once in `align`, not per step.
        last = head_input[:, -1] if head_input.dim() == 3 else head_input
        state = self._hidden_steps[-1]
        if last.shape != state.shape:
            mismatch = torch.ones((), dtype=torch.bool, device=state.device)
        else:  # a cast to a wider dtype before the head is harmless; a rounding one is caught here
            mismatch = (last.detach().to(device=state.device, dtype=state.dtype) != state).any()
        self._head_mismatch = mismatch if self._head_mismatch is None else self._head_mismatch | mismatch

    @contextmanager
    def recording(self):
        """Record every backbone / LM-head call of the block; the hooks are removed on exit, also on errors.

        Meant for exactly one `generate` call; [`align`] refuses anything else.
        """
        if self._recording:
            raise RuntimeError("GenerationCapture.recording() is already active; it records one generate call.")
        self._reset()
        self.reason = None
        self._recording = True
        handles = []
        try:
            handles.append(self.backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True))
            handles.append(self.backbone.register_forward_hook(self._after_backbone))
            handles.append(self.lm_head.register_forward_hook(self._after_lm_head, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._recording = False

    # ---- alignment ------------------------------------------------------------------------------------------------

    def _unaligned(self, reason: str) -> None:
        self.reason = reason
        self._reset()  # what cannot be aligned is not kept
        return None

    def _layout_problem(self, batch_size: int, prompt_ids, prompt_mask) -> str | None:
        """Why the records are not one contiguous KV-cache decode of `batch_size` rows, or None."""
        if self._problems:
            return self._problems[0]
        calls, steps = self._calls, len(self._hidden_steps)
        if steps == 0:
            return "nothing was recorded (generate did not run inside recording(), or the hooks did not fire)"
        if not (len(calls) == steps == len(self._lse_steps)):
            return (f"{len(calls)} backbone calls, {steps} backbone outputs and {len(self._lse_steps)} LM-head "
                    "calls: not one LM-head call per backbone call")
        if calls[0].cache_length is not None and int(calls[0].cache_length) != 0:
            return "the first recorded call continued a non-empty cache: not the prefill of a generate call"
        previous = calls[0]
        for index, call in enumerate(calls[1:], start=1):
            if call.length != 1:
                return (f"call {index} fed {call.length} tokens: several generate calls, chunked prefill, "
                        "assisted decoding or decoding without a cache")
            if call.input_ids is None:
                return f"decode step {index} ran on inputs_embeds: its token cannot be checked"
            if call.cache_length is not None and previous.cache_length is not None and int(
                    call.cache_length) != int(previous.cache_length) + previous.length:
                return f"the cache does not grow by one token per step at call {index}: not one generate call"
            previous = call
        sizes = {tensor.size(0) for tensor in self._hidden_steps} | {c.input_ids.size(0) for c in calls
                                                                     if c.input_ids is not None}
        if sizes != {batch_size}:
            return (f"generate ran on {sorted(sizes)} rows but the completions have {batch_size} (beam search, "
                    "num_return_sequences or another batch)")
        if self._head_mismatch is not None and bool(self._head_mismatch):
            return "the LM head did not project the backbone's last hidden state"
        if prompt_ids is not None:
            return self._prompt_problem(prompt_ids, prompt_mask)
        return None

    def _prompt_problem(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None) -> str | None:
        prefill = self._calls[0]
        if prefill.input_ids is None:
            return "the prefill ran on inputs_embeds (multimodal input): its prompt cannot be checked"
        generated, given = prefill.input_ids, prompt_ids.to(prefill.input_ids.device)
        generated_mask = prefill.attention_mask
        if generated_mask is None or generated_mask.shape != generated.shape:
            generated_mask = torch.ones_like(generated)
        given_mask = torch.ones_like(given) if prompt_mask is None else prompt_mask.to(given.device)
        if given.size(0) != generated.size(0):
            return f"generate ran on {generated.size(0)} prompts, the batch has {given.size(0)}"
        # Both are left-padded; compare the real tokens, right-aligned, whatever the padding widths.
        width = max(generated.size(1), given.size(1))

        def right_aligned(ids, mask):
            ids = torch.nn.functional.pad(ids * mask.bool(), (width - ids.size(1), 0))
            return ids, torch.nn.functional.pad(mask.bool(), (width - mask.size(1), 0))

        generated, generated_mask = right_aligned(generated, generated_mask)
        given, given_mask = right_aligned(given, given_mask)
        if not (torch.equal(generated_mask, given_mask) and torch.equal(generated, given)):
            return "the prompts generate ran on are not the batch's prompt_ids"
        return None

    @torch.no_grad()
    def align(
        self,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        lm_head_weight: torch.Tensor,
        lm_head_bias: torch.Tensor | None = None,
        *,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The records as `(hidden (B, T, d), token_logprobs (B, T))` aligned with TRL's completions, or `None`.

        `hidden[j, t]` is the final-norm state that predicted `completion_ids[j, t]`; `token_logprobs[j, t]` is
        `transform(h . W_y + b) - LSE` (0 where the mask is 0), so `compute_thr(hidden, completion_ids,
        completion_mask, lm_head_weight, ..., token_logprobs=token_logprobs, lm_head_bias=lm_head_bias)` uses
        exactly the recorded log-normaliser. `hidden` keeps the model dtype; positions past the recorded steps
        (`pad_to_multiple_of`) are 0.

        Args:
            completion_ids (`torch.Tensor`, `(B, T)`), completion_mask (`torch.Tensor`, `(B, T)`):
                TRL's right-padded completions and their mask (tokens up to and including the first EOS).
            lm_head_weight (`torch.Tensor`, `(V, d)`), lm_head_bias (`torch.Tensor`, `(V,)`, *optional*):
                The whole LM head (gathered under ZeRO-3/FSDP), to compute the sampled tokens' logits.
            prompt_ids (`torch.Tensor`, `(B, P)`), prompt_mask (`torch.Tensor`, `(B, P)`), *optional*:
                TRL's left-padded prompts; when given, they must be the prompts `generate` ran on.

        Returns `None` and sets `self.reason` when the records are not one KV-cache decode of these rows: no or
        several `generate` calls, another batch size, a prompt or token that differs from what was decoded, more
        completion tokens than recorded steps, inputs_embeds (multimodal) decoding. The records are freed in
        either case.
        """
        if self._recording:
            raise RuntimeError("GenerationCapture.align() called inside recording(); call it after the block.")
        if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
            raise ValueError(
                f"completion_ids and completion_mask must both have shape (B, T), got {tuple(completion_ids.shape)} "
                f"and {tuple(completion_mask.shape)}."
            )
        batch_size, length = completion_ids.shape
        problem = self._layout_problem(batch_size, prompt_ids, prompt_mask)
        if problem is not None:
            return self._unaligned(problem)
        if lm_head_weight.dim() != 2 or lm_head_weight.size(1) != self._hidden_steps[0].size(-1):
            raise ValueError(
                f"lm_head_weight must have shape (V, {self._hidden_steps[0].size(-1)}), got "
                f"{tuple(lm_head_weight.shape)}. Under ZeRO-3/FSDP gather the LM head first."
            )

        steps = len(self._hidden_steps)
        device = self._hidden_steps[0].device
        mask = completion_mask.to(device).bool()
        ids = completion_ids.to(device)
        counted = mask.any(dim=0).nonzero()
        used = int(counted.max()) + 1 if counted.numel() else 0  # positions that carry a counted token
        if used > steps:
            return self._unaligned(
                f"the completions count tokens at {used} positions but generate recorded {steps} steps"
            )
        # Decode step t + 1 was fed the token sampled at step t: every counted token but the last step's is seen.
        checked = min(length, steps - 1)
        if checked > 0:
            fed = torch.cat([call.input_ids for call in self._calls[1 : checked + 1]], dim=1)  # (B, checked)
            if not torch.equal(fed[mask[:, :checked]], ids[:, :checked][mask[:, :checked]]):
                return self._unaligned("completion_ids differ from the tokens generate decoded")

        kept = min(length, steps)
        hidden = torch.stack(self._hidden_steps[:kept], dim=1)  # (B, kept, d)
        lse = torch.stack(self._lse_steps[:kept], dim=1)  # (B, kept)
        self._reset()
        if kept < length:  # pad_to_multiple_of padded the completions beyond the last step
            hidden = torch.cat([hidden, hidden.new_zeros(batch_size, length - kept, hidden.size(-1))], dim=1)
            lse = torch.cat([lse, lse.new_zeros(batch_size, length - kept)], dim=1)

        # Same dtype and operations as the kernel's `LSE = z_y - log pi(y)`, so it recovers `lse` to round-off.
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        target_logits = torch.empty(batch_size, length, dtype=dtype, device=device)
        rows = max(1, _ALIGN_BLOCK_ELEMENTS // max(1, length * hidden.size(-1)))
        weight_device = lm_head_weight.device
        for start in range(0, batch_size, rows):
            block_ids = ids[start : start + rows].to(weight_device)
            block_weight = lm_head_weight[block_ids].to(device=device, dtype=dtype)  # (rows, T, d)
            logits = (hidden[start : start + rows].to(dtype) * block_weight).sum(-1)
            if lm_head_bias is not None:
                logits = logits + lm_head_bias[block_ids].to(device=device, dtype=dtype)
            target_logits[start : start + rows] = logits
        token_logprobs = (transform_logits(target_logits, **self.logit_kwargs) - lse.to(dtype)) * mask
        return hidden, token_logprobs.float() if dtype == torch.float32 else token_logprobs


def capture_unsupported_reason(trainer, images=None, multimodal_fields=None) -> str | None:
    """Why generation capture cannot serve this `GRPOTrainer` generation batch, or `None` if it can.

    Reads the trainer attributes TRL (1.14 and 1.16) branches on in `_generate` / `_generate_single_turn`, plus the
    `images` / `multimodal_fields` that `_generate_single_turn` receives. Capture covers one plain transformers
    `generate` call per generation batch on text; [`GenerationCapture.align`] still checks the records it gets.
    """
    if getattr(trainer, "use_vllm", False):
        return "vllm"
    if getattr(trainer, "use_transformers_continuous_batching", False):
        return "continuous batching"
    if getattr(trainer, "rollout_func", None) is not None:
        return "rollout_func"
    if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
        return "tools"
    if getattr(trainer, "_is_vlm", False) or images is not None or multimodal_fields:
        return "multimodal"
    config = getattr(trainer, "generation_config", None)
    if config is not None:
        if (getattr(config, "num_beams", 1) or 1) > 1 or (getattr(config, "num_return_sequences", 1) or 1) > 1:
            return "beam search"
        if getattr(config, "prefill_chunk_size", None) is not None:
            return "chunked prefill"
        if getattr(config, "use_cache", True) is False:
            return "no kv cache"
    return None
