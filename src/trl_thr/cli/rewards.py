"""Reward functions for math RL, by name, plus any Python callable given as `module:function`.

Every reward follows TRL's convention: called with `prompts`, `completions`, `completion_ids` and the dataset's
columns (here `solution`, the gold answer) as keyword arguments, it returns one float or `None` per completion.
`None` means "not applicable": TRL leaves it out of the group statistics, and a completion that every reward
function scores `None` gets advantage 0.

What happens when a reward misbehaves (see `load_reward_funcs`):

- it returns `None` or NaN for a completion: that value is `None` (not applicable), as above;
- it raises: with `on_error="raise"` (default) training stops with the error; with `on_error="none"` the whole
  batch is scored `None` by that function and a warning with the traceback is logged (once per function).
"""

import importlib
import logging
import math
import re
import sys
from collections.abc import Callable
from functools import wraps
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


def _import_callable(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r} must be a name ({', '.join(REWARDS)}) or 'module:function'.")
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


def _guard(func: Callable, name: str, on_error: str) -> Callable:
    """NaN becomes None; exceptions follow `on_error`. The wrapper keeps the name TRL logs under."""
    warned = []

    @wraps(func)
    def guarded(*args, **kwargs):
        try:
            values = func(*args, **kwargs)
        except Exception:
            if on_error == "raise":
                raise
            if not warned:
                logger.warning("reward %r raised; scoring the batch None (on_error='none').", name, exc_info=True)
                warned.append(True)
            return [None] * len(kwargs["completions"])
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]

    guarded.__name__ = name
    return guarded


def load_reward_funcs(specs: list[str], on_error: str = "raise") -> list[Callable]:
    """Reward callables from names in `REWARDS` or `module:function` specs."""
    if on_error not in ("raise", "none"):
        raise ValueError(f"reward_on_error={on_error!r} must be 'raise' or 'none'.")
    if not specs:
        raise ValueError(f"reward_funcs is empty; give at least one of {', '.join(REWARDS)} or 'module:function'.")
    funcs = []
    for spec in specs:
        func = REWARDS[spec] if spec in REWARDS else _import_callable(spec)
        name = spec if spec in REWARDS else getattr(func, "__name__", spec.split(":")[-1])
        funcs.append(_guard(func, name, on_error))
    return funcs
