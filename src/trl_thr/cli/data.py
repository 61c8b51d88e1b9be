"""Math datasets by name: hub presets, local files, and offline tasks that need no download.

Every loader returns a `datasets.Dataset` with two columns: `question` (the problem text) and `solution` (the gold
final answer as a string, e.g. "72" or "\\frac{1}{2}"). `with_prompts` then adds TRL's `prompt` column from a
prompt template; `solution` stays, and reaches reward functions as a keyword argument. Data already in TRL's layout
keeps its `prompt`; data without answers is accepted only where no reward reads one (`needs_answer=False`).
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .answers import last_boxed_content
from .templates import PromptTemplate

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
QUESTION_COLUMNS = ("question", "problem", "Problem", "query")
ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "solution", "expected_answer")


def _gsm8k_answer(text: str) -> str:
    return text.split("####")[-1].strip().replace(",", "")


def _first(value) -> str:
    """OlympiadBench stores final answers as a list."""
    return str(value[0] if isinstance(value, list | tuple) else value)


@dataclass(frozen=True)
class DatasetPreset:
    """A dataset on the hub, with the columns and answer format to read it."""

    path: str
    split: str
    question_column: str
    answer_column: str
    config: str | None = None
    answer: Callable[[object], str] = str
    keep: Callable[[dict], bool] | None = None
    description: str = ""


PRESETS = {
    # Training sets
    "math-l3-5": DatasetPreset(
        "DigitalLearningGmbH/MATH-lighteval", "train", "problem", "solution", config="default",
        answer=last_boxed_content, keep=lambda row: row["level"] in ("Level 3", "Level 4", "Level 5"),
        description="MATH training problems of levels 3-5 (the THR/NTHR papers' training set)",
    ),
    "deepscaler": DatasetPreset(
        "agentica-org/DeepScaleR-Preview-Dataset", "train", "problem", "answer",
        description="DeepScaleR-Preview: 40k AIME/AMC/Omni-MATH/STILL problems",
    ),
    "gsm8k": DatasetPreset(
        "openai/gsm8k", "train", "question", "answer", config="main", answer=_gsm8k_answer,
        description="GSM8K grade-school word problems (train split)",
    ),
    # Benchmarks
    "math-500": DatasetPreset("HuggingFaceH4/MATH-500", "test", "problem", "answer",
                              description="MATH-500 (Lightman et al. subset of the MATH test set)"),
    "aime24": DatasetPreset("HuggingFaceH4/aime_2024", "train", "problem", "answer",
                            description="AIME 2024, 30 problems"),
    "aime25": DatasetPreset("yentinglin/aime_2025", "train", "problem", "answer",
                            description="AIME 2025, 30 problems"),
    "amc23": DatasetPreset("math-ai/amc23", "test", "question", "answer", description="AMC 2023, 40 problems"),
    "minerva": DatasetPreset("math-ai/minervamath", "test", "question", "answer",
                             description="Minerva Math (OCWCourses), 272 problems"),
    "olympiadbench": DatasetPreset(
        "Hothan/OlympiadBench", "train", "question", "final_answer", config="OE_TO_maths_en_COMP", answer=_first,
        description="OlympiadBench, open-ended text-only English competition math, 675 problems",
    ),
    "gsm8k-test": DatasetPreset("openai/gsm8k", "test", "question", "answer", config="main", answer=_gsm8k_answer,
                                description="GSM8K test split, 1319 problems"),
}
OFFLINE_TASKS = ("arithmetic", "champ", "reasoning-gym:<task>")


def _pick_column(names, candidates, wanted, kind, source):
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{kind}_column={wanted!r} is not a column of {source}; columns are {sorted(names)}.")
        return wanted
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(
        f"Cannot tell which column of {source} holds the {kind}; columns are {sorted(names)}. "
        f"Set {kind}_column."
    )


def _has_answer_column(names, answer_column, needs_answer: bool) -> bool:
    """Whether to read a gold answer: always where one is needed or named, else where a known column holds one."""
    return needs_answer or answer_column is not None or any(name in names for name in ANSWER_COLUMNS)


def normalise_columns(dataset, question_column, answer_column, answer=str, keep=None, source="",
                      needs_answer: bool = True):
    """Rows `(question, solution)`, or `(prompt, solution)` for data in TRL's layout; `answer` maps the raw answer
    cell to the gold final answer. With `needs_answer=False` (no reward reads one) data without an answer column is
    kept without a `solution`."""
    if keep is not None:
        dataset = dataset.filter(keep)
    names = dataset.column_names
    if question_column is None and "prompt" in names and not any(name in names for name in QUESTION_COLUMNS):
        # TRL's own layout (`trl grpo` datasets): the prompt is ready, as text or messages; no template renders it.
        if not _has_answer_column(names, answer_column, needs_answer):
            return dataset.select_columns(["prompt"])
        answer_column = _pick_column(names, ANSWER_COLUMNS, answer_column, "answer", source)
        dataset = dataset.map(lambda row: {"solution": answer(row[answer_column])},
                              remove_columns=[name for name in names if name not in ("prompt", answer_column)])
        return _check_gold(dataset.select_columns(["prompt", "solution"]), source)
    question_column = _pick_column(dataset.column_names, QUESTION_COLUMNS, question_column, "question", source)
    if not _has_answer_column(names, answer_column, needs_answer):
        return dataset.map(lambda row: {"question": str(row[question_column])},
                           remove_columns=dataset.column_names).select_columns(["question"])
    answer_column = _pick_column(dataset.column_names, ANSWER_COLUMNS, answer_column, "answer", source)
    dataset = dataset.map(
        lambda row: {"question": str(row[question_column]), "solution": answer(row[answer_column])},
        remove_columns=dataset.column_names,
    ).select_columns(["question", "solution"])
    return _check_gold(dataset, source)


def _check_gold(dataset, source):
    missing = [i for i, gold in enumerate(dataset["solution"]) if gold is None or gold == ""]
    if missing:
        raise ValueError(f"{source}: {len(missing)} rows have no gold answer (first: row {missing[0]}).")
    return dataset


def check_json_lines(path: Path) -> None:
    """Every non-blank line of a JSONL file is a JSON object; else one line naming the file and the line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
                raise ValueError(f"{path}: line {number} is not valid JSON ({reason}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object of columns.")


def check_json(path: Path) -> None:
    """A JSON file parses (a JSONL file under a .json name is checked line by line); else its line and column."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line: what `datasets` reads as JSON Lines
            check_json_lines(path)
            return
        raise ValueError(
            f"{path}: line {error.lineno}, column {error.colno} is not valid JSON ({error.msg})."
        ) from None


def load_local(path, question_column=None, answer_column=None, split="train", needs_answer: bool = True):
    """A local JSON, JSONL, Parquet or CSV file; columns are detected unless given."""
    from datasets import load_dataset

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Dataset file {path} does not exist.")
    file_format = LOCAL_FORMATS.get(path.suffix)
    if file_format is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}.")
    if path.suffix == ".jsonl":
        check_json_lines(path)  # before `datasets`, whose error for a bad line is a long pyarrow traceback
    elif path.suffix == ".json":
        check_json(path)
    dataset = load_dataset(file_format, data_files=str(path), split=split)
    answer = last_boxed_content if answer_column == "solution" else str
    return normalise_columns(dataset, question_column, answer_column, answer=answer, source=str(path),
                             needs_answer=needs_answer)


def load_preset(name, split=None, data_files=None):
    """A preset by name, from the hub, or from `data_files` (a local copy with the same columns)."""
    from datasets import load_dataset

    preset = PRESETS[name]
    split = split or preset.split
    if data_files is not None:
        file_format = LOCAL_FORMATS.get(Path(str(data_files)).suffix, "json")
        dataset = load_dataset(file_format, data_files=str(data_files), split="train")
    else:
        dataset = load_dataset(preset.path, preset.config, split=split)
    return normalise_columns(dataset, preset.question_column, preset.answer_column, preset.answer, preset.keep, name)


NAMES = ["Sam", "Ana", "Li", "Omar", "Zoe", "Ravi", "Mia", "Tom"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils"]


def arithmetic_problems(num_samples: int = 256, seed: int = 0, max_operand: int = 20):
    """Seeded arithmetic and one-step word problems with exact integer answers (no download)."""
    from datasets import Dataset

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    rng = random.Random(seed)
    questions, answers = [], []
    for _ in range(num_samples):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        kind = rng.choice(["add", "sub", "mul", "word-add", "word-sub"])
        if kind in ("sub", "word-sub") and b > a:
            a, b = b, a
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        question, answer = {
            "add": (f"What is {a} + {b}?", a + b),
            "sub": (f"What is {a} - {b}?", a - b),
            "mul": (f"What is {a} * {b}?", a * b),
            "word-add": (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b),
            "word-sub": (f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b),
        }[kind]
        questions.append(question)
        answers.append(str(answer))
    return Dataset.from_dict({"question": questions, "solution": answers})


def reasoning_gym_problems(task: str, num_samples: int = 256, seed: int = 0):
    """A procedural task from `reasoning-gym` (optional extra), e.g. `gsm_symbolic`."""
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(
            f"dataset 'reasoning-gym:{task}' needs the reasoning-gym package: pip install 'trl-thr[tasks]'."
        ) from error
    from datasets import Dataset

    rows = list(reasoning_gym.create_dataset(task, size=num_samples, seed=seed))
    return Dataset.from_dict({"question": [r["question"] for r in rows], "solution": [str(r["answer"]) for r in rows]})


def champ_problems():
    """CHAMP's 270 competition problems (`champ-dataset` package, MIT), read from its JSON.

    Gold answers are CHAMP's `_answer` text; where it offers "X, or equivalently Y", the last form (usually the
    closed-form number) is kept.
    """
    import importlib.util
    import json

    from datasets import Dataset

    spec = importlib.util.find_spec("champ_dataset")
    if spec is None:
        raise ImportError("dataset 'champ' needs the champ-dataset package: pip install 'trl-thr[tasks]'.")
    files = sorted((Path(spec.origin).parent / "dataset_files").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"No CHAMP dataset file under {Path(spec.origin).parent}.")
    problems = json.loads(files[-1].read_text())["problems"]
    questions = [p["_text"] for p in problems.values()]
    answers = [p["_answer"].split("or equivalently")[-1].strip() for p in problems.values()]
    return Dataset.from_dict({"question": questions, "solution": answers})


def load_math_dataset(name: str, *, split=None, question_column=None, answer_column=None, num_samples=256, seed=0,
                      data_files=None, max_operand=20, needs_answer: bool = True):
    """Resolve a dataset name: a preset, `arithmetic`, `champ`, `reasoning-gym:<task>`, a local file or a hub id.
    `needs_answer=False` accepts a local file or hub dataset without an answer column (no reward reads one)."""
    if name in PRESETS:
        return load_preset(name, split=split, data_files=data_files)
    if name == "arithmetic":
        return arithmetic_problems(num_samples=num_samples, seed=seed, max_operand=max_operand)
    if name == "champ":
        return champ_problems()
    if name.startswith("reasoning-gym:"):
        return reasoning_gym_problems(name.split(":", 1)[1], num_samples=num_samples, seed=seed)
    if Path(name).suffix in LOCAL_FORMATS or Path(name).exists():
        return load_local(name, question_column, answer_column, needs_answer=needs_answer)
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split or "train")
    except Exception as error:  # datasets raises several types for "not found"/offline
        raise ValueError(
            f"dataset {name!r} is not a preset ({', '.join(PRESETS)}), an offline task ({', '.join(OFFLINE_TASKS)}), "
            f"a local file, or a loadable hub dataset: {error}"
        ) from error
    return normalise_columns(dataset, question_column, answer_column, source=name, needs_answer=needs_answer)


def with_prompts(dataset, template: PromptTemplate):
    """Add TRL's `prompt` column rendered with `template`; a dataset in TRL's layout keeps its own prompts."""
    if "prompt" in dataset.column_names:
        return dataset
    return dataset.map(lambda row: {"prompt": template.render(row["question"])})


def limit(dataset, max_samples: int | None, seed: int = 0):
    """A seeded random subset of at most `max_samples` rows (all rows if None)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))

