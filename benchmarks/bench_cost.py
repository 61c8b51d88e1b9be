"""What THR adds to a training step, measured on fixed work: GRPOTrainer vs THRGRPOTrainer, one arm per process.

    # one process, one arm: appends a record of its step times to --out
    python benchmarks/bench_cost.py --trainer thr --engine vllm --out runs.jsonl
    # the comparison: --pairs processes of each arm, alternating GRPO, THR, GRPO, THR, ...; then the summary
    python benchmarks/bench_cost.py --engine transformers --pairs 5 --out runs.jsonl
    python benchmarks/bench_cost.py --summarize runs.jsonl

The work per step is fixed, so that a difference of 1 % is not drowned by the rollouts: every completion is forced
to `--max_completion_length` tokens (`min_new_tokens` for transformers' `generate`, `min_tokens` for vLLM), the
prompts are the same fixed arithmetic questions, the seed is the same, and the reward (the share of digits) differs
within every group, so THR has every group to work on. Both arms are built from the same fields; THR is the
package's default (`positive-amplify`, hidden states from the generation or TRL's old-log-prob forward).
`--engine vllm` generates with vLLM in colocate mode (on a CPU: vLLM's CPU build, `make test-vllm`'s environment).

Each process trains `--warmup + --steps` steps and times each optimizer step (`measure.step_clock`, generation
included); the first `--warmup` are dropped. A process's figure is the median of its timed steps. Arms alternate
process by process, so a drift of the machine's speed reaches both; the summary pairs the i-th GRPO process with the
i-th THR process and reports the median of the per-pair ratios THR / GRPO with a 95 % interval (the order statistics
of the pairs' ratios that bound the median, a sign-test interval), and every process's median. Run it on an
otherwise idle machine: the records carry the load averages before and after. Nothing is asserted; it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402

from trl_thr.files import append_json_line  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = [f"What is {a} times {b}? Think step by step, then give the answer." for a, b in
           [(12, 7), (23, 4), (9, 18), (31, 3), (15, 15), (27, 6), (8, 44), (19, 5)]]


def train_one_arm(trainer_name: str, engine: str, steps: int, warmup: int, batch: int, num_generations: int,
                  max_completion_length: int, model: str) -> dict:
    """Train one arm for `warmup + steps` steps in this process; its step times, what each step generated, THR's
    clocked work, and the arm's whole time from here (model loading included)."""
    arm_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_thr import THRGRPOConfig, THRGRPOTrainer
    from trl_thr._trl_compat import vllm_generation_for_platform
    from trl_thr.cli.models import resolve_model
    from trl_thr.tiny import digit_reward

    path = resolve_model(model)
    forced = {"min_tokens" if engine == "vllm" else "min_new_tokens": max_completion_length}
    fields = dict(output_dir=tempfile.mkdtemp(prefix="bench-cost-"), per_device_train_batch_size=batch,
                  num_generations=num_generations, max_completion_length=max_completion_length,
                  max_steps=warmup + steps, learning_rate=1e-6, temperature=1.0, seed=0, logging_steps=1,
                  generation_kwargs=forced, use_vllm=engine == "vllm", vllm_mode="colocate", use_cpu=True,
                  bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
                  model_init_kwargs={"dtype": torch.float32})
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS] * 64})
    clock = measure.step_clock(torch.device("cpu"))
    load_before = measure.load_averages()
    if trainer_name == "grpo":
        args = GRPOConfig(**fields)
        with vllm_generation_for_platform(args):
            trainer = GRPOTrainer(model=path, reward_funcs=digit_reward, args=args, train_dataset=dataset,
                                  callbacks=[clock])
    else:
        trainer = THRGRPOTrainer(model=path, reward_funcs=digit_reward, args=THRGRPOConfig(**fields),
                                 train_dataset=dataset, callbacks=[clock])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "trainer": trainer_name, "engine": engine, "model": model, "batch": batch,
        "num_generations": num_generations, "max_completion_length": max_completion_length, "warmup": warmup,
        "step_seconds": clock.seconds, "timed_median": statistics.median(clock.seconds[warmup:]),
        "min_completion_length": [entry["completions/min_length"] for entry in logs],
        "max_completion_length_seen": [entry["completions/max_length"] for entry in logs],
        "thr_seconds": [entry.get("thr/seconds") for entry in logs],
        "thr_forward_seconds": [entry.get("thr/forward_seconds") for entry in logs],
        "arm_seconds": time.perf_counter() - arm_start,
        "load_before": load_before, "load_after": measure.load_averages(),
    }


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free ~95 % interval for it: the order statistics a sign test puts around the median
    (for n < 6 no such pair reaches 95 %, and the interval is the whole range)."""
    ordered, n = sorted(values), len(values)
    k = 0  # largest k with P(Binomial(n, 1/2) <= k) <= 0.025
    while sum(math.comb(n, i) for i in range(k + 2)) / 2**n <= 0.025:
        k += 1
    return statistics.median(ordered), ordered[k], ordered[n - 1 - k]


def capture_overhead(rounds: int, batch: int, max_completion_length: int, model: str) -> dict:
    """Seconds of one `generate` of `batch` x `max_completion_length` forced tokens, plain and with THR's generation
    capture recording it (the plain path's only addition to generation), alternating in one process; and the seconds
    spent inside the capture's hooks during each captured `generate` (CPU only: no device to wait for)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_thr.cli.models import resolve_model
    from trl_thr.generation_capture import GenerationCapture

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    causal_lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    inputs = tokenizer((texts * batch)[:batch], return_tensors="pt", padding=True)
    kwargs = dict(do_sample=True, max_new_tokens=max_completion_length, min_new_tokens=max_completion_length,
                  temperature=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id)

    def plain():
        with torch.no_grad():
            causal_lm.generate(**inputs, **kwargs)

    hook_seconds = []

    def captured():
        capture = GenerationCapture.from_model(causal_lm, temperature=1.0)
        spent = {}
        for name in ("_before_backbone", "_after_backbone", "_after_lm_head"):  # the hooks `recording` registers
            setattr(capture, name, clocked_hook(getattr(capture, name), spent, name))
        with torch.no_grad(), capture.recording():
            causal_lm.generate(**inputs, **kwargs)
        hook_seconds.append(spent)

    plain()  # warm-up
    captured()
    seconds = {"plain": [], "captured": []}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("captured", captured)):
            seconds[name].append(measure.clocked(fn, torch.device("cpu"))[1])
    ratios = [c / p for p, c in zip(seconds["plain"], seconds["captured"])]
    median, low, high = median_interval(ratios)
    return {"rounds": rounds, "seconds": seconds, "ratio_median": median, "ratio_ci95": [low, high],
            "hook_seconds": hook_seconds[1:], "load": measure.load_averages()}


def clocked_hook(hook, spent: dict, name: str):
    """`hook`, adding the seconds each call takes to `spent[name]` (CPU: the work is done when the call returns)."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    return timed


def summarize(path: Path) -> dict:
    """Per engine: each arm's process medians, and THR / GRPO paired in running order."""
    complete_lines = path.read_text().split("\n")[:-1]  # a line cut short by a kill has no newline yet
    records = [json.loads(line) for line in complete_lines if line.strip()]
    report = {}
    for engine in sorted({r["engine"] for r in records}):
        arms = {name: [r for r in records if r["engine"] == engine and r["trainer"] == name] for name in ("grpo", "thr")}
        pairs = list(zip(arms["grpo"], arms["thr"]))
        ratios = [thr["timed_median"] / grpo["timed_median"] for grpo, thr in pairs]
        entry = {name: [round(r["timed_median"], 4) for r in runs] for name, runs in arms.items()}
        forced = all(min(r["min_completion_length"]) == r["max_completion_length"] for r in arms["grpo"] + arms["thr"])
        entry.update(pairs=len(pairs), all_completions_full_length=forced)
        if ratios:
            median, low, high = median_interval(ratios)
            entry.update(ratio_median=round(median, 4), ratio_ci95=[round(low, 4), round(high, 4)],
                         ratios=[round(x, 4) for x in ratios],
                         grpo_step_median=round(statistics.median(r["timed_median"] for r in arms["grpo"]), 3),
                         thr_step_median=round(statistics.median(r["timed_median"] for r in arms["thr"]), 3))
        report[engine] = entry
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=["grpo", "thr"], help="train this one arm in this process")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--pairs", type=int, help="run this many processes of each arm, alternating")
    parser.add_argument("--summarize", type=Path, help="summarize a records file and print it as JSON")
    parser.add_argument("--capture_overhead", type=int, metavar="ROUNDS",
                        help="time generate with and without THR's generation capture, alternating, ROUNDS times")
    parser.add_argument("--out", type=Path, default=Path("bench_cost.jsonl"), help="records, one JSON line a process")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per process")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size (completions per step)")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--model", default=MODEL)
    args = parser.parse_args()
    if args.summarize is not None:
        print(json.dumps(summarize(args.summarize), indent=2))
        return
    if args.capture_overhead is not None:
        result = capture_overhead(args.capture_overhead, args.batch, args.max_completion_length, args.model)
        append_json_line(args.out, result)
        print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
        return
    if args.trainer is not None:
        record = train_one_arm(args.trainer, args.engine, args.steps, args.warmup, args.batch, args.num_generations,
                               args.max_completion_length, args.model)
        append_json_line(args.out, record)  # a killed comparison loses only the process in flight
        return
    if args.pairs is None:
        parser.error("give --trainer (one process), --pairs (the alternating comparison) or --summarize")
    common = ["--engine", args.engine, "--out", str(args.out), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--batch", str(args.batch), "--num_generations", str(args.num_generations),
              "--max_completion_length", str(args.max_completion_length), "--model", args.model]
    for _ in range(args.pairs):
        for trainer in ("grpo", "thr"):
            subprocess.run([sys.executable, __file__, "--trainer", trainer, *common], check=True)
    print(json.dumps(summarize(args.out), indent=2))


if __name__ == "__main__":
    main()
