"""Dataset presets (on local copies with the hub schema), local files, offline tasks and templates."""

import json
import re

import pytest
from datasets import Dataset

from trl_thr.cli.data import (
    PRESETS,
    arithmetic_problems,
    champ_problems,
    limit,
    load_local,
    load_math_dataset,
    load_preset,
    normalise_columns,
    reasoning_gym_problems,
    with_prompts,
)
from trl_thr.cli.templates import TEMPLATES, get_template

# One or two rows per preset in the hub dataset's own schema, and the gold answers the loader must produce.
FIXTURES = {
    "math-l3-5": (
        [{"problem": "Compute $1+1$.", "level": "Level 3", "type": "Algebra", "solution": "So $\\boxed{2}$."},
         {"problem": "Easy.", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{0}$"},
         {"problem": "Half?", "level": "Level 5", "type": "Algebra", "solution": "It is $\\boxed{\\frac{1}{2}}$."}],
        ["2", "\\frac{1}{2}"],
    ),
    "deepscaler": ([{"problem": "p", "answer": "17", "solution": "long"}], ["17"]),
    "gsm8k": ([{"question": "q", "answer": "Work...\n#### 1,234"}], ["1234"]),
    "gsm8k-test": ([{"question": "q", "answer": "so\n#### 7"}], ["7"]),
    "math-500": ([{"problem": "p", "answer": "\\sqrt{2}", "solution": "s", "subject": "x", "level": 2,
                   "unique_id": "u"}], ["\\sqrt{2}"]),
    "aime24": ([{"id": 60, "problem": "p", "solution": "s", "answer": "204", "url": "u"}], ["204"]),
    "aime25": ([{"problem": "p", "answer": "70"}], ["70"]),
    "amc23": ([{"id": 0, "question": "q", "answer": 27.0, "url": "u"}], ["27.0"]),
    "minerva": ([{"question": "q", "answer": "4.5e-3"}], ["4.5e-3"]),
    "olympiadbench": ([{"id": 1, "question": "q", "final_answer": ["$\\frac{3}{4}$"], "solution": ["s"]}],
                      ["$\\frac{3}{4}$"]),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_preset_has_a_fixture():
    assert set(FIXTURES) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_preset_loader_on_local_copy(name, tmp_path):
    rows, golds = FIXTURES[name]
    dataset = load_preset(name, data_files=write_jsonl(tmp_path / f"{name}.jsonl", rows))
    assert dataset.column_names == ["question", "solution"]
    assert dataset["solution"] == golds


def test_load_math_dataset_passes_data_files_to_presets(tmp_path):
    rows, golds = FIXTURES["gsm8k"]
    dataset = load_math_dataset("gsm8k", data_files=str(write_jsonl(tmp_path / "g.jsonl", rows)))
    assert dataset["solution"] == golds


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_local_files_detect_columns(suffix, tmp_path):
    frame = Dataset.from_dict({"problem": ["What is 2+2?", "x?"], "answer": ["4", "5"], "extra": [1, 2]})
    path = tmp_path / f"data{suffix}"
    {".json": lambda: frame.to_json(path, lines=False), ".jsonl": lambda: frame.to_json(path),
     ".parquet": lambda: frame.to_parquet(path), ".csv": lambda: frame.to_csv(path)}[suffix]()
    dataset = load_math_dataset(str(path))
    assert dataset["question"] == ["What is 2+2?", "x?"] and dataset["solution"] == ["4", "5"]


def test_local_file_explicit_columns_and_boxed_solutions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "one?", "solution": "thus \\boxed{1}", "answer": "wrong"}])
    dataset = load_local(path, question_column="q", answer_column="solution")
    assert dataset[0] == {"question": "one?", "solution": "1"}


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda p: load_local(p / "missing.jsonl"), FileNotFoundError, "does not exist"),
        (lambda p: load_local(write_jsonl(p / "d.txt", [{}])), ValueError, "unsupported file type"),
        (lambda p: load_local(write_jsonl(p / "d.jsonl", [{"q": "a", "answer": "1"}])), ValueError,
         "Cannot tell which column .* holds the question.*Set question_column"),
        (lambda p: load_local(write_jsonl(p / "d.jsonl", [{"question": "a", "answer": "1"}]), answer_column="gold"),
         ValueError, "answer_column='gold' is not a column"),
        (lambda p: load_local(write_jsonl(p / "d.jsonl", [{"question": "a", "answer": ""}])), ValueError,
         "rows have no gold answer"),
    ],
)
def test_loader_errors(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_arithmetic_is_seeded_and_correct():
    first, again, other = arithmetic_problems(50, seed=3), arithmetic_problems(50, seed=3), arithmetic_problems(50, 4)
    assert first["question"] == again["question"] and first["question"] != other["question"]
    for question, answer in zip(first["question"], first["solution"]):
        expression = re.search(r"What is (\d+) ([-+*]) (\d+)\?", question)
        if expression:
            a, op, b = expression.groups()
            assert int(answer) == eval(f"{a}{op}{b}")  # noqa: S307 - digits and one operator
        else:
            numbers = [int(n) for n in re.findall(r"\d+", question)]
            expected = numbers[0] + numbers[1] if "more" in question else numbers[0] - numbers[1]
            assert int(answer) == expected
    assert all(int(a) >= 0 for a in first["solution"])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        arithmetic_problems(0)


def test_reasoning_gym_task():
    dataset = reasoning_gym_problems("gsm_symbolic", num_samples=3, seed=1)
    assert len(dataset) == 3 and all(dataset["solution"])
    assert load_math_dataset("reasoning-gym:gsm_symbolic", num_samples=3, seed=1)["question"] == dataset["question"]


def test_champ():
    dataset = champ_problems()
    assert len(dataset) == 270
    assert dataset[1]["solution"] == "252"  # "C(10, 5), or equivalently 252"


def test_unknown_dataset_name_is_explained():
    with pytest.raises(ValueError, match="is not a preset .* an offline task"):
        load_math_dataset("no-such-org/no-such-dataset-xyz")


def test_templates_render():
    qwen = get_template("qwen-math-boxed").render("What is 1+1?")
    assert qwen == [{"role": "system", "content": "Please reason step by step, and put your final answer within "
                                                  "\\boxed{}."}, {"role": "user", "content": "What is 1+1?"}]
    chat = get_template("chat-boxed").render("Q")
    assert chat == [{"role": "user", "content": "Q\nPlease reason step by step, and put your final answer within "
                                                "\\boxed{}."}]
    r1 = get_template("r1").render("Find $\\{x\\}$.")
    assert isinstance(r1, str) and r1.endswith("User: Find $\\{x\\}$. Assistant: <think>")
    assert get_template("plain-chat").render("Q") == [{"role": "user", "content": "Q"}]
    custom = get_template("Solve: {question} Answer in \\boxed{}.")
    assert custom.render("1+1") == [{"role": "user", "content": "Solve: 1+1 Answer in \\boxed{}."}]
    assert all(t.describe()["name"] == name for name, t in TEMPLATES.items())
    with pytest.raises(ValueError, match="neither a template name"):
        get_template("qwen")


def test_with_prompts_and_limit():
    dataset = with_prompts(limit(arithmetic_problems(20), 5, seed=0), get_template("plain-chat"))
    assert len(dataset) == 5 and set(dataset.column_names) == {"question", "solution", "prompt"}
    assert dataset[0]["prompt"][0]["content"] == dataset[0]["question"]
    assert len(limit(arithmetic_problems(3), None)) == 3


def test_trl_layout_keeps_its_own_prompts(tmp_path):
    # A `trl grpo` dataset: a ready `prompt` (messages) and a `solution`; no question column, so no template.
    rows = [{"prompt": [{"role": "user", "content": f"What is {n} + 1?"}], "solution": str(n + 1), "source": "x"}
            for n in range(3)]
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = with_prompts(load_math_dataset(str(path)), get_template("qwen-math-boxed"))
    assert dataset.column_names == ["prompt", "solution"]
    assert dataset["prompt"] == [row["prompt"] for row in rows] and dataset["solution"] == ["1", "2", "3"]
    # With a question column as well, the question is the source of truth and the template renders it.
    both = Dataset.from_list([{"prompt": "ignored", "question": "What is 1 + 1?", "answer": "2"}])
    assert normalise_columns(both, None, None, source="both").column_names == ["question", "solution"]
