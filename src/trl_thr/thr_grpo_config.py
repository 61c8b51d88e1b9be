import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from .thr import (
    DEFAULT_BLOCK_ELEMENTS,
    P_SCHEDULES,
    QUANTILE_SCOPES,
    STRATEGIES,
    STRATEGIES_USING_P,
    THRESHOLD_MODES,
    VOCAB_MODES,
)

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
LOG_NORMALISERS = ("trainer", "exact")
HIDDEN_SOURCES = ("auto", "generate", "forward")


@dataclass
class THRGRPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`THRGRPOTrainer`].

    [`THRGRPOConfig`] inherits every parameter of [`trl.GRPOConfig`] and adds the `thr_*` parameters of Token Hidden
    Reward ([arXiv 2510.03669](https://huggingface.co/papers/2510.03669)). See `docs/theory.md` for the method.

    Parameters:
        > Parameters that control the THR reweighting

        thr_strategy (`str`, *optional*, defaults to `"positive-amplify"`):
            How THR turns into per-token advantage weights: `"positive-amplify"` (exploitation, paper p = +0.1,
            better greedy accuracy), `"negative-amplify"` (exploration, paper p = -0.1, better Pass@K),
            `"amplify"` (uses `thr_p` with its sign, e.g. for a schedule that crosses 0), `"dominant-only"` (keep
            only dominant tokens, p = 0), `"nthr"` (the NTHR baseline, arXiv 2505.18830) or `"none"` (plain GRPO,
            no THR computed).
        thr_p (`float`, *optional*, defaults to `0.1`):
            Amplification `p` in `(1 + p sign(THR))`; must satisfy `|p| < 1`. A magnitude for `"positive-amplify"`
            (uses `+|p|`) and `"negative-amplify"` (uses `-|p|`), signed for `"amplify"`. Paper: 0.1. With a
            schedule, the value at the start of training.
        thr_p_end (`float`, *optional*):
            Value of `p` at the end of training when `thr_p_schedule` is not `"constant"` (our addition; the paper
            names adaptive p as future work).
        thr_p_schedule (`str`, *optional*, defaults to `"constant"`):
            How `p` moves from `thr_p` to `thr_p_end` over training: `"constant"`, `"linear"` or `"cosine"`.
            Follows the optimizer step (progress `global_step / (max_steps - 1)`: the first step uses `thr_p`, the
            last one `thr_p_end`), so a resumed run continues where it stopped.
        thr_threshold (`str`, *optional*, defaults to `"anchor"`):
            Which tokens are dominant (`|THR| > tau`): `"anchor"` (`tau = thr_beta * min over positive completions
            of their mean THR`, the NTHR anchor), `"quantile"` (top `thr_quantile` fraction by `|THR|`),
            `"absolute"` (`tau = thr_tau`) or `"none"` (every token).
        thr_beta (`float`, *optional*, defaults to `1.0`):
            Multiplier of the anchor threshold, `>= 0` (the NTHR anchor uses 1).
        thr_quantile (`float`, *optional*):
            Fraction of tokens kept by `thr_threshold="quantile"`, in `(0, 1]`.
        thr_quantile_scope (`str`, *optional*, defaults to `"group"`):
            Whether the quantile is taken per group or over the whole generation batch (all processes).
        thr_tau (`float`, *optional*):
            Fixed threshold for `thr_threshold="absolute"`.
        thr_vocab (`str`, *optional*, defaults to `"sampled"`):
            Vocabulary of the softmax residuals: `"sampled"` (token ids of the group's completions, the papers'
            choice, cheap) or `"full"` (exact, streamed over the whole vocabulary, about 3 LM-head passes).
        thr_include_self (`bool`, *optional*, defaults to `True`):
            Whether a positive completion's own tokens count in the influence on its tokens (`i = j`); the paper's
            sum includes them.
        thr_positive_reward_threshold (`float`, *optional*):
            If set, the positive set is the completions whose reward is `>= thr_positive_reward_threshold` (the
            paper: correct answers, reward 1). If `None`, completions with advantage `> 0` (identical for 0/1
            rewards).
        thr_positive_reward_func (`str`, *optional*):
            Name of the reward function (as logged under `rewards/<name>`) whose value defines correctness for
            `thr_positive_reward_threshold`. If `None`, the weighted sum of all rewards.
        thr_block_elements (`int`, *optional*, defaults to `16777216`):
            Largest (tokens x vocabulary) block the THR kernel holds in memory at once (float32 values).
        thr_hidden_source (`str`, *optional*, defaults to `"auto"`):
            Where THR's old-policy hidden states come from when TRL runs no old-policy forward of its own (plain
            `generate`, `num_iterations=1`): `"generate"` records them while `generate` decodes (a hook keeping the
            last position of each step and each step's log-normaliser: no extra forward), `"forward"` runs one
            no-grad teacher-forced forward, `"auto"` records where it can (no vLLM, continuous batching, tools,
            `rollout_func` or multimodal input) and falls back to the forward otherwise. `"generate"` raises where
            recording is impossible. Equal to the forward in float32; in bf16 on GPU, KV-cache decoding is not
            bit-identical to a full forward (differences at bf16 round-off). When TRL runs its own old-policy
            forward (vLLM importance sampling, `num_iterations > 1`), THR always reads that one. Our addition.
        thr_log_normaliser (`str`, *optional*, defaults to `"trainer"`):
            Where THR's full-vocabulary log-normaliser comes from: `"trainer"` recovers it from the trainer's own
            log-prob of each sampled token (`LSE = z_y - log pi(y)`, one dot product per token; exact in float32, off
            by the rounding of the trainer's bf16/fp16 logits under mixed precision, see `docs/theory.md`) or
            `"exact"` streams the whole vocabulary in float32 (about one extra LM-head pass, no rounding). Our
            addition; the paper does not say.

    `importance_sampling_level` also accepts `"sequence_token"` (GSPO-token): the sequence-level ratio's value
    with a per-token gradient, which is how THR combines with GSPO. Plain `"sequence"` only sees each completion's
    mean weight.
    """

    # GRPOConfig's field, with the value THR adds named in its help (`trl-thr train --help`); same default.
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "'token' (a ratio per token), 'sequence' (GSPO: one ratio per completion) or "
                  "'sequence_token' (GSPO-token: the sequence ratio's value with a per-token gradient, how THR "
                  "combines with GSPO; added by trl-thr)."},
    )
    thr_strategy: str = field(
        default="positive-amplify",
        metadata={
            "help": "THR strategy: 'positive-amplify' (exploitation, p>0), 'negative-amplify' (exploration, p<0), "
            "'amplify' (signed thr_p), 'dominant-only', 'nthr' or 'none' (plain GRPO).",
            "choices": list(STRATEGIES),
        },
    )
    thr_p: float = field(
        default=0.1,
        metadata={"help": "Amplification p in (1 + p sign(THR)), |p| < 1. Paper: 0.1. Start value under a schedule."},
    )
    thr_p_end: float | None = field(
        default=None,
        metadata={"help": "Value of p at the end of training when thr_p_schedule is 'linear' or 'cosine'."},
    )
    thr_p_schedule: str = field(
        default="constant",
        metadata={"help": "Schedule of p from thr_p to thr_p_end over training.", "choices": list(P_SCHEDULES)},
    )
    thr_threshold: str = field(
        default="anchor",
        metadata={
            "help": "Dominant-token threshold: 'anchor' (thr_beta * min mean THR of positive completions), "
            "'quantile', 'absolute' or 'none'.",
            "choices": list(THRESHOLD_MODES),
        },
    )
    thr_beta: float = field(default=1.0, metadata={"help": "Multiplier of the anchor threshold."})
    thr_quantile: float | None = field(
        default=None, metadata={"help": "Fraction of tokens kept by thr_threshold='quantile', in (0, 1]."}
    )
    thr_quantile_scope: str = field(
        default="group",
        metadata={"help": "Quantile per group or over the generation batch.", "choices": list(QUANTILE_SCOPES)},
    )
    thr_tau: float | None = field(default=None, metadata={"help": "Fixed threshold for thr_threshold='absolute'."})
    thr_vocab: str = field(
        default="sampled",
        metadata={
            "help": "Residual vocabulary: 'sampled' (the group's token ids, paper) or 'full' (exact).",
            "choices": list(VOCAB_MODES),
        },
    )
    thr_include_self: bool = field(
        default=True,
        metadata={"help": "Count a positive completion's influence on its own tokens (i = j)."},
    )
    thr_positive_reward_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Positive completions are those with reward >= this value. If None, those with advantage > 0."
        },
    )
    thr_positive_reward_func: str | None = field(
        default=None,
        metadata={
            "help": "Reward function whose value is compared with thr_positive_reward_threshold. If None, the "
            "weighted sum of all rewards."
        },
    )
    thr_block_elements: int = field(
        default=DEFAULT_BLOCK_ELEMENTS,
        metadata={"help": "Largest (tokens x vocabulary) block the THR kernel holds in memory at once."},
    )

    thr_hidden_source: str = field(
        default="auto",
        metadata={
            "help": "Old-policy hidden states when TRL runs no old-policy forward: 'generate' (recorded during "
            "decoding, no extra forward), 'forward' (one no-grad forward) or 'auto' (generate where possible).",
            "choices": list(HIDDEN_SOURCES),
        },
    )
    thr_log_normaliser: str = field(
        default="trainer",
        metadata={
            "help": "THR's log-normaliser: 'trainer' (recovered from the trainer's log-probs, free) or 'exact' "
            "(streamed over the vocabulary in float32, about one LM-head pass).",
            "choices": list(LOG_NORMALISERS),
        },
    )

    def __post_init__(self):
        if self.max_steps == 0 or self.max_steps < -1:  # transformers would silently train num_train_epochs instead
            raise ValueError(
                f"max_steps={self.max_steps}: give a positive number of optimizer steps, or -1 to train "
                "num_train_epochs epochs."
            )
        super().__post_init__()
        self._check_choice("thr_strategy", STRATEGIES)
        self._check_choice("thr_p_schedule", P_SCHEDULES)
        self._check_choice("thr_threshold", THRESHOLD_MODES)
        self._check_choice("thr_quantile_scope", QUANTILE_SCOPES)
        self._check_choice("thr_vocab", VOCAB_MODES)
        self._check_choice("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)
        self._check_choice("thr_log_normaliser", LOG_NORMALISERS)
        self._check_choice("thr_hidden_source", HIDDEN_SOURCES)
        if self.thr_beta < 0:
            raise ValueError(
                f"thr_beta={self.thr_beta}: the anchor threshold's multiplier must be >= 0 (a negative tau would make "
                "every token dominant; use thr_threshold='none' for that)."
            )

        for name in ("thr_p", "thr_p_end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name}={value!r} must be a number (e.g. 0.1), got {type(value).__name__}.")
            if value is not None and not abs(value) < 1:
                raise ValueError(f"{name}={value}: |p| must be < 1 so that every token weight stays >= 0.")
            if value is not None and value < 0 and self.thr_strategy == "positive-amplify":
                # positive-amplify takes |p|: a negative p would silently exploit where the paper's p = -0.1 explores
                raise ValueError(
                    f"{name}={value} with thr_strategy='positive-amplify', which uses +|p| (exploitation): for "
                    f"exploration (the paper's p = -0.1) use thr_strategy='negative-amplify', or "
                    f"thr_strategy='amplify' with a signed p."
                )
        if self.thr_p_schedule == "constant" and self.thr_p_end is not None:
            raise ValueError(
                f"thr_p_end={self.thr_p_end} is set but thr_p_schedule='constant' ignores it. Set "
                "thr_p_schedule='linear' or 'cosine', or remove thr_p_end."
            )
        if self.thr_p_schedule != "constant":
            if self.thr_p_end is None:
                raise ValueError(
                    f"thr_p_schedule={self.thr_p_schedule!r} needs thr_p_end, the value of p at the end of training."
                )
            if self.thr_strategy not in STRATEGIES_USING_P:
                raise ValueError(
                    f"thr_p_schedule={self.thr_p_schedule!r} has no effect with thr_strategy={self.thr_strategy!r}, "
                    f"which does not use p. Use one of {STRATEGIES_USING_P}."
                )

        if self.thr_threshold == "quantile":
            if self.thr_quantile is None or not 0 < self.thr_quantile <= 1:
                raise ValueError(f"thr_threshold='quantile' needs thr_quantile in (0, 1], got {self.thr_quantile}.")
        elif self.thr_quantile is not None:
            raise ValueError(
                f"thr_quantile={self.thr_quantile} is only used with thr_threshold='quantile' (got "
                f"thr_threshold={self.thr_threshold!r})."
            )
        if self.thr_threshold == "absolute":
            if self.thr_tau is None:
                raise ValueError("thr_threshold='absolute' needs thr_tau, the fixed |THR| threshold.")
        elif self.thr_tau is not None:
            raise ValueError(
                f"thr_tau={self.thr_tau} is only used with thr_threshold='absolute' (got "
                f"thr_threshold={self.thr_threshold!r})."
            )
        if self.thr_positive_reward_func is not None and self.thr_positive_reward_threshold is None:
            raise ValueError(
                f"thr_positive_reward_func={self.thr_positive_reward_func!r} needs thr_positive_reward_threshold "
                "(e.g. 1.0 for a 0/1 accuracy reward)."
            )
        if self.thr_block_elements < 1:
            raise ValueError(f"thr_block_elements must be >= 1, got {self.thr_block_elements}.")
        if self.importance_sampling_level == "sequence_token" and self.loss_type == "vespo":
            raise ValueError(
                "importance_sampling_level='sequence_token' has no effect with loss_type='vespo', which builds its "
                "own sequence weights. Use importance_sampling_level='token'."
            )
        if self.thr_strategy != "none":
            self._check_whole_groups()
            if self.importance_sampling_level == "sequence":
                warnings.warn(
                    "With importance_sampling_level='sequence' (GSPO), the gradient of a completion only sees the sum "
                    "of its THR token weights, not which tokens carry them. Use 'sequence_token' (GSPO-token), as "
                    "the THR paper does.",
                    UserWarning,
                    stacklevel=2,
                )
            if self.multi_objective_aggregation == "normalize_then_sum" and self.thr_positive_reward_threshold is None:
                warnings.warn(
                    "multi_objective_aggregation='normalize_then_sum' centres advantages on the batch, not the "
                    "group, so 'advantage > 0' no longer means better than the rest of the group. Set "
                    "thr_positive_reward_threshold (and thr_positive_reward_func) to define THR's positive set.",
                    UserWarning,
                    stacklevel=2,
                )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")

    def _check_whole_groups(self) -> None:
        # THR compares a completion with the rest of its group, so every process must hold whole groups in the batch
        # it generates (TRL only needs that globally).
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % self.num_generations != 0:
            raise ValueError(
                f"THR needs whole groups on each process: per_device_train_batch_size * steps_per_generation = "
                f"{self.per_device_train_batch_size} * {self.steps_per_generation} = {local_rows} is not a multiple "
                f"of num_generations={self.num_generations}. Change per_device_train_batch_size or "
                f"steps_per_generation (which defaults to gradient_accumulation_steps) so that their product is a "
                f"multiple of "
                f"{self.num_generations}."
            )
        if self.eval_strategy != "no":
            num_generations_eval = self.num_generations_eval or self.num_generations
            if self.per_device_eval_batch_size % num_generations_eval != 0:
                raise ValueError(
                    f"THR needs whole groups on each process in evaluation: per_device_eval_batch_size="
                    f"{self.per_device_eval_batch_size} is not a multiple of num_generations_eval="
                    f"{num_generations_eval}. Set per_device_eval_batch_size to a multiple of {num_generations_eval}."
                )
