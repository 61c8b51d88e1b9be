"""Greedy accuracy and unbiased Pass@K, with resumable generation and result files.

Pass@K uses the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): from `n` samples of which `c` are
correct, `pass@k = 1 - C(n - c, k) / C(n, k)`, the probability that `k` samples drawn without replacement from the
`n` contain a correct one. Averaged over problems. It is not "max over n" (which is pass@n of a single draw).
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .answers import extract_final_answer, is_equivalent


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct (Chen et al. 2021), computed as a stable product.

    `1 - C(n-c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)`, which never forms large binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}] (pass@k needs at least k samples), got k={k}.")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


@dataclass(frozen=True)
class EvalSettings:
    """Everything that changes generations; their hash names the cache."""

    model: str
    adapter: str | None
    benchmark: str
    template: dict
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    backend: str
    greedy: bool
    problems_digest: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def problems_digest(questions: list[str], golds: list[str]) -> str:
    return hashlib.sha256(json.dumps([questions, golds]).encode()).hexdigest()[:16]


class GenerationCache:
    """Append-only JSONL of finished problems, so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption: that problem is generated again
                self.done[record["index"]] = record

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.done[record["index"]] = record


def graded(text: str, gold: str, lenient: bool) -> dict:
    answer = extract_final_answer(text, lenient=lenient)
    return {"text": text, "answer": answer, "correct": is_equivalent(answer, gold)}


def run_generation(questions, prompts, generate: Callable, settings: EvalSettings, cache: GenerationCache,
                   greedy: bool, progress: bool = True):
    """Generate (or reuse from `cache`) `settings.n` samples and, if `greedy`, one greedy answer per problem.

    `generate(prompt, num_samples, temperature, seed)` returns the texts.
    """
    from tqdm.auto import tqdm

    todo = [i for i in range(len(questions)) if i not in cache.done]
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="problems", disable=not progress)
    for index in todo:
        record = {"index": index, "samples": generate(prompts[index], settings.n, settings.temperature,
                                                      settings.seed + index)}
        if greedy:
            record["greedy"] = generate(prompts[index], 1, 0.0, settings.seed + index)[0]
        cache.add(record)
        bar.update(1)
    bar.close()
    return [cache.done[i] for i in range(len(questions))]


def score(questions, golds, records, ks: list[int], lenient: bool) -> dict:
    """Per-problem grading and the averaged metrics."""
    problems, per_k, means, greedy_hits = [], {k: [] for k in ks}, [], []
    ungradable = 0
    for index, (question, gold, record) in enumerate(zip(questions, golds, records, strict=True)):
        samples = [graded(text, gold, lenient) for text in record["samples"]]
        entry = {"index": index, "question": question, "gold": gold, "samples": samples}
        if "greedy" in record:
            entry["greedy"] = graded(record["greedy"], gold, lenient)
        if any(s["correct"] is None for s in samples):
            entry["gradable"] = False
            ungradable += 1
            problems.append(entry)
            continue
        n, c = len(samples), sum(s["correct"] for s in samples)
        entry.update(gradable=True, num_correct=c, pass_at_k={str(k): pass_at_k(n, c, k) for k in ks})
        for k in ks:
            per_k[k].append(entry["pass_at_k"][str(k)])
        means.append(c / n)
        if "greedy" in entry:
            greedy_hits.append(float(entry["greedy"]["correct"]))
        problems.append(entry)
    n = len(records[0]["samples"]) if records else 0
    metrics = {"problems": len(problems), "ungradable": ungradable}
    if greedy_hits:
        metrics["greedy_accuracy"] = sum(greedy_hits) / len(greedy_hits)
    if means:
        metrics[f"mean@{n}"] = sum(means) / len(means)
        metrics.update({f"pass@{k}": sum(v) / len(v) for k, v in per_k.items()})
    return {"metrics": metrics, "problems": problems}


def markdown_table(results: list[dict]) -> str:
    """One column per run, one row per metric, in percent."""
    keys = []
    for result in results:
        keys += [k for k in result["metrics"] if k not in keys and k not in ("problems", "ungradable")]
    keys.sort(key=lambda k: (k != "greedy_accuracy", not k.startswith("mean@"), _k_of(k)))
    names = [r["config"]["run_name"] for r in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        cells = [f"{100 * r['metrics'][key]:.1f}" if key in r["metrics"] else "-" for r in results]
        lines.append(f"| {key} (%) | " + " | ".join(cells) + " |")
    lines.append("| problems | " + " | ".join(str(r["metrics"]["problems"]) for r in results) + " |")
    return "\n".join(lines)


def _k_of(key: str) -> int:
    return int(key.split("@")[1]) if key.startswith("pass@") else 0


def plot_pass_at_k(results: list[dict], path: Path) -> Path:
    """Pass@K against K (log scale) for one or several runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for result in results:
        ks = sorted(_k_of(k) for k in result["metrics"] if k.startswith("pass@"))
        values = [100 * result["metrics"][f"pass@{k}"] for k in ks]
        axis.plot(ks, values, marker="o", label=result["config"]["run_name"])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K")
    axis.set_ylabel("Pass@K (%)")
    benchmarks = sorted({r["config"]["benchmark"] for r in results})
    axis.set_title(f"Pass@K on {', '.join(benchmarks)}")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def load_results(path) -> dict:
    data = json.loads(Path(path).read_text())
    if "metrics" not in data or "config" not in data:
        raise ValueError(f"{path} is not a trl-thr eval result (no 'metrics'/'config').")
    return data


def check_ks(ks: list[int], n: int) -> list[int]:
    ks = sorted(set(ks))
    if not ks:
        raise ValueError("k_values is empty.")
    if ks[0] < 1:
        raise ValueError(f"k_values must be >= 1, got {ks[0]}.")
    too_large = [k for k in ks if k > n]
    if too_large:
        raise ValueError(
            f"k_values {too_large} must be in [1, n_samples={n}]: pass@k needs at least k samples per problem. "
            f"Raise n_samples to {max(ks)} or drop those K."
        )
    return ks
