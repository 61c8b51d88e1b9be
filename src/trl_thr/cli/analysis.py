"""THR made visible: per-token THR of sampled groups, the statistics the paper discusses, and an HTML report.

Used by `trl-thr analyze`. For each prompt a group of completions is sampled and graded; THR is computed for every
token with `compute_thr` from the model's final hidden states (positive set: the correct completions), along with
each token's entropy under the model.
"""

import html
import math
from dataclasses import dataclass

import torch

from ..completion_logs import token_colour
from ..thr import (
    active_groups,
    active_tokens,
    compute_thr,
    dominant_tokens,
    group_thresholds,
    top_fraction_threshold,
)


@dataclass
class GroupBatch:
    """Groups of completions, rows grouped consecutively like a GRPO generation batch."""

    prompt_ids: torch.Tensor  # (B, P), left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, T), right-padded
    completion_mask: torch.Tensor  # (B, T)
    rewards: torch.Tensor  # (B,)
    correct: torch.Tensor  # (B,) bool
    num_generations: int

    @property
    def advantages(self) -> torch.Tensor:
        """GRPO's group-normalised advantages, `(r - mean) / (std + 1e-4)`."""
        grouped = self.rewards.view(-1, self.num_generations).float()
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        return (centred / (grouped.std(dim=1, keepdim=True) + 1e-4)).flatten()


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], rewards: list[float],
                correct: list[bool], num_generations: int, pad_id: int) -> GroupBatch:
    """Pad prompts on the left and completions on the right, as TRL does."""
    prompt_len = max(len(p) for p in prompt_ids)
    completion_len = max(1, max(len(c) for c in completion_ids))

    def padded(rows, length, left):
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                span = slice(length - len(row), length) if left else slice(0, len(row))
                ids[i, span], mask[i, span] = torch.tensor(row), 1
        return ids, mask

    prompt, prompt_mask = padded(prompt_ids, prompt_len, left=True)
    completion, completion_mask = padded(completion_ids, completion_len, left=False)
    return GroupBatch(prompt, prompt_mask, completion, completion_mask, torch.tensor(rewards, dtype=torch.float32),
                      torch.tensor(correct, dtype=torch.bool), num_generations)


@torch.no_grad()
def token_thr_and_entropy(model, batch: GroupBatch, *, temperature=1.0, vocab="sampled", include_self=True,
                          logit_scale=1.0, logit_softcap=None, rows_per_forward=8):
    """`(thr, entropy, logps)`, each `(B, T)`: THR per token (positive set = correct completions), and the entropy
    and log-prob of each token under the model (same logit transform as the trainer)."""
    from ..thr import transform_logits

    device = next(model.parameters()).device
    length = batch.completion_ids.size(1)
    hidden_rows, entropy_rows, logp_rows = [], [], []
    head = model.get_output_embeddings()
    for start in range(0, batch.completion_ids.size(0), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        ids = torch.cat([batch.prompt_ids[rows], batch.completion_ids[rows]], 1).to(device)
        mask = torch.cat([batch.prompt_mask[rows], batch.completion_mask[rows]], 1).to(device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -length:]
        for row_hidden, row_ids in zip(hidden, batch.completion_ids[rows].to(device)):
            logits = head(row_hidden).float()  # (T, V): one row at a time
            logits = transform_logits(logits, temperature=temperature, logit_scale=logit_scale,
                                      logit_softcap=logit_softcap)
            logp = torch.log_softmax(logits, dim=-1)
            entropy_rows.append(-(logp.exp() * logp).sum(-1).cpu())
            logp_rows.append(logp.gather(-1, row_ids[:, None]).squeeze(-1).cpu())
        hidden_rows.append(hidden.float().cpu())
    hidden = torch.cat(hidden_rows)
    logps = torch.stack(logp_rows)
    thr = compute_thr(hidden, batch.completion_ids, batch.completion_mask, head.weight.detach().float().cpu(),
                      batch.advantages, batch.num_generations, temperature=temperature, vocab=vocab,
                      include_self=include_self, token_logprobs=logps, positive_mask=batch.correct,
                      lm_head_bias=None if head.bias is None else head.bias.detach().float().cpu(),
                      logit_scale=logit_scale, logit_softcap=logit_softcap)
    mask = batch.completion_mask.bool()
    return thr * mask, torch.stack(entropy_rows) * mask, logps * mask


def thr_statistics(thr, entropy, batch: GroupBatch, *, beta=1.0, quantiles=(0.1, 0.2, 0.5), tau=None,
                   overlap_quantile=0.2):
    """The numbers of the report: dominance per threshold mode, the correct/incorrect x sign split, and the overlap
    of high-|THR| with high-entropy tokens, all over the tokens of groups THR applies to."""
    G = batch.num_generations
    mask = batch.completion_mask.bool()
    active = active_groups(batch.advantages, batch.completion_mask, G, batch.correct)
    in_active = active_tokens(batch.advantages, batch.completion_mask, G, batch.correct)
    count = int(in_active.sum())
    stats = {"groups": int(active.numel()), "active_groups": int(active.sum()), "active_tokens": count,
             "tokens": int(mask.sum())}
    if count == 0:
        return stats

    def kept_fraction(taus):
        return float(dominant_tokens(thr, taus, in_active, G).sum()) / count

    dominance = {"anchor": kept_fraction(group_thresholds(thr, batch.advantages, batch.completion_mask, G,
                                                          threshold="anchor", beta=beta,
                                                          positive_mask=batch.correct))}
    for q in quantiles:
        taus = group_thresholds(thr, batch.advantages, batch.completion_mask, G, threshold="quantile", quantile=q,
                                positive_mask=batch.correct)
        dominance[f"quantile_{q:g}"] = kept_fraction(taus)
    if tau is not None:
        taus = group_thresholds(thr, batch.advantages, batch.completion_mask, G, threshold="absolute", tau=tau,
                                positive_mask=batch.correct)
        dominance[f"absolute_{tau:g}"] = kept_fraction(taus)
    dominance["none"] = 1.0
    stats["dominant_fraction"] = dominance

    split = {}
    for label, rows in (("correct", batch.correct), ("incorrect", ~batch.correct)):
        tokens = in_active & rows.unsqueeze(1)
        values = thr[tokens]
        split[label] = {
            "tokens": int(tokens.sum()),
            "positive_frac": float((values > 0).float().mean()) if values.numel() else math.nan,
            "negative_frac": float((values < 0).float().mean()) if values.numel() else math.nan,
            "mean_thr": float(values.mean()) if values.numel() else math.nan,
            "mean_abs_thr": float(values.abs().mean()) if values.numel() else math.nan,
        }
    stats["by_correctness"] = split

    stats["entropy_overlap"] = entropy_overlap(thr, entropy, batch, in_active, overlap_quantile, beta)
    return stats


def entropy_overlap(thr, entropy, batch: GroupBatch, in_active, quantile: float, beta: float) -> dict:
    """How much THR's choice of tokens is an entropy mask's, over the tokens of the groups THR applies to, two ways:

    - `overlap_frac`: of the top `quantile` tokens by |THR|, the share also in the top `quantile` by entropy (chance:
      `chance_frac`);
    - `dominant_share`: of THR's dominant tokens (|THR| above the group's anchor threshold), the share among the top
      `quantile` by entropy as TRL's `top_entropy_quantile` takes them (entropy >= the quantile): the training
      metric `thr/entropy_overlap`, here over the whole batch rather than per micro-batch.

    Each pooled over the batch's tokens, and as a mean over groups with its 95 % t-interval over groups
    (`per_group`): tokens of one group are not independent draws, groups are.
    """
    from .study_stats import mean_interval

    G = batch.num_generations
    magnitudes, entropies = thr.abs()[in_active], entropy[in_active]
    high_thr = (thr.abs() > top_fraction_threshold(magnitudes, quantile)) & in_active
    high_entropy = (entropy > top_fraction_threshold(entropies, quantile)) & in_active
    trl_threshold = torch.quantile(entropies.double(), 1 - quantile)
    high_entropy_trl = (entropy >= trl_threshold) & in_active
    taus = group_thresholds(thr, batch.advantages, batch.completion_mask, G, threshold="anchor", beta=beta,
                            positive_mask=batch.correct)
    dominant = dominant_tokens(thr, taus, in_active, G)

    def share(part, whole) -> float | None:
        return float(part.sum()) / int(whole.sum()) if whole.any() else None

    per_group = {"overlap_frac": [], "dominant_share": []}
    for start in range(0, thr.size(0), G):
        rows = slice(start, start + G)
        for name, part, whole in (("overlap_frac", high_thr & high_entropy, high_thr),
                                  ("dominant_share", dominant & high_entropy_trl, dominant)):
            if (value := share(part[rows], whole[rows])) is not None:
                per_group[name].append(value)
    return {
        "quantile": quantile,
        "high_thr_tokens": int(high_thr.sum()),
        "overlap_frac": share(high_thr & high_entropy, high_thr) or 0.0,
        "chance_frac": float(high_entropy[in_active].float().mean()),
        "dominant_tokens": int(dominant.sum()),
        "dominant_share": share(dominant & high_entropy_trl, dominant),
        "dominant_chance": float(high_entropy_trl[in_active].float().mean()),
        "per_group": {name: {**mean_interval(values), "groups": len(values)} if len(values) >= 2 else
                      {"groups": len(values)} for name, values in per_group.items()},
    }


def top_tokens(thr, batch: GroupBatch, decode, count=20, context=6):
    """The `count` tokens with the largest positive and the most negative THR, each with its context."""
    mask = batch.completion_mask.bool()
    flat = [(float(thr[r, t]), r, t) for r, t in mask.nonzero().tolist()]
    picks = {"positive": sorted((f for f in flat if f[0] > 0), reverse=True)[:count],
             "negative": sorted(f for f in flat if f[0] < 0)[:count]}

    def describe(value, row, position):
        ids = batch.completion_ids[row]
        left = decode(ids[max(0, position - context) : position].tolist())
        right = decode(ids[position + 1 : position + 1 + context][mask[row, position + 1 : position + 1 + context]]
                       .tolist())
        return {"thr": value, "row": row, "position": position, "token": decode([int(ids[position])]),
                "before": left, "after": right, "correct": bool(batch.correct[row])}

    return {sign: [describe(*f) for f in found] for sign, found in picks.items()}


def histogram(thr, batch: GroupBatch, path):
    """Histogram of THR over active tokens, correct and incorrect completions apart (symlog x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = active_tokens(batch.advantages, batch.completion_mask, batch.num_generations, batch.correct)
    figure, axis = plt.subplots(figsize=(7, 4))
    values = thr[tokens]
    limit = float(values.abs().max()) if values.numel() else 1.0
    bins = torch.linspace(-limit, limit, 61).tolist() if limit > 0 else 10
    for label, rows, color in (("correct completions", batch.correct, "#2e7d32"),
                               ("incorrect completions", ~batch.correct, "#c62828")):
        part = thr[tokens & rows.unsqueeze(1)]
        if part.numel():
            axis.hist(part.tolist(), bins=bins, alpha=0.6, color=color, label=f"{label} ({part.numel()} tokens)")
    axis.set_yscale("log")
    axis.set_xlabel("THR")
    axis.set_ylabel("tokens")
    axis.set_title("THR per token (groups with correct and incorrect completions)")
    axis.axvline(0, color="black", linewidth=0.8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def html_report(batch: GroupBatch, thr, decode, prompts: list[str], stats: dict, top: dict, title: str,
                dynamics: str | None = None) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external assets); `dynamics` is the HTML of the
    one-step study's tables, shown after the summary."""
    mask = batch.completion_mask.bool()
    values = thr[mask].abs()
    scale = float(torch.quantile(values.float(), 0.99)) if values.numel() else 1.0
    G = batch.num_generations
    advantages = batch.advantages
    out = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        ".completion{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.5em 0}"
        ".tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7}"
        ".t{border-radius:3px}.ok{color:#2e7d32;font-weight:bold}.bad{color:#c62828;font-weight:bold}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
        ".legend span{padding:0 .5em;margin-right:.5em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='legend'>Token background: <span style='background-color: " + token_colour(1.0, 1.0)
        + "'>THR &gt; 0</span>"
        "(updating the token raises the likelihood of the group's correct completions) "
        "<span style='background-color: " + token_colour(-1.0, 1.0) + "'>THR &lt; 0</span>(lowers it); opacity: "
        f"|THR| relative to the 99th percentile ({scale:.4g}). Hover a token for its value.</p>",
        "<h2>Summary</h2>", _summary_table(stats),
        *(["<h2>One-step dynamics per arm</h2>", dynamics] if dynamics else []),
        "<h2>Largest THR</h2>", _top_table(top),
        "<h2>Completions</h2>",
    ]
    for group in range(batch.completion_ids.size(0) // G):
        out.append(f"<h3>Prompt {group}</h3><pre>{html.escape(prompts[group])}</pre>")
        for row in range(group * G, (group + 1) * G):
            ok = bool(batch.correct[row])
            mark = "<span class='ok'>&#10003; correct</span>" if ok else "<span class='bad'>&#10007; incorrect</span>"
            out.append(f"<div class='completion' data-row='{row}' data-correct='{str(ok).lower()}'>"
                       f"<div>{mark} &middot; reward {float(batch.rewards[row]):.3g} &middot; "
                       f"advantage {float(advantages[row]):+.3f}</div><div class='tokens'>")
            spans = []
            for position in mask[row].nonzero().flatten().tolist():
                value = float(thr[row, position])
                text = decode([int(batch.completion_ids[row, position])])
                spans.append(f"<span class='t' data-thr='{value:.6g}' title='THR = {value:+.4g}' "
                             f"style='background-color: {token_colour(value, scale)}'>{html.escape(text)}</span>")
            out.append("".join(spans) + "</div></div>")  # no separators: the token div keeps whitespace
    out.append("</body></html>")
    return "\n".join(out)


def _summary_table(stats: dict) -> str:
    rows = [("groups (with a correct and an incorrect completion)", f"{stats['groups']} ({stats['active_groups']})"),
            ("tokens (in those groups)", f"{stats['tokens']} ({stats['active_tokens']})")]
    for mode, fraction in stats.get("dominant_fraction", {}).items():
        rows.append((f"dominant tokens, threshold {mode}", f"{100 * fraction:.1f} %"))
    for label, split in stats.get("by_correctness", {}).items():
        rows.append((f"{label}: THR &gt; 0 / &lt; 0",
                     f"{100 * split['positive_frac']:.1f} % / {100 * split['negative_frac']:.1f} %"))
        rows.append((f"{label}: mean THR (mean |THR|)", f"{split['mean_thr']:.4g} ({split['mean_abs_thr']:.4g})"))
    overlap = stats.get("entropy_overlap")
    if overlap:
        rows.append((f"top {100 * overlap['quantile']:g} % |THR| tokens that are also top "
                     f"{100 * overlap['quantile']:g} % entropy",
                     f"{100 * overlap['overlap_frac']:.1f} % (chance: {100 * overlap['chance_frac']:.1f} %)"))
        if overlap.get("dominant_share") is not None:
            rows.append((f"dominant tokens (anchor) that are also top {100 * overlap['quantile']:g} % entropy "
                         "(thr/entropy_overlap)",
                         f"{100 * overlap['dominant_share']:.1f} % "
                         f"(chance: {100 * overlap['dominant_chance']:.1f} %)"))
    body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _top_table(top: dict) -> str:
    parts = []
    for sign, entries in top.items():
        rows = "".join(
            f"<tr><td>{e['thr']:+.4g}</td><td style='text-align:left'><code>{html.escape(e['before'])}"
            f"<b style='background-color: {token_colour(e['thr'], abs(e['thr']))}'>{html.escape(e['token'])}</b>"
            f"{html.escape(e['after'])}</code></td><td>{'correct' if e['correct'] else 'incorrect'}</td></tr>"
            for e in entries
        )
        parts.append(f"<h3>Most {sign}</h3><table><tr><th>THR</th><th>context</th><th>completion</th></tr>"
                     f"{rows}</table>")
    return "".join(parts)
