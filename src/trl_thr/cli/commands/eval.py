"""`trl-thr eval`: greedy accuracy and unbiased Pass@K of a model on a math benchmark.

    trl-thr eval --model_name_or_path outputs/qwen-thr --benchmark aime24 --n_samples 256 --k_values 1 8 64 256
    trl-thr eval --model_name_or_path Qwen/Qwen2.5-Math-1.5B --adapter_name_or_path outputs/lora --benchmark math-500
    trl-thr eval --compare results/grpo.json results/thr-pos.json results/thr-neg.json --output_dir results

Writes `<output_dir>/<run_name>.json` (per-problem samples, answers, correctness, metrics, and every setting that
determines the generations), `.md` (a table) and `.png` (the Pass@K curve). `run_name` defaults to the model's
directory name (with the one above it where that is `model`, `final` or `checkpoint-N`: runs/grpo-s0/model gives
`grpo-s0-model-<benchmark>`) and the benchmark's; a result another model wrote under that name is never replaced.
Generations are cached under `<output_dir>/cache`, keyed on the content of the weights (and adapter) files, dtype,
backend, template, sampling settings, seed, max tokens and problem set, so an interrupted run resumes instead of
starting over and a changed checkpoint is never served old samples.
"""

import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trl_thr.cli import parse_arguments, run
from trl_thr.cli.arguments import ProblemArguments, load_problems
from trl_thr.cli.errors import UsageError


@dataclass
class EvalArguments(ProblemArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model (hub id, local directory, or builtin:tiny-qwen2); the base model of an adapter."},
    )
    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "LoRA adapter to merge into the model before evaluating."}
    )
    benchmark: str | None = field(
        default=None,
        metadata={"help": "math-500, aime24, aime25, amc23, minerva, olympiadbench, gsm8k-test, arithmetic, champ, "
                  "reasoning-gym:<task>, a local JSON/JSONL/Parquet/CSV file, or a hub id."},
    )
    benchmark_data_files: str | None = field(
        default=None, metadata={"help": "Local copy of a benchmark preset, read with the preset's columns."}
    )
    max_problems: int | None = field(default=None, metadata={"help": "Evaluate a seeded random subset."})
    n_samples: int = field(default=16, metadata={"help": "Samples per problem (n) for Pass@K and mean@n."})
    k_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={"help": "K values, each <= n."})
    greedy: bool = field(default=True, metadata={"help": "Also measure greedy accuracy (temperature 0, 1 sample)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for the n samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling for the n samples."})
    max_new_tokens: int = field(default=3072, metadata={"help": "Longest completion."})
    lenient: bool = field(
        default=False, metadata={"help": "Grade completions without a boxed/tagged answer on their last number."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call (transformers backend)."})
    backend: str = field(
        default="auto", metadata={"help": "auto (vLLM if installed and a GPU is present), vllm or transformers.",
                                  "choices": ["auto", "vllm", "transformers"]}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype.",
                                                 "choices": ["auto", "bfloat16", "float16", "float32"]})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM backend only."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend only."})
    seed: int = field(default=0, metadata={"help": "Seed; problem i samples with seed + i."})
    output_dir: str = field(default="eval_results", metadata={"help": "Where results, table, plot and cache go."})
    run_name: str | None = field(default=None, metadata={"help": "Label of this run (file names, legends)."})
    compare: list[str] = field(
        default_factory=list, metadata={"help": "Result JSONs of other runs to put in the same table and plot."}
    )


def parse_args(argv):
    (args,) = parse_arguments((EvalArguments,), argv, "eval")
    return args


def make_generate(args, backend, model_path):
    """`generate(prompt, num_samples, temperature, seed) -> texts` for the chosen backend, the tokenizer, and the
    dtype the model actually runs in (recorded with the results: `auto` says nothing)."""
    from trl_thr._trl_compat import vllm_runs_on_cpu
    from trl_thr.cli.generation import (
        SamplingSettings,
        TransformersGenerator,
        VLLMGenerator,
        load_model_and_tokenizer,
        vllm_dtype,
    )

    settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
    if backend == "vllm":
        from transformers import AutoTokenizer

        if args.adapter_name_or_path:
            raise UsageError("the vLLM backend takes merged models: merge the adapter or use backend=transformers.")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = vllm_dtype(model_path, args.dtype)
        # On a CPU, eager mode skips an inductor compile that takes minutes (as trl-thr train's colocated engine).
        engine = {"enforce_eager": True} if vllm_runs_on_cpu() else {}
        generator = VLLMGenerator(model_path, tokenizer, seed=args.seed, dtype=dtype,
                                  gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                  tensor_parallel_size=args.vllm_tensor_parallel_size, **engine)
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, args.adapter_name_or_path, args.dtype)
        generator = TransformersGenerator(model, tokenizer, args.batch_size)
        dtype = str(model.dtype).removeprefix("torch.")

    def generate(prompt_text, num_samples, temperature, seed):
        samples = generator.generate(prompt_text, num_samples, replace(settings, temperature=temperature), seed)
        return [sample.text for sample in samples]

    return generate, tokenizer, dtype


def fingerprint(model_path: str, adapter: str | None, hashes) -> tuple[dict, dict | None]:
    """Fingerprints of the model's and the adapter's files (see `model_fingerprint`); a hub id is looked up in
    the hub cache, where loading it has just put it."""
    from trl_thr.cli.evaluation import model_fingerprint
    from trl_thr.cli.models import local_snapshot

    directory = model_path if Path(model_path).is_dir() else local_snapshot(model_path)
    if directory is None:
        raise UsageError(f"model {model_path}: cannot find its files to fingerprint for the generation cache.")
    weights = model_fingerprint(directory, hashes)
    return weights, (model_fingerprint(adapter, hashes) if adapter is not None else None)


def evaluate(args) -> dict:
    """Generate (resuming from the cache), grade and score; returns the result dict."""
    from trl_thr.cli.evaluation import (
        EvalSettings,
        FileHashes,
        GenerationCache,
        check_ks,
        problems_digest,
        run_generation,
        score,
    )
    from trl_thr.cli.generation import adapter_has_tokenizer, choose_backend, render_prompt
    from trl_thr.cli.models import check_chat_template, resolve_model
    from trl_thr.cli.run_dir import check_writable

    check_writable(args.output_dir)  # before a model is loaded, with the system's reason
    cache_dir = Path(args.output_dir) / "cache"
    try:
        ks = check_ks(args.k_values, args.n_samples)
        dataset, template = load_problems(args.benchmark, args, seed=args.seed, data_files=args.benchmark_data_files,
                                          max_samples=args.max_problems, max_samples_field="max_problems")
        backend = choose_backend(args.backend)
        if args.adapter_name_or_path is not None and not Path(args.adapter_name_or_path).is_dir():
            raise ValueError(f"adapter_name_or_path={args.adapter_name_or_path}: not found (no such directory).")
        # vLLM runs a builtin model only in its vLLM-ready width (head_dim 64), as trl-thr train builds it.
        model_path = resolve_model(args.model_name_or_path, for_vllm=backend == "vllm",
                                   needs_tokenizer=not adapter_has_tokenizer(args.adapter_name_or_path))
        if args.adapter_name_or_path is None:
            check_chat_template(model_path, template)
        generate, tokenizer, dtype = make_generate(args, backend, model_path)
        hashes = FileHashes(cache_dir / "file_hashes.json")
        weights, adapter_weights = fingerprint(model_path, args.adapter_name_or_path, hashes)
    except (ValueError, OSError, ImportError, RuntimeError) as error:  # OSError: unreadable model files
        raise UsageError(str(error)) from error

    questions, golds = list(dataset["question"]), list(dataset["solution"])
    settings = EvalSettings(model=args.model_name_or_path, adapter=args.adapter_name_or_path,
                            benchmark=args.benchmark, template=template.describe(), n=args.n_samples,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, backend=backend, dtype=dtype,
                            batch_size=args.batch_size if backend == "transformers" else None, greedy=args.greedy,
                            problems_digest=problems_digest(questions, golds), weights=weights,
                            adapter_weights=adapter_weights)
    check_result_owner(Path(args.output_dir) / f"{run_name(args)}.json", settings)
    cache = GenerationCache(cache_dir / f"{settings.key()}.jsonl")
    reused = sum(index < len(questions) for index in cache.done)
    if reused:
        print(f"Reusing cached generations for {reused} of {len(questions)} problems from {cache.path} (same weights "
              "files, dtype, backend, template, sampling settings, seed and problems).")
    if cache.repaired:
        print(f"{cache.path}: dropped a last record cut short by an interruption; that problem is generated again.")
    prompts = [render_prompt(tokenizer, prompt) for prompt in dataset["prompt"]]
    records = run_generation(questions, prompts, generate, settings, cache, greedy=args.greedy)
    result = score(questions, golds, records, ks, args.lenient)
    result["config"] = {**asdict(settings), "run_name": run_name(args), "k_values": ks, "lenient": args.lenient,
                        "grading": "trl_thr.cli.answers: <answer> tag, else last \\boxed{}, "
                                   + ("else last number; " if args.lenient else "")
                                   + "math-verify equivalence"}
    return result


# Directory names that say where a run saved its model, not which run it is (`trl-thr study` saves every run's model
# as `runs/<run>/model`): a default result name starts with the directory above them as well.
GENERIC_MODEL_DIRS = re.compile(r"^(model|final|final_model|merged|checkpoint-\d+)$")


def run_name(args) -> str:
    """The result's name: `run_name`, else the model's (its last directory, with the one above where that is a
    generic name such as `model` or `checkpoint-500`) and the benchmark's."""
    if args.run_name:
        return args.run_name
    path = Path(args.adapter_name_or_path or args.model_name_or_path)
    generic = GENERIC_MODEL_DIRS.match(path.name) and path.parent.name
    model = f"{path.parent.name}-{path.name}" if generic else path.name
    return f"{model}-{Path(args.benchmark).stem}".replace(":", "-")


def same_model(first: str | None, second: str | None) -> bool:
    """Whether two model names are the same model: the same local directory however spelt, or the same hub id."""
    if first is None or second is None:
        return first == second
    return Path(first).resolve() == Path(second).resolve() if Path(first).exists() or Path(second).exists() \
        else first == second


def check_result_owner(path: Path, settings) -> None:
    """Refuse to replace a result of another model (another directory or hub id, or another adapter) with this one's:
    the same model, even retrained in place, replaces its own result."""
    from trl_thr.cli.evaluation import load_results

    if not path.exists():
        return
    try:
        earlier = load_results(str(path))["config"]
    except (ValueError, OSError, KeyError):
        return  # not a result of ours, or unreadable: written over, as before
    if not (same_model(earlier.get("model"), settings.model) and same_model(earlier.get("adapter"), settings.adapter)):
        raise UsageError(f"{path} holds the results of another model ({earlier.get('model')}"
                         + (f" with adapter {earlier['adapter']}" if earlier.get("adapter") else "")
                         + "); set --run_name to name this one, or use another output_dir.")


def write_outputs(results: list[dict], output_dir: Path, name: str, labels: list[str],
                  differences: dict[str, list[str]]) -> dict[str, Path]:
    """The table (with the settings that differ between runs, if any) and the Pass@K plot."""
    from trl_thr.cli.evaluation import differences_table, markdown_table, plot_pass_at_k

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": output_dir / f"{name}.md", "plot": output_dir / f"{name}.png"}
    text = markdown_table(results, labels) + "\n"
    if differences:
        text += "\n**Warning: the runs differ in settings that change the scores:**\n\n"
        text += differences_table(differences, labels) + "\n"
    paths["table"].write_text(text)
    plot_pass_at_k(results, paths["plot"], labels)
    return paths


def interrupted_message(argv: list[str]) -> str:
    """What an interrupted `trl-thr eval` kept, for the one line the CLI prints on Ctrl-C."""
    args = parse_args(argv)
    cache_dir = Path(args.output_dir) / "cache"
    caches = sorted(cache_dir.glob("*.jsonl"), key=lambda path: path.stat().st_mtime) if args.model_name_or_path \
        else []
    if not caches:
        return "no generation had finished, so nothing was kept; rerun the same command to start again."
    finished = caches[-1].read_bytes().count(b"\n")
    return (f"the generations of {finished} finished problems are kept in {caches[-1]}; rerun the same command to "
            "resume from them.")


def main(argv=None):
    from trl_thr.cli.evaluation import differences_table, differing_settings, load_results, markdown_table, run_labels
    from trl_thr.files import write_json_atomically

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        others = [load_results(path) for path in args.compare]
    except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError; OSError: missing, unreadable
        raise UsageError(f"--compare: {error}") from error
    results, sources = [], []
    if args.model_name_or_path is not None:
        if args.benchmark is None:
            raise UsageError("set benchmark (a preset, 'arithmetic', 'champ', or a local file).")
        result = evaluate(args)
        path = Path(args.output_dir) / f"{result['config']['run_name']}.json"
        write_json_atomically(path, result)
        results.append(result)
        sources.append(str(path))
        print(f"Results: {path}")
    elif not others:
        raise UsageError("set model_name_or_path and benchmark, or give result files to --compare.")
    results += others
    sources += args.compare
    labels = run_labels(results, sources)
    name = results[0]["config"]["run_name"] if len(results) == 1 else "compare"
    differences = differing_settings(results) if len(results) > 1 else {}
    paths = write_outputs(results, Path(args.output_dir), name, labels, differences)
    if differences:
        print(f"Warning: these runs differ in {', '.join(differences)}, so their scores do not measure the same "
              "thing:\n" + differences_table(differences, labels), file=sys.stderr)
    print(markdown_table(results, labels))
    print(f"Table: {paths['table']}\nPlot: {paths['plot']}")
    return results


if __name__ == "__main__":
    sys.exit(run("eval"))
