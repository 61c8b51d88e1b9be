"""`trl-thr analyze`: sample groups, compute THR for every token, and report what it looks like.

    trl-thr analyze --model_name_or_path Qwen/Qwen2.5-Math-1.5B --dataset_name math-500 --num_prompts 16
    trl-thr analyze --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name arithmetic \\
        --prompt_template chat-boxed-short --lenient true --max_new_tokens 64

    trl-thr analyze --model_name_or_path builtin:tiny-qwen2 --dataset_name arithmetic \\
        --reward_funcs trl_thr.tiny:digit_reward --dynamics true --dynamics_lr 0.01

Writes to `output_dir`: `thr_report.html` (every completion with its tokens coloured by THR, self-contained),
`thr_histogram.png`, and `thr_analysis.json` (dominance per threshold mode, correct/incorrect x sign split, overlap of
high-|THR| with high-entropy tokens, the largest positive and negative THR tokens with context).

Completions are scored with `reward_funcs` as in `trl-thr train` (default: math grading, `accuracy` or with
`--lenient` `accuracy_lenient`); the positive ("correct") completions are those with reward >=
`positive_reward_threshold` (default 1.0 with math grading, else those above their group's mean).

With `--dynamics true` it also runs the paired one-step study (`trl_thr.cli.dynamics`): from the same start weights
and rollouts each arm takes one SGD step on the policy-gradient surrogate, and the change of the log-prob of correct
and incorrect completions and of the entropy is measured. Adds `dynamics.json`, `dynamics.png` and a table in the
report.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trl_thr.cli import parse_arguments, run
from trl_thr.cli.arguments import ProblemArguments, load_problems
from trl_thr.cli.dynamics import DEFAULT_ARMS
from trl_thr.cli.errors import UsageError
from trl_thr.cli.run_dir import check_writable
from trl_thr.files import write_json_atomically, write_text_atomically


@dataclass
class AnalyzeArguments(ProblemArguments):
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model (hub id, directory, builtin:...)."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "LoRA adapter to merge first."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Prompts with gold answers: a preset (math-500, gsm8k-test, ...), arithmetic, "
                                "champ, reasoning-gym:<task>, a local file, or a hub id."}
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
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Rewards, as `trl-thr train` takes them (names or module:function). Default: math grading "
                  "(accuracy, or accuracy_lenient with --lenient)."},
    )
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of reward_funcs (default 1)."})
    positive_reward_threshold: float | None = field(
        default=None,
        metadata={"help": "Completions with reward >= this are the positive set. Default: 1.0 with math grading, "
                  "else completions above their group's mean reward."},
    )
    dynamics: bool = field(default=False, metadata={"help": "Run the paired one-step study of the THR arms."})
    dynamics_arms: list[str] = field(
        default_factory=lambda: list(DEFAULT_ARMS),
        metadata={"help": "Arms compared: grpo (all weights 1) and THR strategies (positive-amplify, "
                  "negative-amplify, amplify, dominant-only, nthr)."},
    )
    dynamics_p: float = field(default=0.1, metadata={"help": "|p| of the amplify arms (negative-amplify uses -|p|)."})
    dynamics_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the one plain SGD step per arm."})
    dynamics_normalize: bool = field(
        default=False, metadata={"help": "Scale every arm's step to GRPO's gradient norm (compare directions only)."}
    )
    dynamics_groups_per_batch: int = field(
        default=1, metadata={"help": "Groups (prompts) per batch of the study; batches are its repeats."}
    )
    dynamics_batches: int | None = field(
        default=None, metadata={"help": "Use at most this many batches (the first ones); default: every mixed group."}
    )
    thr_threshold: str = field(
        default="anchor", metadata={"help": "Dominance threshold of the study's arms, as in training.",
                                    "choices": ["anchor", "quantile", "absolute", "none"]}
    )
    thr_quantile: float | None = field(default=None, metadata={"help": "For thr_threshold=quantile."})
    rows_per_forward: int = field(
        default=4, metadata={"help": "Completions per forward pass of the study (bounds the logits held in memory)."}
    )
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
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward_funcs or [None]):
        raise UsageError(f"reward_weights has {len(args.reward_weights)} values but there are "
                         f"{len(args.reward_funcs or [None])} reward_funcs; give one weight per reward.")
    if args.rows_per_forward < 1:
        raise UsageError(f"rows_per_forward must be >= 1, got {args.rows_per_forward}.")
    if args.dynamics:
        dynamics_configs(args)  # the arms' THRGRPOConfig validate p, threshold and quantile as in training
    return args


def dynamics_configs(args) -> dict:
    """`{arm: THRGRPOConfig}` of the study; bad arms, p, lr or threshold settings are a one-line `UsageError`."""
    import tempfile

    from trl_thr.cli.dynamics import arm_config
    from trl_thr.thr import STRATEGIES

    known = ["grpo"] + [s for s in STRATEGIES if s != "none"]
    unknown = [arm for arm in args.dynamics_arms if arm not in known]
    if not args.dynamics_arms or unknown:
        raise UsageError(f"dynamics_arms {unknown or '(empty)'} not understood; choose from {known} (grpo is "
                         "thr_strategy='none').")
    if len(set(args.dynamics_arms)) != len(args.dynamics_arms):
        raise UsageError(f"dynamics_arms lists an arm twice: {args.dynamics_arms}.")
    if not args.dynamics_lr > 0:
        raise UsageError(f"dynamics_lr must be > 0, got {args.dynamics_lr}.")
    if not abs(args.dynamics_p) < 1:
        raise UsageError(f"dynamics_p={args.dynamics_p}: |p| must be < 1 so that every token weight stays >= 0.")
    if args.dynamics_groups_per_batch < 1:
        raise UsageError(f"dynamics_groups_per_batch must be >= 1, got {args.dynamics_groups_per_batch}.")
    if args.dynamics_batches is not None and args.dynamics_batches < 1:
        raise UsageError(f"dynamics_batches must be >= 1 (or unset for all mixed groups), got {args.dynamics_batches}.")
    tau = args.thr_tau if args.thr_threshold == "absolute" else None
    configs = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for arm in args.dynamics_arms:
                configs[arm] = arm_config(arm, p=args.dynamics_p, num_generations=args.num_generations,
                                          threshold=args.thr_threshold, beta=args.thr_beta,
                                          quantile=args.thr_quantile, tau=tau, output_dir=scratch)
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from error
    return configs


def score_group(reward_funcs, weights, row: dict, samples, conversational: bool) -> list[float] | None:
    """Weighted reward of each completion of one group, called as TRL calls reward functions; `None` if no reward
    applies to some completion (e.g. the gold answer does not parse)."""
    texts = [s.text for s in samples]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {key: [value] * len(samples) for key, value in row.items() if key != "prompt"}
    totals = [0.0] * len(samples)
    applies = [False] * len(samples)
    for func, weight in zip(reward_funcs, weights, strict=True):
        values = func(prompts=[row["prompt"]] * len(samples), completions=completions,
                      completion_ids=[s.token_ids for s in samples], **columns)
        for i, value in enumerate(values):
            if value is not None:
                totals[i] += weight * float(value)
                applies[i] = True
    return totals if all(applies) else None


def analyze(args):
    from tqdm.auto import tqdm

    check_writable(args.output_dir)  # before a model is loaded, with the system's reason

    from trl_thr._trl_compat import logit_transform_from_config
    from trl_thr.cli.analysis import (
        build_batch,
        histogram,
        html_report,
        thr_statistics,
        token_thr_and_entropy,
        top_tokens,
    )
    from trl_thr.cli.generation import (
        SamplingSettings,
        TransformersGenerator,
        adapter_has_tokenizer,
        load_model_and_tokenizer,
        render_prompt,
    )
    from trl_thr.cli.models import resolve_model
    from trl_thr.cli.rewards import load_reward_funcs

    try:
        dataset, template = load_problems(args.dataset_name, args, seed=args.seed, data_files=args.dataset_data_files,
                                          max_samples=args.num_prompts, max_samples_field="num_prompts")
        settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
        model_path = resolve_model(args.model_name_or_path,
                                   needs_tokenizer=not adapter_has_tokenizer(args.adapter_name_or_path))
        model, tokenizer = load_model_and_tokenizer(model_path, args.adapter_name_or_path, args.dtype)
        generator = TransformersGenerator(model, tokenizer, args.batch_size)
        specs = args.reward_funcs or ["accuracy_lenient" if args.lenient else "accuracy"]
        reward_funcs = load_reward_funcs(specs)
    except (ValueError, OSError, ImportError, RuntimeError) as error:  # OSError: a model path or id not found
        raise UsageError(str(error)) from error
    reward_weights = args.reward_weights or [1.0] * len(reward_funcs)
    threshold = args.positive_reward_threshold
    if threshold is None and args.reward_funcs is None:
        threshold = 1.0  # math grading: correct means reward 1

    prompt_ids, completion_ids, rewards, correct, shown_prompts, skipped = [], [], [], [], [], 0
    for index, row in enumerate(tqdm(list(dataset), desc="prompts")):
        text = render_prompt(tokenizer, row["prompt"])
        samples = generator.generate(text, args.num_generations, settings, args.seed + index)
        scores = score_group(reward_funcs, reward_weights, row, samples, conversational=not isinstance(row["prompt"],
                                                                                                        str))
        if scores is None:
            skipped += 1  # e.g. the gold answer does not parse: nothing to call correct
            continue
        if threshold is not None:
            correct += [score >= threshold for score in scores]
        else:
            mean = sum(scores) / len(scores)
            correct += [score > mean for score in scores]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_ids += [ids] * len(samples)
        completion_ids += [s.token_ids for s in samples]
        rewards += scores
        shown_prompts.append(text)
    if not completion_ids:
        raise UsageError("no gradable prompt: no reward applied to every completion of any group (e.g. no gold "
                         "answer parsed).")

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
    histogram(thr, batch, output_dir / "thr_histogram.png")
    config = {**asdict(args), "template": template.describe(), "reward_funcs": specs,
              "positive_reward_threshold": threshold}
    dynamics_section = None
    record = {"config": config, "statistics": stats, "top_tokens": top}
    if args.dynamics:
        record["dynamics"] = run_dynamics(model, batch, shown_prompts, args, config, output_dir)
        dynamics_section = dynamics_html(record["dynamics"], args)
    title = f"THR of {args.model_name_or_path} on {args.dataset_name}"
    write_text_atomically(output_dir / "thr_report.html",
                          html_report(batch, thr, decode, shown_prompts, stats, top, title, dynamics=dynamics_section))
    write_json_atomically(output_dir / "thr_analysis.json", record)
    return record


def run_dynamics(model, batch, shown_prompts, args, config: dict, output_dir: Path) -> dict:
    """The paired one-step study on the mixed groups of `batch`; writes `dynamics.json` and `dynamics.png`."""
    import time

    from tqdm.auto import tqdm

    from trl_thr._trl_compat import logit_transform_from_config
    from trl_thr.cli.dynamics import (
        bar_chart,
        batch_dynamics,
        batches_of_groups,
        mixed_groups,
        select_groups,
        summarize_dynamics,
    )

    configs = dynamics_configs(args)
    keep = mixed_groups(batch)
    if not bool(keep.any()):
        raise UsageError(f"no group of the {int(keep.numel())} sampled has both positive and negative completions, "
                         "so no arm would move: raise num_prompts or num_generations, or use a reward that varies "
                         "within groups.")
    started = time.time()
    batches = batches_of_groups(select_groups(batch, keep), args.dynamics_groups_per_batch)
    batches = batches[: args.dynamics_batches]
    per_batch = [batch_dynamics(model, part, list(args.dynamics_arms), configs, lr=args.dynamics_lr,
                                normalize=args.dynamics_normalize, temperature=args.temperature or 1.0,
                                vocab=args.thr_vocab, include_self=args.thr_include_self,
                                rows_per_forward=args.rows_per_forward, **logit_transform_from_config(model.config))
                 for part in tqdm(batches, desc="dynamics batches")]
    summary = summarize_dynamics(per_batch, list(args.dynamics_arms))
    result = {**summary, "batches": len(per_batch), "per_batch": per_batch,
              "config": {"arms": list(args.dynamics_arms), "p": args.dynamics_p, "lr": args.dynamics_lr,
                         "normalize": args.dynamics_normalize, "groups_per_batch": args.dynamics_groups_per_batch,
                         "max_batches": args.dynamics_batches, "rows_per_forward": args.rows_per_forward,
                         "num_generations": args.num_generations, "temperature": args.temperature,
                         "thr_threshold": args.thr_threshold, "thr_beta": args.thr_beta,
                         "thr_quantile": args.thr_quantile, "thr_vocab": args.thr_vocab,
                         "mixed_groups": int(keep.sum()), "groups": int(keep.numel()),
                         "model": args.model_name_or_path, "dataset": args.dataset_name,
                         "reward_funcs": config["reward_funcs"],
                         "positive_reward_threshold": config["positive_reward_threshold"],
                         "seed": args.seed, "seconds": round(time.time() - started, 1)}}
    write_json_atomically(output_dir / "dynamics.json", result)
    bar_chart(summary, output_dir / "dynamics.png")
    return result


def dynamics_html(result: dict, args) -> str:
    from trl_thr.cli.dynamics import html_table

    step = "scaled to GRPO's gradient norm" if args.dynamics_normalize else "unscaled"
    return (f"<p>One plain SGD step (lr {args.dynamics_lr:g}, {step}) per arm on the policy-gradient surrogate, from "
            f"the same start weights and rollouts, over {result['batches']} batches of "
            f"{args.dynamics_groups_per_batch} group(s) with both positive and negative completions. Changes are "
            "measured on the batch's own completions: mean token log-prob of correct (<code>dlogp_correct</code>) "
            "and incorrect (<code>dlogp_incorrect</code>) completions, mean token entropy (<code>dentropy</code>). "
            "Chart: <code>dynamics.png</code>.</p>" + html_table(result))


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
        if overlap.get("dominant_share") is not None:
            print(f"  dominant tokens also top {100 * overlap['quantile']:g} % entropy (thr/entropy_overlap): "
                  f"{100 * overlap['dominant_share']:.1f} % (chance {100 * overlap['dominant_chance']:.1f} %)")
        for name, entry in overlap["per_group"].items():
            if entry.get("ci95") is not None:
                print(f"    {name} per group: {100 * entry['mean']:.1f} ± {100 * entry['ci95']:.1f} % "
                      f"(95 % interval over {entry['groups']} groups)")
    if "dynamics" in record:
        print(f"Dynamics ({record['dynamics']['batches']} batches, mean over batches):")
        for arm, values in record["dynamics"]["arms"].items():
            print(f"  {arm:18s} " + "  ".join(f"{metric} {values[metric]['mean']:+.3g}" for metric in
                                              ("dlogp_correct", "dlogp_incorrect", "dentropy", "mean_weight")
                                              if values[metric]["mean"] is not None))
        print(f"Dynamics: {Path(args.output_dir) / 'dynamics.json'}")
    print(f"Report: {Path(args.output_dir) / 'thr_report.html'}")
    return record


if __name__ == "__main__":
    sys.exit(run("analyze"))
