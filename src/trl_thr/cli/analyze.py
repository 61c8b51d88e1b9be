"""`trl-thr analyze`: sample groups, compute THR for every token, and report what it looks like.

    trl-thr analyze --model_name_or_path Qwen/Qwen2.5-Math-1.5B --dataset_name math-500 --num_prompts 16
    trl-thr analyze --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name arithmetic \\
        --prompt_template chat-boxed-short --lenient true --max_new_tokens 64

Writes to `output_dir`: `thr_report.html` (every completion with its tokens coloured by THR, self-contained),
`thr_histogram.png`, and `thr_analysis.json` (dominance per threshold mode, correct/incorrect x sign split, overlap of
high-|THR| with high-entropy tokens, the largest positive and negative THR tokens with context).
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl_thr.cli.arguments import ProblemArguments, load_problems
from trl_thr.cli import parse_arguments, run
from trl_thr.cli.errors import UsageError


@dataclass
class AnalyzeArguments(ProblemArguments):
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model (hub id, directory, builtin:...)."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter to merge first."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts with gold answers: a preset, arithmetic, champ, or a local file."}
    )
    dataset_data_files: str | None = field(default=None, metadata={"help": "Local copy of a preset."})
    num_prompts: int = field(default=8, metadata={"help": "Prompts to sample groups for (a seeded random subset)."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group size G)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also THR's softmax)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest completion."})
    lenient: bool = field(default=False, metadata={"help": "Grade unboxed answers on their last number."})
    thr_vocab: str = field(default="sampled", metadata={"help": "sampled or full.", "choices": ["sampled", "full"]})
    thr_include_self: bool = field(default=True, metadata={"help": "Count i = j in THR's sum."})
    thr_beta: float = field(default=1.0, metadata={"help": "Anchor threshold multiplier."})
    thr_tau: float | None = field(
        default=None, metadata={"help": "Also report the dominant fraction under this absolute threshold."}
    )
    overlap_quantile: float = field(
        default=0.2, metadata={"help": "Top fraction of tokens by |THR| and by entropy compared for the overlap."}
    )
    top_tokens: int = field(default=20, metadata={"help": "Largest positive and negative THR tokens listed."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype.",
                                                 "choices": ["auto", "bfloat16", "float16", "float32"]})
    seed: int = field(default=0, metadata={"help": "Seed; prompt i samples with seed + i."})
    output_dir: str = field(default="thr_analysis", metadata={"help": "Where the report goes."})


def parse_args(argv):
    (args,) = parse_arguments((AnalyzeArguments,), argv, "analyze")
    if args.model_name_or_path is None or args.dataset_name is None:
        raise UsageError("set model_name_or_path and dataset_name.")
    if args.num_generations < 2:
        raise UsageError(f"num_generations must be >= 2 (THR compares completions of a group), got "
                         f"{args.num_generations}.")
    if not 0 < args.overlap_quantile <= 1:
        raise UsageError(f"overlap_quantile must be in (0, 1], got {args.overlap_quantile}.")
    return args


def analyze(args):
    from tqdm.auto import tqdm

    from trl_thr.cli.analysis import build_batch, histogram, html_report, thr_statistics, token_thr_and_entropy, top_tokens
    from trl_thr.cli.answers import grade
    from trl_thr.cli.generation import SamplingSettings, TransformersGenerator, load_model_and_tokenizer, render_prompt
    from trl_thr.cli.models import resolve_model
    from trl_thr.thr_grpo_trainer import logit_transform_from_config

    try:
        dataset, template = load_problems(args.dataset_name, args, seed=args.seed, data_files=args.dataset_data_files,
                                          max_samples=args.num_prompts, max_samples_field="num_prompts")
        settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
        model, tokenizer = load_model_and_tokenizer(resolve_model(args.model_name_or_path), args.adapter_name_or_path,
                                                    args.dtype)
        generator = TransformersGenerator(model, tokenizer, args.batch_size)
    except (ValueError, OSError, ImportError, RuntimeError) as error:  # OSError: a model path or id not found
        raise UsageError(str(error)) from error

    prompt_ids, completion_ids, rewards, correct, shown_prompts, skipped = [], [], [], [], [], 0
    for index, row in enumerate(tqdm(list(dataset), desc="prompts")):
        text = render_prompt(tokenizer, row["prompt"])
        samples = generator.generate(text, args.num_generations, settings, args.seed + index)
        grades = [grade(s.text, row["solution"], lenient=args.lenient) for s in samples]
        if any(g is None for g in grades):
            skipped += 1  # the gold answer does not parse: nothing to call correct
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids += [ids] * len(samples)
        completion_ids += [s.token_ids for s in samples]
        correct += grades
        rewards += [float(g) for g in grades]
        shown_prompts.append(text)
    if not completion_ids:
        raise UsageError("no gradable prompt: every gold answer failed to parse.")

    batch = build_batch(prompt_ids, completion_ids, rewards, correct, args.num_generations, tokenizer.pad_token_id)
    thr, entropy, _ = token_thr_and_entropy(model, batch, temperature=args.temperature or 1.0, vocab=args.thr_vocab,
                                            include_self=args.thr_include_self,
                                            **logit_transform_from_config(model.config))
    stats = thr_statistics(thr, entropy, batch, beta=args.thr_beta, tau=args.thr_tau,
                           overlap_quantile=args.overlap_quantile)
    stats["ungradable_prompts"] = skipped
    stats["accuracy"] = sum(correct) / len(correct)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    top = top_tokens(thr, batch, decode, count=args.top_tokens)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    histogram(thr, batch, output_dir / "thr_histogram.png")
    title = f"THR of {args.model_name_or_path} on {args.dataset_name}"
    (output_dir / "thr_report.html").write_text(html_report(batch, thr, decode, shown_prompts, stats, top, title))
    record = {"config": {**asdict(args), "template": template.describe()}, "statistics": stats, "top_tokens": top}
    (output_dir / "thr_analysis.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    record = analyze(args)
    stats = record["statistics"]
    print(f"Accuracy {100 * stats['accuracy']:.1f} %; {stats['active_groups']}/{stats['groups']} groups have both "
          "correct and incorrect completions.")
    for mode, fraction in stats.get("dominant_fraction", {}).items():
        print(f"  dominant tokens, threshold {mode}: {100 * fraction:.1f} %")
    if "entropy_overlap" in stats:
        overlap = stats["entropy_overlap"]
        print(f"  top {100 * overlap['quantile']:g} % |THR| also top entropy: {100 * overlap['overlap_frac']:.1f} % "
              f"(chance {100 * overlap['chance_frac']:.1f} %)")
    print(f"Report: {Path(args.output_dir) / 'thr_report.html'}")
    return record


if __name__ == "__main__":
    sys.exit(run("analyze"))
