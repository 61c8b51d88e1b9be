"""Answer extraction, grading and reward functions (correct, wrong, unparseable, None, raising), and how
`reward_funcs` entries resolve: TRL's registry names as in `trl grpo`, dotted paths, ours, `module:function`."""

import ast
import asyncio
import importlib.util
import math
import pickle
import sys
import textwrap

import pytest

from trl_thr.cli.answers import extract_final_answer, grade, last_boxed_content
from trl_thr.cli.rewards import (
    TRL_REWARDS,
    TRL_SOFT_OVERLONG_ARGS,
    accuracy,
    accuracy_lenient,
    boxed_format,
    load_reward_funcs,
    think_answer_format,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{12}.", "12"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ {a}+{b} }", "{a}+{b}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and an empty \\boxed{}", "3"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_extraction_rule():
    assert extract_final_answer("<think>\\boxed{1}</think><answer>5</answer>") == "5"
    assert extract_final_answer("<answer>the value is \\boxed{6}</answer>") == "6"
    assert extract_final_answer("12 + 3 = 15, so 15") is None
    assert extract_final_answer("12 + 3 = 15, so 1,500", lenient=True) == "1500"
    assert extract_final_answer("\\boxed{4} but 9", lenient=True) == "4"
    assert extract_final_answer("<answer></answer>") is None


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("\\boxed{12}", "12", True),
        ("\\boxed{12.0}", "12", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{13}", "12", False),
        ("The answer is 12.", "12", False),  # missing box: wrong in strict mode
        ("\\boxed{$%^&}", "12", False),  # unparseable answer
        ("\\boxed{12}", "", None),  # gold does not parse: ungradable
    ],
)
def test_grade(completion, gold, expected):
    assert grade(completion, gold) is expected


def test_accuracy_rewards():
    completions = ["\\boxed{4}", "it is 4", "\\boxed{5}", [{"role": "assistant", "content": "\\boxed{4}"}]]
    assert accuracy(completions, solution=["4", "4", "4", "4"]) == [1.0, 0.0, 0.0, 1.0]
    assert accuracy_lenient(completions, solution=["4", "4", "4", "4"]) == [1.0, 1.0, 0.0, 1.0]
    assert accuracy(["\\boxed{4}"], solution=[""]) == [None]


def test_format_rewards():
    assert boxed_format(["\\boxed{1}", "\\boxed{}", "1"]) == [1.0, 0.0, 0.0]
    assert think_answer_format(["<think>a</think> <answer>1</answer>", "a</think><answer>1</answer>",
                                "<answer>1</answer>", "<think>a</think><answer>1</answer> trailing"]) == [
        1.0, 1.0, 0.0, 0.0]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math

        def half(completions, **kwargs):
            return [0.5] * len(completions)

        def sometimes_undefined(completions, **kwargs):
            return [(None, math.nan, 1.0)[i % 3] for i in range(len(completions))]

        def broken(completions, **kwargs):
            raise RuntimeError("grader crashed")

        async def remote(completions, **kwargs):
            return [math.nan if c == "?" else 1.0 for c in completions]

        class Scorer:
            def length(self, completions, **kwargs):
                return [float(len(c)) for c in completions]

        scorer = Scorer()
        not_callable = 3
    """))
    monkeypatch.chdir(tmp_path)
    yield
    sys.modules.pop("my_rewards", None)


def test_load_by_name_and_module_function(reward_module):
    funcs = load_reward_funcs(["accuracy", "my_rewards:half", "my_rewards:scorer.length"])
    assert [f.__name__ for f in funcs] == ["accuracy", "half", "length"]
    assert funcs[1](completions=["a", "b"]) == [0.5, 0.5]
    assert funcs[2](completions=["ab"]) == [2.0]


def test_none_and_nan_mean_not_applicable(reward_module):
    (func,) = load_reward_funcs(["my_rewards:sometimes_undefined"])
    assert func(completions=["a", "b", "c"]) == [None, None, 1.0]


def test_raising_reward_follows_on_error(reward_module, caplog):
    (strict,) = load_reward_funcs(["my_rewards:broken"])
    with pytest.raises(RuntimeError, match="grader crashed"):
        strict(completions=["a"])
    (lenient,) = load_reward_funcs(["my_rewards:broken"], on_error="none")
    with caplog.at_level("WARNING"):
        assert lenient(completions=["a", "b"]) == [None, None]
    assert "reward 'broken' raised" in caplog.text


def test_dotted_import_path_as_in_trl_grpo(reward_module):
    half, digits, trl_format = load_reward_funcs(["my_rewards.half", "trl_thr.tiny.digit_reward",
                                                  "trl.rewards.think_format_reward"])
    assert [f.__name__ for f in (half, digits, trl_format)] == ["half", "digit_reward", "think_format_reward"]
    assert half(completions=["a"]) == [0.5] and digits(completions=["a1"]) == [0.5]
    # By path, TRL's function gets the completions unchanged, as under `trl grpo`: conversational ones here.
    assert trl_format(completions=[[{"content": "<think>a</think>b"}]]) == [1.0]


def trl_grpo_registry() -> dict[str, ast.Call | ast.Name]:
    """`reward_funcs_registry` as written in the installed TRL's `trl/scripts/grpo.py`."""
    source = open(importlib.util.find_spec("trl.scripts.grpo").origin).read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "reward_funcs_registry":
            return {key.value: value for key, value in zip(node.value.keys, node.value.values, strict=True)}
    raise AssertionError("trl/scripts/grpo.py no longer builds reward_funcs_registry: re-check TRL_REWARDS")


def test_trl_registry_names_match_trl_grpo():
    registry = trl_grpo_registry()
    assert tuple(registry) == TRL_REWARDS
    overlong = registry["get_soft_overlong_punishment"]
    assert {k.arg: k.value.value for k in overlong.keywords} == TRL_SOFT_OVERLONG_ARGS
    plain = {k: v for k, v in registry.items() if k != "get_soft_overlong_punishment"}
    assert all(isinstance(v, ast.Name) and v.id == k for k, v in plain.items())  # trl.rewards' functions as they are


def test_trl_rewards_by_name_are_trls_own():
    from trl import rewards

    funcs = load_reward_funcs(list(TRL_REWARDS))
    assert [f.__name__ for f in funcs] == ["accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
                                           "soft_overlong_punishment_reward"]  # the names TRL logs them under
    assert funcs[0].func.func is rewards.accuracy_reward
    (overlong,) = load_reward_funcs(["get_soft_overlong_punishment"])
    assert overlong(completions=["a", "b"], completion_ids=[[1] * 1024, [1] * 1281]) == [0.0, -1.0]


GOLDS = ["42", "\\frac{1}{2}", "2\\sqrt{2}", "x^2+1", "\\dfrac{3}{4}", "(1,2)", "A", "\\$18.90", "\\boxed{7}", "$5$"]


def test_trl_accuracy_reads_our_columns_like_our_accuracy():
    """Our loaders keep only the final answer in `solution`, and raw-text templates give string completions."""
    from trl.rewards import accuracy_reward

    answers = [g.replace("\\boxed{7}", "7").replace("\\$", "").strip("$") for g in GOLDS]
    right = [f"so \\boxed{{{a}}}" for a in answers]
    wrong = ["so \\boxed{13}"] * len(GOLDS)
    (trl_accuracy,) = load_reward_funcs(["accuracy_reward"])
    as_text = trl_accuracy(completions=right + wrong, solution=GOLDS * 2)
    as_messages = trl_accuracy(completions=[[{"role": "assistant", "content": c}] for c in right + wrong],
                               solution=GOLDS * 2)
    expected = [1.0] * len(GOLDS) + [0.0] * len(GOLDS)
    assert as_text == as_messages == accuracy(right + wrong, solution=GOLDS * 2) == expected
    # TRL's function on the same columns as they are: LaTeX gold answers without $ or \boxed are skipped or wrong.
    raw = accuracy_reward([[{"content": c}] for c in right], solution=GOLDS)
    assert raw[GOLDS.index("x^2+1")] is None and raw[GOLDS.index("\\$18.90")] is None
    assert raw[GOLDS.index("2\\sqrt{2}")] == 0.0


def test_trl_format_and_reasoning_rewards_take_text_completions():
    think, reasoning = load_reward_funcs(["think_format_reward", "reasoning_accuracy_reward"])
    completions = ["<think>a</think> \\boxed{3}", "\\boxed{3}"]
    assert think(completions=completions) == [1.0, 0.0]
    assert reasoning(completions=completions, solution=["3", "3"]) == [1.0, 0.0]


def test_async_reward_stays_async(reward_module):
    from trl.trainer.utils import is_async_callable

    (func,) = load_reward_funcs(["my_rewards:remote"])
    assert is_async_callable(func) and func.__name__ == "remote"
    assert asyncio.run(func(completions=["a", "?"])) == [1.0, None]


def test_loaded_rewards_pickle(reward_module):
    """TRL's async rollout worker sends reward functions to a child process."""
    funcs = load_reward_funcs(["accuracy", "accuracy_reward", "get_soft_overlong_punishment", "my_rewards.half"])
    restored = pickle.loads(pickle.dumps(funcs))
    assert [f.__name__ for f in restored] == [f.__name__ for f in funcs]
    assert restored[3](completions=["a"]) == [0.5]


@pytest.mark.parametrize(
    "specs,message",
    [
        (["acuracy"], r"^reward 'acuracy' is unknown: use a TRL reward \(accuracy_reward, .*\), a trl-thr reward "
                      r"\(accuracy, .*\), a dotted import path \(my_pkg.rewards.fn\) or module:function\.$"),
        (["my_rewards."], "is malformed: use a TRL reward"),
        (["no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["no_such_module_xyz.f"], "cannot import module 'no_such_module_xyz'"),
        (["my_rewards:missing"], "has no attribute 'missing'"),
        (["my_rewards.missing"], "has no attribute 'missing'"),
        (["my_rewards:not_callable"], "is not callable"),
        ([], "reward_funcs is empty"),
    ],
)
def test_bad_reward_specs(specs, message, reward_module):
    with pytest.raises(ValueError, match=message):
        load_reward_funcs(specs)


def test_bad_on_error():
    with pytest.raises(ValueError, match="reward_on_error='skip' must be"):
        load_reward_funcs(["accuracy"], on_error="skip")


def test_trainer_survives_none_nan_and_raising_rewards(tiny_model_path, tmp_path, reward_module):
    """Rows every reward scores None get advantage 0; a raising reward with on_error='none' drops out."""
    from helpers import length_reward, tiny_dataset

    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    funcs = load_reward_funcs(["my_rewards:broken", "my_rewards:sometimes_undefined"], on_error="none")
    args = THRGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                         report_to="none", save_strategy="no", per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=8, max_steps=1, logging_steps=1)
    trainer = THRGRPOTrainer(model=tiny_model_path, reward_funcs=funcs + [length_reward], args=args,
                             train_dataset=tiny_dataset())
    trainer.train()
    log = trainer.state.log_history[0]
    broken_mean = log["rewards/broken/mean"]  # every value was None: the mean is undefined
    assert broken_mean is None or math.isnan(broken_mean)
    assert math.isfinite(log["loss"])
