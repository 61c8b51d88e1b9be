"""Arguments shared by `trl-thr train`, `eval` and `analyze`: how problems are read and turned into prompts."""

from dataclasses import dataclass, field


@dataclass
class ProblemArguments:
    question_column: str | None = field(
        default=None, metadata={"help": "Column holding the question (local files and hub ids; detected if unset)."}
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the gold answer; a 'solution' column is read as its last \\boxed{}."},
    )
    num_samples: int = field(default=256, metadata={"help": "Problems generated for 'arithmetic' and reasoning-gym."})
    arithmetic_max_operand: int = field(default=20, metadata={"help": "Largest operand of 'arithmetic' problems."})
    prompt_template: str = field(
        default="qwen-math-boxed",
        metadata={
            "help": "Prompt template: qwen-math-boxed, chat-boxed, chat-boxed-short, r1, plain-chat, or a string "
            "with {question}. Recorded with the results."
        },
    )


def load_problems(name: str, args: ProblemArguments, *, seed: int, data_files: str | None = None,
                  max_samples: int | None = None, max_samples_field: str = "max_samples", needs_answer: bool = True):
    """`(dataset with question/solution/prompt columns, template)` for a dataset name and `args`.

    `max_samples` keeps a seeded random subset; `max_samples_field` names it in errors. `needs_answer=False` (no
    reward reads a gold answer) accepts data without an answer column.
    """
    from .data import limit, load_math_dataset, with_prompts
    from .templates import get_template

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"{max_samples_field} must be >= 1 (or unset for all problems), got {max_samples}.")
    template = get_template(args.prompt_template)
    dataset = load_math_dataset(name, question_column=args.question_column, answer_column=args.answer_column,
                                num_samples=args.num_samples, seed=seed, data_files=data_files,
                                max_operand=args.arithmetic_max_operand, needs_answer=needs_answer)
    return with_prompts(limit(dataset, max_samples, seed), template), template
