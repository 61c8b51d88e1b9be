"""Reward functions for math RL, named as in `trl grpo`, plus our own and any importable callable.

`reward_funcs` entries are resolved in this order (see `load_reward_funcs`):

1. TRL's registry names, exactly those `trl grpo` accepts (`trl/scripts/grpo.py`, the same in TRL 1.14 and 1.16):
   `accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`, `get_soft_overlong_punishment` (with
   `trl grpo`'s fixed `max_completion_len=1280, soft_punish_cache=256`). The functions are TRL's own, from
   `trl.rewards`.
2. trl-thr's names: `accuracy`, `accuracy_lenient`, `boxed_format`, `think_answer_format` (below).
3. `module:function` (also `module:object.method`).
4. A dotted import path, `my_pkg.rewards.fn`, as `trl grpo` resolves it: module `my_pkg.rewards`, attribute `fn`.

Forms 3 and 4 import with the working directory on `sys.path`, as `trl grpo` does.

Every reward follows TRL's convention: called with `prompts`, `completions`, `completion_ids` and the dataset's
columns (here `solution`, the gold answer) as keyword arguments, it returns one float or `None` per completion.
`None` means "not applicable": TRL leaves it out of the group statistics, and a completion that every reward
function scores `None` gets advantage 0. TRL logs each reward under its function's `__name__`
(`rewards/accuracy_reward/mean`; `get_soft_overlong_punishment` logs as `soft_overlong_punishment_reward`), and
`thr_positive_reward_func` refers to it by that name.

TRL's math rewards are written for TRL's datasets: they read `completion[0]["content"]` (conversational completions
only) and parse `solution` as a worked solution whose answer is marked by `\\boxed{}` or `$...$`. trl-thr's loaders
keep only the final answer in `solution` (`42`, `2\\sqrt{2}`), and its raw-text templates (`r1`) give string
completions. By registry name, TRL's rewards therefore receive string completions as one assistant message and a
gold answer without `\\boxed{}` or an unescaped `$` as `\\boxed{<answer>}` (without that, math-verify cannot
find `2\\sqrt{2}` or `x^2+1` in the gold and the problem is skipped or graded wrong). Imported by dotted path
(`trl.rewards.accuracy_reward`), they get the columns unchanged, exactly as under `trl grpo`.

What happens when a reward misbehaves:

- it returns `None` or NaN for a completion: that value is `None` (not applicable), as above;
- it raises: with `on_error="raise"` (default) training stops with the error; with `on_error="none"` the whole
  batch is scored `None` by that function and a warning with the traceback is logged (once per function).
"""

import importlib
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .answers import grade, last_boxed_content

logger = logging.getLogger(__name__)

_THINK_ANSWER = re.compile(r"^(?:<think>)?.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or the content of the last assistant message."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def accuracy(completions, solution, **kwargs) -> list[float | None]:
    """1.0 if the final answer (tagged or boxed) equals the gold `solution` by `math-verify`, else 0.0.

    `None` for a problem whose gold answer does not parse. The extraction rule is in `trl_thr.cli.answers`.
    """
    results = [grade(completion_text(c), gold) for c, gold in zip(completions, solution, strict=True)]
    return [None if r is None else float(r) for r in results]


def accuracy_lenient(completions, solution, **kwargs) -> list[float | None]:
    """Like `accuracy`, but a completion without a tagged or boxed answer is graded on its last number."""
    results = [grade(completion_text(c), gold, lenient=True) for c, gold in zip(completions, solution, strict=True)]
    return [None if r is None else float(r) for r in results]


def boxed_format(completions, **kwargs) -> list[float]:
    """1.0 if the completion puts a non-empty answer in `\\boxed{}`, else 0.0."""
    return [float(last_boxed_content(completion_text(c)) is not None) for c in completions]


def think_answer_format(completions, **kwargs) -> list[float]:
    """1.0 if the completion is `[<think>] ... </think> <answer> ... </answer>` (the R1 template), else 0.0."""
    return [float(bool(_THINK_ANSWER.match(completion_text(c).strip()))) for c in completions]


REWARDS: dict[str, Callable] = {
    "accuracy": accuracy,
    "accuracy_lenient": accuracy_lenient,
    "boxed_format": boxed_format,
    "think_answer_format": think_answer_format,
}

# `trl grpo`'s `reward_funcs_registry`. TRL builds it inside `trl/scripts/grpo.py:main`, so it cannot be imported;
# `tests/test_rewards.py` reads that source and fails if the names or the soft-overlong arguments change.
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")
TRL_SOFT_OVERLONG_ARGS = {"max_completion_len": 1280, "soft_punish_cache": 256}

ACCEPTED_FORMS = (
    f"a TRL reward ({', '.join(TRL_REWARDS)}), a trl-thr reward ({', '.join(REWARDS)}), "
    "a dotted import path (my_pkg.rewards.fn) or module:function"
)


def trl_reward(name: str) -> Callable:
    """The callable `trl grpo` uses for registry name `name`, taken from `trl.rewards`."""
    from trl import rewards

    if name == "get_soft_overlong_punishment":
        return rewards.get_soft_overlong_punishment(**TRL_SOFT_OVERLONG_ARGS)
    return getattr(rewards, name)


_MATH_DELIMITER = re.compile(r"\\boxed|(?<!\\)\$")  # `\$` is a dollar sign (`\$18.90`), not math mode


def _as_trl_gold(gold):
    """A bare final answer as a solution text TRL's math-verify rewards can parse; a marked-up one unchanged."""
    if isinstance(gold, str) and not _MATH_DELIMITER.search(gold):
        return f"\\boxed{{{gold}}}"
    return gold


class TRLConventions:
    """One of TRL's rewards, fed trl-thr's columns in the form TRL's rewards read (see the module docstring).

    A class rather than a closure so the reward stays picklable, as TRL's own rewards are.
    """

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.__doc__ = func.__doc__

    def __call__(self, **kwargs):  # TRL passes every reward argument by keyword
        if "completions" in kwargs:
            kwargs["completions"] = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c
                                     for c in kwargs["completions"]]
        if "solution" in kwargs:
            kwargs["solution"] = [_as_trl_gold(gold) for gold in kwargs["solution"]]
        return self.func(**kwargs)


def _import_attribute(spec: str, module_name: str, attr: str) -> Callable:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a reward module next to the config, as with `trl grpo`
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({error}).") from error
    func = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}.")
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(f"reward {spec!r} is not callable.")
    return func


def resolve_reward(spec: str) -> Callable:
    """The callable for one `reward_funcs` entry, in the order of the module docstring."""
    if spec in TRL_REWARDS:
        return TRLConventions(trl_reward(spec))
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    elif "." in spec:
        module_name, _, attr = spec.rpartition(".")
    else:
        raise ValueError(f"reward {spec!r} is unknown: use {ACCEPTED_FORMS}.")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r} is malformed: use {ACCEPTED_FORMS}.")
    return _import_attribute(spec, module_name, attr)


class GuardedReward:
    """A reward under the name TRL logs it by, with NaN read as `None` and exceptions handled per `on_error`.

    A class rather than a closure so the reward stays picklable (TRL's async rollout worker sends reward functions
    to a child process).
    """

    def __init__(self, func: Callable, name: str, on_error: str):
        self.func, self.__name__, self.on_error = func, name, on_error
        self.__doc__ = func.__doc__
        self._warned = False

    def _none_batch(self, completions) -> list[None]:
        if not self._warned:
            logger.warning("reward %r raised; scoring the batch None (on_error='none').", self.__name__,
                           exc_info=True)
            self._warned = True
        return [None] * len(completions)

    @staticmethod
    def _not_applicable_as_none(values) -> list:
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]

    def __call__(self, **kwargs):
        try:
            values = self.func(**kwargs)
        except Exception:
            if self.on_error == "raise":
                raise
            return self._none_batch(kwargs["completions"])
        return self._not_applicable_as_none(values)


class AsyncGuardedReward(GuardedReward):
    """`GuardedReward` for an `async` reward: TRL awaits it, concurrently with the other async rewards."""

    async def __call__(self, **kwargs):
        try:
            values = await self.func(**kwargs)
        except Exception:
            if self.on_error == "raise":
                raise
            return self._none_batch(kwargs["completions"])
        return self._not_applicable_as_none(values)


def reads_answer(func: Callable) -> bool:
    """Whether a reward takes the gold answer, i.e. names a `solution` parameter (as every accuracy reward, TRL's
    included, does). A callable whose signature cannot be read is assumed to."""
    while isinstance(func, (TRLConventions, GuardedReward)):
        func = func.func
    try:
        return "solution" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True


def load_reward_funcs(specs: list[str], on_error: str = "raise") -> list[Callable]:
    """Reward callables for `reward_funcs` entries: TRL's and our names, `module:function`, dotted paths."""
    if on_error not in ("raise", "none"):
        raise ValueError(f"reward_on_error={on_error!r} must be 'raise' or 'none'.")
    if not specs:
        raise ValueError(f"reward_funcs is empty; give at least one reward: {ACCEPTED_FORMS}.")
    from trl.trainer.utils import get_callable_name, is_async_callable

    funcs = []
    for spec in specs:
        func = resolve_reward(spec)
        guard = AsyncGuardedReward if is_async_callable(func) else GuardedReward
        funcs.append(guard(func, get_callable_name(func), on_error))
    return funcs
