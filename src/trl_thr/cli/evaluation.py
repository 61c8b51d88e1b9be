"""Greedy accuracy and unbiased Pass@K (`trl_thr.metrics.pass_at_k`, averaged over problems), with resumable
generation and result files."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import append_json_line, write_json_atomically
from ..metrics import pass_at_k
from .answers import extract_final_answer, is_equivalent


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines the generations; their hash names the cache, and all of it goes in the result.

    `weights` and `adapter_weights` are the fingerprints of the files loaded (`model_fingerprint`): a new
    checkpoint saved to the same directory is a different key. `batch_size` matters to the transformers backend
    (a chunk of sequences shares one random stream) and is `None` for vLLM.
    """

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
    dtype: str
    batch_size: int | None
    greedy: bool
    problems_digest: str
    weights: dict
    adapter_weights: dict | None

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def problems_digest(questions: list[str], golds: list[str]) -> str:
    return hashlib.sha256(json.dumps([questions, golds]).encode()).hexdigest()[:16]


# Files whose content determines what a checkpoint generates: weights, configs, tokenizer and chat template.
# Trainer state in an output directory (training_args.bin, optimizer.pt, rng_state.pth, ...) does not.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
NOT_WEIGHTS = frozenset({"training_args.bin"})
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
})


class FileHashes:
    """sha256 of files, memoised in a JSON file per (path, size, mtime_ns): a 500 MB checkpoint is read once, and
    again only after it changes. The memo is replaced atomically, so a kill never leaves it half written."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.memo = json.loads(path.read_text())
        except (OSError, ValueError):  # missing or unreadable: hash again
            self.memo = {}
        self.hashed = 0  # files read in full by this instance (the test of the memo)

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.memo.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        with file.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        self.hashed += 1
        self.memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        write_json_atomically(self.path, self.memo)
        return digest


def model_fingerprint(directory: str | Path, hashes: FileHashes) -> dict[str, dict]:
    """`{file name: {"bytes", "sha256"}}` of the files in `directory` that determine its generations.

    Content hashes, not modification times: a copy of a checkpoint has the same fingerprint, a checkpoint saved
    over it another.
    """
    directory = Path(directory)
    fingerprint = {}
    for file in sorted(directory.iterdir()):
        wanted = file.name in MODEL_FILES or (file.suffix in WEIGHT_SUFFIXES and file.name not in NOT_WEIGHTS)
        if wanted and file.is_file():
            fingerprint[file.name] = {"bytes": file.stat().st_size, "sha256": hashes.sha256(file)}
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in fingerprint):
        raise ValueError(f"{directory} holds no weights file (*.safetensors, *.bin or *.gguf).")
    return fingerprint


class GenerationCache:
    """Append-only JSONL of finished problems, so an interrupted run resumes where it stopped.

    Each record is one line written with a single `write`, flushed and fsynced. A kill mid-write can leave the last
    line cut short; opening the cache drops that partial line, so the next record starts on a line of its own and
    at most the problem in flight is generated again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[int, dict] = {}
        self.repaired = False
        if not path.exists():
            return
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with path.open("r+b") as handle:
                handle.truncate(len(complete))
            self.repaired = True
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a record we wrote whole: that problem is generated again
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                self.done[record["index"]] = record

    def add(self, record: dict) -> None:
        append_json_line(self.path, record)
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
    # A context manager: an interruption closes the bar before the CLI prints what was kept.
    with tqdm(total=len(questions), initial=len(questions) - len(todo), desc="problems",
              disable=not progress) as bar:
        for index in todo:
            record = {"index": index, "samples": generate(prompts[index], settings.n, settings.temperature,
                                                          settings.seed + index)}
            if greedy:
                record["greedy"] = generate(prompts[index], 1, 0.0, settings.seed + index)[0]
            cache.add(record)
            bar.update(1)
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


def markdown_table(results: list[dict], labels: list[str] | None = None) -> str:
    """One column per run (headed by `labels`, default the run names), one row per metric, in percent."""
    keys = []
    for result in results:
        keys += [k for k in result["metrics"] if k not in keys and k not in ("problems", "ungradable")]
    keys.sort(key=lambda k: (k != "greedy_accuracy", not k.startswith("mean@"), _k_of(k)))
    names = labels or [r["config"]["run_name"] for r in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    if len(results) > 1:  # which model each column is
        lines.append("| model | " + " | ".join(model_label(r["config"]) for r in results) + " |")
    for key in keys:
        cells = [f"{100 * r['metrics'][key]:.1f}" if key in r["metrics"] else "-" for r in results]
        lines.append(f"| {key} (%) | " + " | ".join(cells) + " |")
    lines.append("| problems | " + " | ".join(str(r["metrics"]["problems"]) for r in results) + " |")
    return "\n".join(lines)


def model_label(config: dict) -> str:
    """The model a result was made with, as its command named it (and its adapter)."""
    model = config.get("model") or "?"
    return f"{model} + {config['adapter']}" if config.get("adapter") else model


def run_labels(results: list[dict], sources: list[str]) -> list[str]:
    """Column and legend names: each run's `run_name`, with its file added where two runs share a name (and a
    counter where the same file is given twice)."""
    names = [r["config"].get("run_name") or Path(source).stem for r, source in zip(results, sources, strict=True)]
    labels = [f"{name} ({source})" if names.count(name) > 1 else name for name, source in zip(names, sources)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return unique


# Settings that change the scores: runs that differ in any of them do not measure the same thing.
COMPARED_SETTINGS = ("benchmark", "problems_digest", "n", "temperature", "top_p", "max_new_tokens", "greedy",
                     "lenient", "template", "backend", "dtype")


def differing_settings(results: list[dict]) -> dict[str, list[str]]:
    """`{setting: [value per run]}` for the settings in `COMPARED_SETTINGS` that are not the same in every run
    (a setting a result file does not record shows as "not recorded")."""
    differences = {}
    for setting in COMPARED_SETTINGS:
        values = [result["config"].get(setting, "not recorded") for result in results]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values):
            differences[setting] = [_show_setting(setting, value) for value in values]
    return differences


def _show_setting(setting: str, value) -> str:
    if setting == "template" and isinstance(value, dict):
        text = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        return f"{value.get('name', 'custom')} ({text})"  # same name, other text: the hashes tell them apart
    return str(value)


def differences_table(differences: dict[str, list[str]], labels: list[str]) -> str:
    lines = ["| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for setting, values in differences.items():
        name = "problem set (digest)" if setting == "problems_digest" else setting
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _k_of(key: str) -> int:
    return int(key.split("@")[1]) if key.startswith("pass@") else 0


def plot_pass_at_k(results: list[dict], path: Path, labels: list[str] | None = None) -> Path:
    """Pass@K against K (log scale) for one or several runs (legend: `labels`, default the run names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    labels = labels or [r["config"]["run_name"] for r in results]
    for result, label in zip(results, labels, strict=True):
        ks = sorted(_k_of(k) for k in result["metrics"] if k.startswith("pass@"))
        values = [100 * result["metrics"][f"pass@{k}"] for k in ks]
        axis.plot(ks, values, marker="o", label=label)
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
