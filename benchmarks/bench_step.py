"""Per-step wall time of GRPOTrainer vs THRGRPOTrainer on the demo config, side by side in one run.

    python benchmarks/bench_step.py --out bench_step.json                # the demo (SmolLM2-135M offline, CPU)
    python benchmarks/bench_step.py --tiny --out /tmp/bench_step.json    # seconds: builtin:tiny-qwen2, smoke run

The arms are plain `trl.GRPOTrainer` and `THRGRPOTrainer`, with each `thr_hidden_source` ("forward", "generate")
when `THRGRPOConfig` has that field (else the one THR path it has). Every arm is built from the demo config
(`trl_thr/cli/configs/demo.yaml`: model, dataset, template, rewards, batch, lengths, temperature, seed) exactly as
`trl-thr train` builds it, and trains from the same seed on the same data. To be fair to a machine whose speed
drifts (other jobs, thermal), the arms run in `--rounds` rounds, in reversed order every other round (A B C, C B A,
...); each run of an arm starts a fresh trainer, drops its first `--warmup` steps, and times the next ones (an
optimizer step's wall time, generation included). The report gives mean, median and spread per arm and the
overhead of each THR arm over GRPO.

It also times the THR kernel against one LM-head log-prob pass over the same tokens at Qwen2.5-1.5B's shape
(d = 1536, V = 151,936; `gpu_check.kernel_vs_lm_head`) with the algorithmic bound `2 |V'| / V` next to it, and
measures what THR holds during the demo's steps: the captured `(B, T, d)` states, `|V'|`, and the kernel's peak
tensor memory (profiled afterwards on the first call's own inputs, outside the timed steps).

Results are written as JSON (atomically, after every arm run), with the machine's load averages before and after:
the numbers are only comparable within one run. Nothing is asserted; the script measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402  (the shared measuring helpers)


def demo_arguments(config_path: str) -> tuple[dict, dict, dict]:
    """`(script, model, training)` keyword arguments of a `trl-thr train` YAML config, split by dataclass."""
    import yaml
    from trl import ModelConfig

    from trl_thr.cli.train import THRScriptArguments
    from trl_thr.thr_grpo_config import THRGRPOConfig

    values = yaml.safe_load(Path(config_path).read_text())
    names = {cls: {f.name for f in dataclasses.fields(cls) if f.init}
             for cls in (THRScriptArguments, ModelConfig, THRGRPOConfig)}
    split = {cls: {k: v for k, v in values.items() if k in keys} for cls, keys in names.items()}
    unknown = set(values) - set().union(*names.values())
    if unknown:
        raise ValueError(f"{config_path}: fields {sorted(unknown)} belong to none of the trainer's dataclasses.")
    return split[THRScriptArguments], split[ModelConfig], split[THRGRPOConfig]


def build_arms(training: dict, model_args, output_dir: Path, max_steps: int):
    """`[(name, trainer class, config)]`: GRPO and one THR arm per hidden-state source, same fields otherwise."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    common = {**training, "output_dir": str(output_dir), "max_steps": max_steps, "report_to": "none",
              "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
              "model_init_kwargs": {"dtype": model_args.dtype, "revision": model_args.model_revision,
                                    "attn_implementation": model_args.attn_implementation}}
    grpo = {k: v for k, v in common.items() if k in grpo_fields}
    thr_arms, note = gpu_check.thr_arms({f.name for f in dataclasses.fields(THRGRPOConfig)})
    arms = [("grpo", GRPOTrainer, lambda: GRPOConfig(**grpo))]
    for name, extra in thr_arms:
        arms.append((name, THRGRPOTrainer, lambda extra=extra: THRGRPOConfig(**common, **extra)))
    return arms, note


def run_arm(name, trainer_cls, make_config, model_path, train_dataset, reward_funcs, warmup, device, keep_inputs):
    """Train one fresh trainer for `warmup + timed` steps; its step times, THR metrics and THR calls."""
    from transformers import PrinterCallback

    clock = gpu_check.StepClock(device)
    trainer = trainer_cls(model=model_path, reward_funcs=reward_funcs, args=make_config(),
                          train_dataset=train_dataset, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    with gpu_check.recording_thr_calls(device, keep_first_inputs=keep_inputs) as (records, _):
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout carries the report
            trainer.train()
    result = {"step_s": clock.seconds, "timed_s": clock.seconds[warmup:],
              "thr_metrics": gpu_check.thr_log_metrics(trainer.state.log_history),
              "trl_step_time": [e["step_time"] for e in trainer.state.log_history if "step_time" in e]}
    del trainer
    gc.collect()
    return result, records


def thr_memory(records: list[dict]) -> dict:
    """What THR held in the demo's steps (from its calls' tensors) and the kernel's measured peak."""
    from trl_thr import compute_thr

    if not records:
        return {"note": "no compute_thr call was recorded"}
    first = next((r for r in records if "_inputs" in r), records[0])
    B, T, d = first["hidden_shape"]
    V = first["lm_head_shape"][0]
    largest_vprime = max(max(r["distinct_ids_per_group"], default=0) for r in records)
    element = torch.empty((), dtype=getattr(torch, first["hidden_dtype"].split(".")[-1])).element_size()
    head_element = torch.empty((), dtype=getattr(torch, first["lm_head_dtype"].split(".")[-1])).element_size()
    args, kwargs = first.get("_inputs", ((), {}))
    G = args[5] if len(args) > 5 else B
    group_tokens = int(args[2].reshape(-1, G * T).sum(1).max()) if args else G * T
    formula = gpu_check.thr_memory_formula(B, T, d, V, largest_vprime, element, head_element,
                                           first["block_elements"] or 2**24, group_tokens)
    measured = {}
    if args:
        measured["kernel_peak_bytes"] = gpu_check.cpu_peak_tensor_bytes(lambda: compute_thr(*args, **kwargs))
        measured["kernel_peak_measured_with"] = "torch.profiler CPU allocations on the first call's inputs"
    return {"calls": len(records), "batch_rows_B": B, "completion_length_T_max": max(r["hidden_shape"][1]
                                                                                     for r in records),
            "hidden_size_d": d, "vocab_size_V": V, "largest_V_prime": largest_vprime,
            "hidden_dtype": first["hidden_dtype"], "lm_head_dtype": first["lm_head_dtype"],
            "captured_states_bytes_per_call": [r["hidden_bytes"] for r in records],
            "formula_bytes_first_call": formula, **measured}


def summarise_arms(runs: dict) -> dict:
    table = {}
    for name, arm_runs in runs.items():
        timed = [s for run in arm_runs for s in run["timed_s"]]
        table[name] = gpu_check.summary(timed)
    base = table.get("grpo", {}).get("median")
    base_mean = table.get("grpo", {}).get("mean")
    for name, row in table.items():
        if name != "grpo" and base and row["median"]:
            row["overhead_median_pct"] = 100 * (row["median"] / base - 1)
            row["overhead_mean_pct"] = 100 * (row["mean"] / base_mean - 1)
    return table


def thr_seconds(arm_runs: list[dict]) -> dict:
    """Medians of the trainer's own `thr/seconds` (kernel) and `thr/forward_seconds` (hidden states) metrics."""
    import statistics

    out = {}
    for key in ("thr/seconds", "thr/forward_seconds"):
        values = [v for run in arm_runs for v in run["thr_metrics"].get(key, []) if v is not None]
        if values:
            out[key] = statistics.median(values)
    for key in ("thr/hidden_source", "thr/captured_frac", "thr/generate_capture"):
        values = [v for run in arm_runs for v in run["thr_metrics"].get(key, [])]
        if values:
            out[key] = values
    return out


def markdown(record: dict) -> str:
    lines = ["| trainer | timed steps | mean (s) | median (s) | min-max (s) | stdev (s) | overhead vs GRPO (median / "
             "mean) |", "|---|---|---|---|---|---|---|"]
    for name, row in record["steps"].items():
        if not row["n"]:
            continue
        overhead = "-" if name == "grpo" else f"{row['overhead_median_pct']:+.1f} % / {row['overhead_mean_pct']:+.1f} %"
        lines.append(f"| {name} | {row['n']} | {row['mean']:.3f} | {row['median']:.3f} | {row['min']:.3f}-"
                     f"{row['max']:.3f} | {row['stdev']:.3f} | {overhead} |")
    kernel = record.get("kernel")
    if isinstance(kernel, dict) and "lm_head_s" in kernel:
        lines += ["", "| kernel (d, V, tokens) | |V'| per group | LM-head pass (s) | THR sampled (s) | THR / LM head | "
                  "bound 2 |V'| / V |", "|---|---|---|---|---|---|",
                  f"| {kernel['hidden_size']}, {kernel['vocab_size']}, {kernel['tokens']} | "
                  f"{kernel['distinct_ids_per_group']} | {kernel['lm_head_s']['median']:.3f} | "
                  f"{kernel['thr_sampled_s']['median']:.4f} | {kernel['thr_sampled_over_lm_head']:.2%} | "
                  f"{kernel['bound_2V' + chr(39) + '/V']:.2%} |"]
    return "\n".join(lines)


def parse_args(argv=None):
    from trl_thr.cli.train import DEMO_CONFIG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO_CONFIG, help="a trl-thr train YAML config (default: the demo)")
    parser.add_argument("--model", help="override model_name_or_path (e.g. builtin:tiny-qwen2)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm, over all rounds")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every arm run")
    parser.add_argument("--rounds", type=int, default=2, help="arm order alternates between rounds")
    parser.add_argument("--max-completion-length", type=int, help="override the config's")
    parser.add_argument("--kernel-rows", type=int, default=8, help="rows (one group) of the kernel comparison")
    parser.add_argument("--kernel-length", type=int, default=256, help="tokens per row (T/2..T) of the kernel part")
    parser.add_argument("--kernel-hidden-size", type=int, default=1536)
    parser.add_argument("--kernel-vocab-size", type=int, default=151936)
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run in seconds: builtin:tiny-qwen2, 1 timed step, 1 round, tiny kernel shape")
    parser.add_argument("--out", default="bench_step.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = args.model or "builtin:tiny-qwen2"
        args.steps, args.warmup, args.rounds = 1, 1, 1
        args.max_completion_length = args.max_completion_length or 8
        args.kernel_length, args.kernel_hidden_size, args.kernel_vocab_size = 16, 32, 500
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from trl import ModelConfig

    from trl_thr.cli.arguments import load_problems
    from trl_thr.cli.models import resolve_model
    from trl_thr.cli.rewards import load_reward_funcs
    from trl_thr.cli.train import THRScriptArguments

    out = Path(args.out)
    record = {"command": [sys.executable, *sys.argv], "config": args.config, "load_before": gpu_check.load_averages(),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "finished": False}
    script_kwargs, model_kwargs, training = demo_arguments(args.config)
    if args.model:
        model_kwargs["model_name_or_path"] = args.model
    if args.max_completion_length:
        training["max_completion_length"] = args.max_completion_length
    script, model_args = THRScriptArguments(**script_kwargs), ModelConfig(**model_kwargs)
    device = torch.device("cpu" if training.get("use_cpu") or not torch.cuda.is_available() else "cuda")
    model_path = resolve_model(model_args.model_name_or_path)
    train_dataset, _ = load_problems(script.dataset_name, script, seed=training.get("seed", 42),
                                     data_files=script.dataset_data_files, max_samples=script.max_train_samples)
    reward_funcs = load_reward_funcs(script.reward_funcs, script.reward_on_error)

    per_round = math.ceil(args.steps / args.rounds)
    work = Path(tempfile.mkdtemp(prefix="thr-bench-step-"))
    arms, note = build_arms(training, model_args, work, args.warmup + per_round)
    record.update(model=model_args.model_name_or_path, model_path=model_path, device=str(device),
                  warmup_steps_per_run=args.warmup, timed_steps_per_run=per_round, rounds=args.rounds,
                  arms=[name for name, _, _ in arms], arm_note=note,
                  settings={k: training.get(k) for k in ("per_device_train_batch_size", "num_generations",
                                                         "max_completion_length", "temperature", "seed",
                                                         "learning_rate", "thr_strategy", "thr_p")},
                  order=[], runs={name: [] for name, _, _ in arms})
    memory_records = {}
    for round_index in range(args.rounds):
        order = arms if round_index % 2 == 0 else arms[::-1]
        for name, trainer_cls, make_config in order:
            print(f"[bench_step] round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            keep = name != "grpo" and name not in memory_records
            result, calls = run_arm(name, trainer_cls, make_config, model_path, train_dataset, reward_funcs,
                                    args.warmup, device, keep)
            result["round"] = round_index
            result["thr_calls"] = gpu_check.public_records(calls)
            if keep:
                memory_records[name] = calls
            record["order"].append(name)
            record["runs"][name].append(result)
            record["steps"] = summarise_arms(record["runs"])
            gpu_check.write_json_atomic(out, record)
    record["thr_seconds"] = {name: thr_seconds(runs) for name, runs in record["runs"].items() if name != "grpo"}
    record["thr_memory"] = {name: thr_memory(calls) for name, calls in memory_records.items()}
    memory_records.clear()
    gpu_check.write_json_atomic(out, record)

    if not args.skip_kernel:
        scale = replace(gpu_check.SCALES["h100"], hidden_size=args.kernel_hidden_size,
                        vocab_size=args.kernel_vocab_size, num_generations=args.kernel_rows, kernel_groups=1,
                        kernel_length=args.kernel_length)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the demo trains in float32 on CPU
        try:
            record["kernel"] = gpu_check.kernel_vs_lm_head(gpu_check.synthetic_batch(scale, device, dtype=dtype),
                                                           device, vocabs=("sampled",))
        except Exception as error:  # the step table above is the main result: keep it
            record["kernel"] = gpu_check.error_record(error)
    record["load_after"] = gpu_check.load_averages()
    record["finished"] = True
    record["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    gpu_check.write_json_atomic(out, record)
    print(markdown(record))
    print(f"\nload averages before {record['load_before'].get('uptime', '')}\n"
          f"load averages after  {record['load_after'].get('uptime', '')}\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
