"""The paired one-step study behind `trl-thr analyze --dynamics`: what one update of each THR arm does.

From the same start weights and the same sampled groups, each arm (GRPO, positive-amplify, negative-amplify,
dominant-only, ...) takes one plain SGD step on the policy-gradient surrogate

    L(theta) = - sum_{j,t} w_{j,t} A_j log pi_theta(o_{j,t} | q, o_{j,<t}) / N_tokens        (ratio 1, no KL)

where `w` are the arm's token weights from the trainer's own path (`weights_from_config` with a `THRGRPOConfig`
per arm; GRPO: `w = 1`) and `A_j` the group-normalised advantages. After the step the mean token log-prob of the
batch's correct and incorrect completions and its mean token entropy are measured again; the weights are then
restored, so every arm starts from the same point. Differences between arms are paired (same batch, same start).

With `normalize=True` every arm's step is rescaled to the norm of GRPO's gradient on that batch, so arms differ
only in direction. Memory: logits are formed `rows_per_forward` completions at a time, never `(B, T, V)` at once.
"""

import math
from dataclasses import dataclass
from itertools import combinations

import torch

from ..thr import signed_p
from .analysis import GroupBatch, token_thr_and_entropy

METRICS = ("dlogp_correct", "dlogp_incorrect", "dentropy", "mean_weight", "grad_norm")
PAIRED_METRICS = ("dlogp_correct", "dlogp_incorrect", "dentropy")
DEFAULT_ARMS = ("grpo", "positive-amplify", "negative-amplify", "dominant-only")


def arm_strategy(arm: str) -> str:
    """The `thr_strategy` of an arm: `grpo` is `none`; every other arm is named by its strategy."""
    return "none" if arm == "grpo" else arm


def arm_config(arm: str, *, p: float, num_generations: int, threshold: str = "anchor", beta: float = 1.0,
               quantile: float | None = None, tau: float | None = None, output_dir: str = "thr_analysis"):
    """A `THRGRPOConfig` holding the arm's `thr_*` fields (the trainer validates them as in training)."""
    from trl_thr.thr_grpo_config import THRGRPOConfig

    strategy = arm_strategy(arm)
    return THRGRPOConfig(
        output_dir=output_dir, report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        per_device_train_batch_size=num_generations, num_generations=num_generations,
        thr_strategy=strategy, thr_p=signed_p(strategy, p), thr_threshold=threshold, thr_beta=beta,
        thr_quantile=quantile, thr_tau=tau,
    )


def arm_weights(config, thr: torch.Tensor, batch: GroupBatch) -> torch.Tensor:
    """`(B, T)` token weights of an arm on `batch`, through the trainer's `weights_from_config`."""
    from trl_thr.thr_grpo_trainer import weights_from_config

    weights, _ = weights_from_config(config, thr, batch.advantages, batch.completion_mask, batch.num_generations,
                                     p=config.thr_p, positive_mask=batch.correct)
    return weights


def _row_logits(model, batch: GroupBatch, rows: slice, device, temperature, logit_scale, logit_softcap):
    """`(b, T, V)` float32 logits of the completion tokens of `rows`, transformed as the trainer does."""
    from trl_thr.thr import transform_logits

    length = batch.completion_ids.size(1)
    ids = torch.cat([batch.prompt_ids[rows], batch.completion_ids[rows]], 1).to(device)
    mask = torch.cat([batch.prompt_mask[rows], batch.completion_mask[rows]], 1).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -length:].float()
    return transform_logits(logits, temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap)


@torch.no_grad()
def token_logps_and_entropy(model, batch: GroupBatch, *, temperature=1.0, logit_scale=1.0, logit_softcap=None,
                            rows_per_forward=4) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logps, entropy)`, each `(B, T)` and 0 on padding: the sampled tokens' log-probs and each position's
    entropy, `rows_per_forward` completions at a time."""
    device = next(model.parameters()).device
    logps, entropies = [], []
    for start in range(0, batch.completion_ids.size(0), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        logp = torch.log_softmax(_row_logits(model, batch, rows, device, temperature, logit_scale, logit_softcap), -1)
        ids = batch.completion_ids[rows].to(device)
        logps.append(logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).cpu())
        entropies.append(-(logp.exp() * logp).sum(-1).cpu())
        del logp
    mask = batch.completion_mask.bool()
    return torch.cat(logps) * mask, torch.cat(entropies) * mask


def surrogate_gradient(model, batch: GroupBatch, weights: torch.Tensor, parameters: list, *, temperature=1.0,
                       logit_scale=1.0, logit_softcap=None, rows_per_forward=4) -> list[torch.Tensor]:
    """Gradients of `-sum(w * A * logp) / N_tokens` with respect to `parameters`, accumulated over row chunks."""
    device = next(model.parameters()).device
    for parameter in parameters:
        parameter.grad = None
    mask = batch.completion_mask.float()
    coefficients = weights.float() * batch.advantages.float().unsqueeze(1) * mask / mask.sum().clamp(min=1)
    for start in range(0, batch.completion_ids.size(0), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        logits = _row_logits(model, batch, rows, device, temperature, logit_scale, logit_softcap)
        ids = batch.completion_ids[rows].to(device)
        logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        loss = -(coefficients[rows].to(device) * logp).sum()
        loss.backward()
        del logits, logp, loss
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in parameters]


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float((values * mask).sum()) / count if count else math.nan


def batch_dynamics(model, batch: GroupBatch, arms: list[str], configs: dict, *, lr: float, normalize: bool = False,
                   temperature=1.0, logit_scale=1.0, logit_softcap=None, vocab="sampled", include_self=True,
                   rows_per_forward=4) -> dict:
    """One batch of the study: `{arm: {metric: value}}` after one SGD step per arm from the same start weights."""
    transform = {"temperature": temperature, "logit_scale": logit_scale, "logit_softcap": logit_softcap}
    parameters = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in parameters]
    was_training = model.training
    model.eval()  # no dropout: the step and the measurement see the same function
    thr, _, _ = token_thr_and_entropy(model, batch, vocab=vocab, include_self=include_self, **transform)
    logps, entropy = token_logps_and_entropy(model, batch, rows_per_forward=rows_per_forward, **transform)
    mask = batch.completion_mask.bool()
    correct_tokens = mask & batch.correct.unsqueeze(1)
    incorrect_tokens = mask & ~batch.correct.unsqueeze(1)
    before = {"correct": masked_mean(logps, correct_tokens), "incorrect": masked_mean(logps, incorrect_tokens),
              "entropy": masked_mean(entropy, mask)}

    weights = {arm: arm_weights(configs[arm], thr, batch) for arm in arms}
    gradients = {arm: surrogate_gradient(model, batch, weights[arm], parameters, rows_per_forward=rows_per_forward,
                                         **transform) for arm in arms}
    norms = {arm: global_norm(g) for arm, g in gradients.items()}
    reference = norms["grpo"] if "grpo" in norms else global_norm(
        surrogate_gradient(model, batch, torch.ones_like(batch.completion_mask, dtype=torch.float32), parameters,
                           rows_per_forward=rows_per_forward, **transform))
    results = {}
    for arm in arms:
        scale = (reference / norms[arm] if norms[arm] > 0 else 0.0) if normalize else 1.0
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients[arm]):
                parameter.add_(gradient, alpha=-lr * scale)
        new_logps, new_entropy = token_logps_and_entropy(model, batch, rows_per_forward=rows_per_forward,
                                                         **transform)
        with torch.no_grad():
            for parameter, initial in zip(parameters, start):
                parameter.copy_(initial)
        results[arm] = {
            "dlogp_correct": masked_mean(new_logps, correct_tokens) - before["correct"],
            "dlogp_incorrect": masked_mean(new_logps, incorrect_tokens) - before["incorrect"],
            "dentropy": masked_mean(new_entropy, mask) - before["entropy"],
            "mean_weight": masked_mean(weights[arm], mask),
            "grad_norm": norms[arm],
            "step_norm": lr * scale * norms[arm],
        }
    for parameter in parameters:
        parameter.grad = None
    model.train(was_training)
    return results


def mean_and_se(values: list[float]) -> dict:
    """Mean and standard error of the mean (`None` where undefined: NaNs are left out, se needs two values)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return {"mean": mean, "se": None, "n": 1}
    variance = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return {"mean": mean, "se": math.sqrt(variance / len(finite)), "n": len(finite)}


def summarize_dynamics(per_batch: list[dict], arms: list[str]) -> dict:
    """Per arm the mean and se of every metric over batches; per pair `a - b` the paired difference, its se, and
    how many batches have each sign."""
    summary = {"arms": {}, "pairs": {}}
    for arm in arms:
        summary["arms"][arm] = {metric: mean_and_se([b[arm][metric] for b in per_batch]) for metric in METRICS}
    for first, second in combinations(arms, 2):
        pair = {}
        for metric in PAIRED_METRICS:
            differences = [b[first][metric] - b[second][metric] for b in per_batch]
            finite = [d for d in differences if not math.isnan(d)]
            pair[metric] = {**mean_and_se(finite), "positive": sum(d > 0 for d in finite),
                            "negative": sum(d < 0 for d in finite)}
        summary["pairs"][f"{first} - {second}"] = pair
    return summary


def batches_of_groups(batch: GroupBatch, groups_per_batch: int) -> list[GroupBatch]:
    """Split a batch into consecutive batches of `groups_per_batch` whole groups (the last one may be smaller),
    each trimmed to its own longest prompt and completion."""
    G = batch.num_generations
    groups = batch.completion_ids.size(0) // G
    parts = []
    for first in range(0, groups, groups_per_batch):
        rows = slice(first * G, min(groups, first + groups_per_batch) * G)
        prompt_mask, completion_mask = batch.prompt_mask[rows], batch.completion_mask[rows]
        prompt_start = int((prompt_mask.sum(0) == 0).sum())  # left padding shared by every row
        completion_end = max(1, int(completion_mask.sum(1).max()))
        parts.append(GroupBatch(batch.prompt_ids[rows, prompt_start:], prompt_mask[:, prompt_start:],
                                batch.completion_ids[rows, :completion_end], completion_mask[:, :completion_end],
                                batch.rewards[rows], batch.correct[rows], G))
    return parts


def select_groups(batch: GroupBatch, keep: torch.Tensor) -> GroupBatch:
    """The groups of `batch` where `keep` `(B // G,)` is True."""
    rows = keep.repeat_interleave(batch.num_generations)
    return GroupBatch(batch.prompt_ids[rows], batch.prompt_mask[rows], batch.completion_ids[rows],
                      batch.completion_mask[rows], batch.rewards[rows], batch.correct[rows], batch.num_generations)


def mixed_groups(batch: GroupBatch) -> torch.Tensor:
    """`(B // G,)` True for groups whose rewards are not all equal and that hold a positive and a negative
    completion (the groups a GRPO step learns from and THR applies to)."""
    G = batch.num_generations
    rewards = batch.rewards.view(-1, G)
    correct = batch.correct.view(-1, G)
    return (rewards.max(1).values > rewards.min(1).values) & correct.any(1) & ~correct.all(1)


def bar_chart(summary: dict, path, title: str = "One-step change per arm (mean +/- se over batches)"):
    """Three panels (dlogp_correct, dlogp_incorrect, dentropy), one bar per arm with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    figure, axes = plt.subplots(1, len(PAIRED_METRICS), figsize=(3.6 * len(PAIRED_METRICS), 3.4))
    colors = ["#555555", "#2e7d32", "#c62828", "#1565c0", "#6a1b9a", "#ef6c00"]
    for axis, metric in zip(axes, PAIRED_METRICS):
        means = [summary["arms"][a][metric]["mean"] or 0.0 for a in arms]
        errors = [summary["arms"][a][metric]["se"] or 0.0 for a in arms]
        axis.bar(range(len(arms)), means, yerr=errors, capsize=3, color=colors[: len(arms)])
        axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_title(metric, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def html_table(summary: dict) -> str:
    """The study as two HTML tables: per arm (mean +/- se), and paired differences with sign counts."""

    def cell(stat):
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:+.4g}" + ("" if stat["se"] is None else f" &plusmn; {stat['se']:.2g}")

    head = "".join(f"<th>{m}</th>" for m in METRICS)
    rows = "".join(f"<tr><th style='text-align:left'>{arm}</th>" + "".join(f"<td>{cell(s[m])}</td>" for m in METRICS)
                   + "</tr>" for arm, s in summary["arms"].items())
    out = [f"<table class='dynamics'><tr><th>arm</th>{head}</tr>{rows}</table>"]
    if summary["pairs"]:
        head = "".join(f"<th>{m}</th>" for m in PAIRED_METRICS)
        rows = "".join(
            f"<tr><th style='text-align:left'>{name}</th>"
            + "".join(f"<td>{cell(pair[m])} ({pair[m]['positive']}+ / {pair[m]['negative']}&minus;)</td>"
                      for m in PAIRED_METRICS) + "</tr>"
            for name, pair in summary["pairs"].items())
        out.append(f"<h3>Paired differences (mean &plusmn; se; batches with each sign)</h3>"
                   f"<table class='dynamics-pairs'><tr><th>arms</th>{head}</tr>{rows}</table>")
    return "".join(out)


@dataclass(frozen=True)
class DynamicsSettings:
    """How the study steps and what it compares; recorded in dynamics.json."""

    arms: tuple[str, ...]
    p: float
    lr: float
    normalize: bool
    groups_per_batch: int
    threshold: str
    beta: float
    quantile: float | None
    tau: float | None
