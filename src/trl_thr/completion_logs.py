"""THR in TRL's completions table and a per-group token heatmap (pure functions: torch and the standard library).

With `log_completions=True`, `THRGRPOTrainer` adds to every logged completion the fraction of its tokens that are
dominant, its mean weight, and its tokens with the largest positive and negative THR, and renders one group per
logging step as an HTML heatmap (tokens coloured by THR).
"""

import html
import math
from collections.abc import Callable

import torch

# Columns added to TRL's completions table, one value per completion.
COLUMNS = ("thr_dominant_frac", "thr_mean_weight", "thr_top_positive", "thr_top_negative")


def completion_columns(
    thr: torch.Tensor,
    weights: torch.Tensor,
    dominant: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    decode: Callable[[int], str],
    top_k: int = 3,
) -> dict[str, list]:
    """Per-completion THR columns for the completions table.

    Args:
        thr, weights (`torch.Tensor`, `(B, T)`): THR and the advantage weights of each token.
        dominant (`torch.Tensor`, `(B, T)` bool): tokens above their group's threshold (THR applies to them).
        completion_ids, completion_mask (`torch.Tensor`, `(B, T)`): the sampled tokens and which of them count.
        decode: token id to text.
        top_k: how many tokens to list per sign.

    Returns:
        `{column: [value per completion]}` with the keys of `COLUMNS`. A fraction or mean over no token is NaN; the
        token lists read like `"'x' +0.12, 'y' +0.05"` and are empty when no token has that sign.
    """
    mask = completion_mask.bool()
    counts = mask.sum(dim=1)
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    for row in range(thr.size(0)):
        n = int(counts[row])
        row_mask = mask[row]
        columns["thr_dominant_frac"].append(float((dominant[row] & row_mask).sum()) / n if n else math.nan)
        columns["thr_mean_weight"].append(float(weights[row][row_mask].float().sum()) / n if n else math.nan)
        values, ids = thr[row][row_mask].float(), completion_ids[row][row_mask]
        for name, sign in (("thr_top_positive", 1.0), ("thr_top_negative", -1.0)):
            signed = values * sign
            order = torch.argsort(signed, descending=True)[:top_k]
            picked = [(int(ids[i]), float(values[i])) for i in order.tolist() if signed[i] > 0]
            columns[name].append(", ".join(f"{decode(token)!r} {value:+.3g}" for token, value in picked))
    return columns


POSITIVE_RGB = (22, 163, 74)  # green: updating the token raises the likelihood of the group's positive completions
NEGATIVE_RGB = (220, 38, 38)  # red: it lowers it


def token_colour(value: float, scale: float) -> str:
    """CSS colour of a token with THR `value`: hue by its sign, opacity `|value| / scale` (capped at 1; 0 for a
    THR of 0 or a scale of 0)."""
    red, green, blue = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    opacity = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0)
    return f"rgba({red}, {green}, {blue}, {opacity:.2f})"


def group_heatmap_html(
    tokens: list[list[str]], thr: list[list[float]], advantages: list[float], *, prompt: str = "", title: str = ""
) -> str:
    """A self-contained HTML page showing one group's prompt and completions, each token coloured by its THR.

    Rows of completions with `A > 0` and rows with `A <= 0` each have their own opacity scale (the largest |THR| among
    them), so that neither set is washed out by the other's larger values; the legend gives both scales.

    Args:
        tokens: the decoded tokens of each completion (counted tokens only).
        thr: THR of each of those tokens.
        advantages: the advantage of each completion.
        prompt: the group's prompt, shown above its completions.
        title: a heading (e.g. the step).
    """

    def largest(positive: bool) -> float:
        return max((abs(v) for row, a in zip(thr, advantages) if (a > 0) == positive for v in row), default=0.0)

    scales = {True: largest(True), False: largest(False)}
    rows = []
    for row_tokens, row_thr, advantage in zip(tokens, thr, advantages):
        scale = scales[advantage > 0]
        spans = "".join(
            f'<span title="THR {value:+.4g}" style="background:{token_colour(value, scale)}">'
            f"{html.escape(token)}</span>"
            for token, value in zip(row_tokens, row_thr)
        )
        rows.append(f'<div class="row"><b>A = {advantage:+.3f}</b> {spans}</div>')
    shown_prompt = f'<div class="prompt">{html.escape(prompt)}</div>' if prompt else ""
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>THR heatmap</title><style>"
        "body{font-family:sans-serif}.row,.prompt{margin:6px 0;white-space:pre-wrap;font-family:monospace}"
        ".prompt{color:#444;border-left:3px solid #bbb;padding-left:6px}span{border-radius:2px}</style></head><body>"
        f"<h3>{html.escape(title)}</h3><p>Green: THR &gt; 0 (the update helps the group's positive completions); "
        "red: THR &lt; 0. Opacity: |THR| relative to the largest among completions of the same sign of advantage "
        f"(A &gt; 0: {scales[True]:.3g}; A &le; 0: {scales[False]:.3g}).</p>"
        + shown_prompt
        + "".join(rows)
        + "</body></html>"
    )
