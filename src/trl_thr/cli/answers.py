"""Final-answer extraction and grading with `math-verify`.

The rule, used by training rewards and by `trl-thr eval` alike:

1. If the completion has `<answer>...</answer>` tags, the last tagged span is the answer region (a `\\boxed{}`
   inside it wins over the rest of the span).
2. Otherwise the content of the last non-empty `\\boxed{...}` (or `\\fbox{...}`), with nested braces.
3. Only in lenient mode, when neither is present: the last number in the completion (thousands commas dropped).
4. No answer found: graded wrong.

The answer and the gold answer are both parsed by `math_verify.parse` as `\\boxed{<text>}`, and compared with
`math_verify.verify` (symbolic and numeric equivalence: `1/2 = 0.5 = \\frac{1}{2}`, `12 = 12.0`). A gold answer that
does not parse makes the problem ungradable (`None`).
"""

import re
import threading
from functools import lru_cache

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed_content(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` in `text`, braces balanced; `None` if there is none."""
    found = None
    for match in _BOX.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    content = text[start:position].strip()
                    if content:
                        found = content
                    break
    return found


def extract_final_answer(text: str, lenient: bool = False) -> str | None:
    """The completion's final answer by the module's rule, or `None` if it has none."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        region = tagged[-1]
        answer = last_boxed_content(region) or region.strip()
        return answer or None
    boxed = last_boxed_content(text)
    if boxed is not None:
        return boxed
    if lenient:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


def _timeouts() -> dict:
    # math-verify's timeouts use signals, which only work on the main thread.
    on_main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if on_main else None}


@lru_cache(maxsize=65536)
def _parse_boxed(text: str):
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{text}}}", **_timeouts()))


def is_equivalent(answer: str | None, gold: str) -> bool | None:
    """Whether `answer` equals `gold` mathematically; `None` if `gold` itself does not parse."""
    from math_verify import verify

    gold_parsed = _parse_boxed(str(gold))
    if not gold_parsed:
        return None
    if answer is None:
        return False
    answer_parsed = _parse_boxed(answer)
    if not answer_parsed:
        return False
    on_main = threading.current_thread() is threading.main_thread()
    return bool(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=5 if on_main else None))


def grade(completion: str, gold: str, lenient: bool = False) -> bool | None:
    """Grade a completion against a gold answer: extract, then compare; `None` if ungradable."""
    return is_equivalent(extract_final_answer(completion, lenient=lenient), gold)
