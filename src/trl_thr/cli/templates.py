"""Prompt templates, by name.

The template moves benchmark scores by tens of points, so it is always explicit: training and evaluation record the
template's name and text in their outputs. A template turns a question into a TRL prompt: a list of chat messages
(conversational) or a raw string (for base models without a chat template).
"""

from dataclasses import dataclass

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
R1_PREAMBLE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
    "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt.

    `user` is the user turn with a `{question}` placeholder. With `raw=True` the prompt is that string (standard
    format, no chat template); otherwise it is `[system?, user]` messages.
    """

    name: str
    user: str
    system: str | None = None
    raw: bool = False
    answer_format: str = "boxed"  # what the completion is expected to contain: "boxed" or "answer-tag"

    def render(self, question: str) -> list[dict[str, str]] | str:
        text = self.user.replace("{question}", question)  # not str.format: templates contain LaTeX braces
        if self.raw:
            return text
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": text}]

    def describe(self) -> dict:
        """Name and full text, for the run's saved config."""
        return {"name": self.name, "system": self.system, "user": self.user, "raw": self.raw,
                "answer_format": self.answer_format}


TEMPLATES = {
    # Qwen2.5-Math's chain-of-thought prompt: the system message asks for a boxed answer.
    "qwen-math-boxed": PromptTemplate("qwen-math-boxed", user="{question}", system=BOXED_INSTRUCTION),
    # The same request in the user turn, for chat models whose template has no system slot or ignores it.
    "chat-boxed": PromptTemplate("chat-boxed", user="{question}\n" + BOXED_INSTRUCTION),
    # A short answer in a box, for small chat models that ramble when asked to reason step by step.
    "chat-boxed-short": PromptTemplate(
        "chat-boxed-short", user="{question}\nGive only the final answer, in \\boxed{}."
    ),
    # DeepSeek-R1-Zero's plain-text prompt: think, then answer in tags.
    "r1": PromptTemplate("r1", user=R1_PREAMBLE + " User: {question} Assistant: <think>", raw=True,
                         answer_format="answer-tag"),
    # The question alone, as one user message.
    "plain-chat": PromptTemplate("plain-chat", user="{question}"),
}


def get_template(name_or_format: str) -> PromptTemplate:
    """A template by name, or a custom one from a format string containing `{question}` (used as the user turn)."""
    if name_or_format in TEMPLATES:
        return TEMPLATES[name_or_format]
    if "{question}" in name_or_format:
        return PromptTemplate("custom", user=name_or_format)
    raise ValueError(
        f"prompt_template={name_or_format!r} is neither a template name ({', '.join(TEMPLATES)}) nor a format string "
        "containing '{question}'."
    )
