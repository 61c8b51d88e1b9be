"""`trl-thr eval`: greedy accuracy and unbiased Pass@K of a model on a math benchmark.

    trl-thr eval --model_name_or_path outputs/qwen-thr --benchmark aime24 --n_samples 256 --k_values 1 8 64 256
    trl-thr eval --model_name_or_path Qwen/Qwen2.5-Math-1.5B --adapter_name_or_path outputs/lora --benchmark math-500
    trl-thr eval --compare results/grpo.json results/thr-pos.json results/thr-neg.json --output_dir results

Writes `<output_dir>/<run_name>.json` (per-problem samples, answers, correctness, metrics), `.md` (a table) and
`.png` (the Pass@K curve). Generations are cached per (model, benchmark, settings) under `<output_dir>/cache`, so an
interrupted run resumes instead of starting over.
"""

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trl_thr.cli.arguments import ProblemArguments, load_problems
from trl_thr.cli import parse_arguments, run
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
    """`generate(prompt, num_samples, temperature, seed) -> texts` for the chosen backend, and the tokenizer."""
    from trl_thr.cli.generation import SamplingSettings, TransformersGenerator, VLLMGenerator, load_model_and_tokenizer

    settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
    if backend == "vllm":
        from transformers import AutoTokenizer

        if args.adapter_name_or_path:
            raise UsageError("the vLLM backend takes merged models: merge the adapter or use backend=transformers.")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        generator = VLLMGenerator(model_path, tokenizer, seed=args.seed, dtype=args.dtype,
                                  gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                  tensor_parallel_size=args.vllm_tensor_parallel_size)
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, args.adapter_name_or_path, args.dtype)
        generator = TransformersGenerator(model, tokenizer, args.batch_size)

    def generate(prompt_text, num_samples, temperature, seed):
        samples = generator.generate(prompt_text, num_samples, replace(settings, temperature=temperature), seed)
        return [sample.text for sample in samples]

    return generate, tokenizer


def evaluate(args) -> dict:
    """Generate (resuming from the cache), grade and score; returns the result dict."""
    from trl_thr.cli.evaluation import EvalSettings, GenerationCache, check_ks, problems_digest, run_generation, score
    from trl_thr.cli.generation import choose_backend, render_prompt
    from trl_thr.cli.models import resolve_model

    try:
        ks = check_ks(args.k_values, args.n_samples)
        dataset, template = load_problems(args.benchmark, args, seed=args.seed, data_files=args.benchmark_data_files,
                                          max_samples=args.max_problems, max_samples_field="max_problems")
        backend = choose_backend(args.backend)
        generate, tokenizer = make_generate(args, backend, resolve_model(args.model_name_or_path))
    except (ValueError, OSError, ImportError, RuntimeError) as error:  # OSError: a model path or id not found
        raise UsageError(str(error)) from error

    questions, golds = list(dataset["question"]), list(dataset["solution"])
    settings = EvalSettings(model=args.model_name_or_path, adapter=args.adapter_name_or_path,
                            benchmark=args.benchmark, template=template.describe(), n=args.n_samples,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, backend=backend, greedy=args.greedy,
                            problems_digest=problems_digest(questions, golds))
    cache = GenerationCache(Path(args.output_dir) / "cache" / f"{settings.key()}.jsonl")
    prompts = [render_prompt(tokenizer, prompt) for prompt in dataset["prompt"]]
    records = run_generation(questions, prompts, generate, settings, cache, greedy=args.greedy)
    result = score(questions, golds, records, ks, args.lenient)
    result["config"] = {**asdict(settings), "run_name": run_name(args), "k_values": ks, "lenient": args.lenient,
                        "grading": "trl_thr.cli.answers: <answer> tag, else last \\boxed{}, "
                                   + ("else last number; " if args.lenient else "")
                                   + "math-verify equivalence"}
    return result


def run_name(args) -> str:
    if args.run_name:
        return args.run_name
    model = Path(args.adapter_name_or_path or args.model_name_or_path).name
    return f"{model}-{Path(args.benchmark).stem}".replace(":", "-")


def write_outputs(results: list[dict], output_dir: Path, name: str) -> dict[str, Path]:
    from trl_thr.cli.evaluation import markdown_table, plot_pass_at_k

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": output_dir / f"{name}.md", "plot": output_dir / f"{name}.png"}
    paths["table"].write_text(markdown_table(results) + "\n")
    plot_pass_at_k(results, paths["plot"])
    return paths


def main(argv=None):
    from trl_thr.cli.evaluation import load_results, markdown_table

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        others = [load_results(path) for path in args.compare]
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as error:
        raise UsageError(str(error)) from error
    results = []
    if args.model_name_or_path is not None:
        if args.benchmark is None:
            raise UsageError("set benchmark (a preset, 'arithmetic', 'champ', or a local file).")
        result = evaluate(args)
        path = Path(args.output_dir) / f"{result['config']['run_name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
        print(f"Results: {path}")
    elif not others:
        raise UsageError("set model_name_or_path and benchmark, or give result files to --compare.")
    results += others
    name = results[0]["config"]["run_name"] if len(results) == 1 else "compare"
    paths = write_outputs(results, Path(args.output_dir), name)
    print(markdown_table(results))
    print(f"Table: {paths['table']}\nPlot: {paths['plot']}")
    return results


if __name__ == "__main__":
    sys.exit(run("eval"))
