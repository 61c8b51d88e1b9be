"""Per-step wall time of GRPOTrainer vs THRGRPOTrainer on the demo config, side by side in one run.

    python benchmarks/bench_step.py --out bench_step.json                # the demo (SmolLM2-135M offline, CPU)
    python benchmarks/bench_step.py --tiny --out outputs/bench_step.json    # seconds: builtin:tiny-qwen2, smoke run

The arms are plain `trl.GRPOTrainer` and `THRGRPOTrainer` with each `thr_hidden_source` ("forward", "generate";
`gpu_check.THR_ARMS`). Every arm is built from the demo config
(`trl_thr/cli/configs/demo.yaml`: model, dataset, template, rewards, batch, lengths, temperature, seed) exactly as
`trl-thr train` builds it, and trains from the same seed on the same data. To be fair to a machine whose speed
drifts (other jobs, thermal), all arms are alive at once, each training in its own thread, and they take optimizer
steps in strict rotation (GRPO, THR, THR, GRPO, THR, THR, ...): only one arm runs at a time, from the start of its
step until it is about to start the next one, and each arm's random state is saved and restored at every turn, so
an arm samples exactly what it would sample alone. Each arm's first `--warmup` steps are dropped; the next
`--steps` are timed (an optimizer step's wall time, generation included). The report gives mean, median and spread
per arm and the overhead of each THR arm over GRPO.

It also times the THR kernel against one LM-head log-prob pass over the same tokens at Qwen2.5-1.5B's shape
(d = 1536, V = 151,936; `gpu_check.kernel_vs_lm_head`) with the algorithmic bound `2 |V'| / V` next to it, and
measures what THR holds during the demo's steps: the captured `(B, T, d)` states, `|V'|`, and the kernel's peak
tensor memory (profiled afterwards on the first call's own inputs, outside the timed steps).

Results are written as JSON (atomically, after every step), with the machine's load averages before and after:
the numbers are only comparable within one run. Times, memory and load come from `measure.py`, the kernel comparison
and the recording of THR calls from `gpu_check.py`. Nothing is asserted; the script measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402  (the kernel comparison and the recording of THR calls)
import measure  # noqa: E402

from trl_thr.files import write_json_atomically  # noqa: E402


def demo_arguments(config_path: str) -> tuple[dict, dict, dict]:
    """`(script, model, training)` keyword arguments of a `trl-thr train` YAML config, split by dataclass."""
    import yaml
    from trl import ModelConfig

    from trl_thr.cli.commands.train import THRScriptArguments
    from trl_thr.thr_grpo_config import THRGRPOConfig

    values = yaml.safe_load(Path(config_path).read_text())
    names = {cls: {f.name for f in dataclasses.fields(cls) if f.init}
             for cls in (THRScriptArguments, ModelConfig, THRGRPOConfig)}
    split = {cls: {k: v for k, v in values.items() if k in keys} for cls, keys in names.items()}
    unknown = set(values) - set().union(*names.values())
    if unknown:
        raise ValueError(f"{config_path}: fields {sorted(unknown)} belong to none of the trainer's dataclasses.")
    return split[THRScriptArguments], split[ModelConfig], split[THRGRPOConfig]


def build_arms(training: dict, model_args, output_dir: Path, max_steps: int) -> list:
    """`[(name, trainer class, make config)]`: GRPO and one THR arm per hidden-state source, same fields otherwise."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    common = {**training, "output_dir": str(output_dir), "max_steps": max_steps, "report_to": "none",
              "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
              "model_init_kwargs": {"dtype": model_args.dtype, "revision": model_args.model_revision,
                                    "attn_implementation": model_args.attn_implementation}}
    grpo = {k: v for k, v in common.items() if k in grpo_fields}
    arms = [("grpo", GRPOTrainer, lambda: GRPOConfig(**grpo))]
    for name, extra in gpu_check.THR_ARMS:
        arms.append((name, THRGRPOTrainer, lambda extra=extra: THRGRPOConfig(**common, **extra)))
    return arms


class Turns:
    """Strict rotation of optimizer steps between trainers that train in separate threads.

    An arm holds the turn from the start of one step until the start of its next one (so its logging and data
    loading never overlap another arm's timed step), then hands it to the next arm still training. The global
    random state (torch, numpy, random) is saved when an arm hands the turn on and restored when it gets it back.
    """

    def __init__(self, names: list[str]):
        self.order = list(names)
        self.current = 0
        self.finished: set[str] = set()
        self.random_states: dict[str, tuple] = {}
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.order[self.current] == name)
        if name in self.random_states:
            import numpy as np

            torch_state, numpy_state, python_state = self.random_states.pop(name)
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)

    def hand_on(self, name: str) -> None:
        import numpy as np

        self.random_states[name] = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self._advance(name)

    def finish(self, name: str) -> None:
        with self.condition:
            self.finished.add(name)
        self._advance(name)

    def _advance(self, name: str) -> None:
        with self.condition:
            if self.order[self.current] != name:
                return
            for offset in range(1, len(self.order) + 1):
                candidate = (self.current + offset) % len(self.order)
                if self.order[candidate] not in self.finished:
                    self.current = candidate
                    break
            self.condition.notify_all()


def turn_clock(name: str, turns: Turns, device, on_step_end, stop_at: float = math.inf):
    """A step clock (`measure.step_clock`) that, before every step but the first, hands the turn on and waits for
    it to come back, and after every step calls `on_step_end()`; past the `time.time()` value `stop_at` it ends
    training after the current step."""
    steps_begun = 0

    def take_turn():
        nonlocal steps_begun
        if steps_begun:
            turns.hand_on(name)
            turns.wait(name)
        steps_begun += 1

    def after_step(control):
        on_step_end()
        if time.time() > stop_at:
            control.should_training_stop = True

    return measure.step_clock(device, before_step=take_turn, after_step=after_step)


def train_in_turns(arms, model_path, train_dataset, reward_funcs, device, on_step_end, clocks: dict,
                   stop_at: float = math.inf) -> dict:
    """Build every arm's trainer, then train them all in `Turns`; per arm its log history, THR calls and error.

    `clocks` receives each arm's step clock as it is built (`on_step_end` can read them while training runs).
    """
    from transformers import PrinterCallback

    turns = Turns([name for name, _, _ in arms])
    state = {}
    for name, trainer_cls, make_config in arms:
        clock = clocks[name] = turn_clock(name, turns, device, on_step_end, stop_at)
        trainer = trainer_cls(model=model_path, reward_funcs=reward_funcs, args=make_config(),
                              train_dataset=train_dataset, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        state[name] = {"trainer": trainer, "clock": clock, "error": None}

    def work(name):
        try:
            turns.wait(name)
            state[name]["trainer"].train()
        except BaseException as error:  # noqa: BLE001  (recorded; the other arms keep their turns)
            state[name]["error"] = gpu_check.error_record(error)
        finally:
            turns.finish(name)

    with gpu_check.recording_thr_calls(device, keep_first_inputs=True) as (records, _):
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout carries the report
            threads = [threading.Thread(target=work, args=(name,), name=name) for name in state]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    for name, arm in state.items():
        arm["log_history"] = arm.pop("trainer").state.log_history
        arm["thr_calls"] = [r for r in records if r["thread"] == name]
    gc.collect()
    return state


def thr_memory_formula(batch_rows: int, length: int, hidden_size: int, vocab_size: int, distinct_ids: int,
                       hidden_bytes: int, head_bytes: int, block_elements: int, group_tokens: int) -> dict:
    """What THR adds at its peak, in bytes, from tensor sizes: numel x element size.

    - captured states `B x T x d` in the training dtype (the capture THR keeps between the forward and the kernel);
    - the LM head `V x d` gathered whole under ZeRO-3/FSDP2 for the kernel (0 when the head is not sharded: the
      kernel reads the model's own parameter);
    - the kernel's working set: one (tokens x vocabulary) float32 block, `min(thr_block_elements, N_g |V'|)`
      values for a group of `N_g` (`group_tokens`) tokens, and the `|V'| x d` float32 influence matrix with the
      head rows it reads.
    """
    captured = batch_rows * length * hidden_size * hidden_bytes
    gathered_head = vocab_size * hidden_size * head_bytes
    kernel_block = min(block_elements, group_tokens * distinct_ids) * 4
    influence = 2 * distinct_ids * hidden_size * 4
    return {"captured_states_bytes": captured, "gathered_head_bytes_if_sharded": gathered_head,
            "kernel_block_bytes": kernel_block, "influence_and_head_rows_bytes": influence,
            "total_unsharded_bytes": captured + kernel_block + influence,
            "total_sharded_bytes": captured + gathered_head + kernel_block + influence}


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
    formula = thr_memory_formula(B, T, d, V, largest_vprime, element, head_element, first["block_elements"],
                                 group_tokens)
    measured = {}
    if args:
        measured["kernel_peak_bytes"] = measure.cpu_peak_tensor_bytes(lambda: compute_thr(*args, **kwargs))
        measured["kernel_peak_measured_with"] = "torch.profiler CPU allocations on the first call's inputs"
    return {"calls": len(records), "batch_rows_B": B, "completion_length_T_max": max(r["hidden_shape"][1]
                                                                                     for r in records),
            "hidden_size_d": d, "vocab_size_V": V, "largest_V_prime": largest_vprime,
            "hidden_dtype": first["hidden_dtype"], "lm_head_dtype": first["lm_head_dtype"],
            "captured_states_bytes_per_call": [r["hidden_bytes"] for r in records],
            "formula_bytes_first_call": formula, **measured}


def summarise_arms(timed: dict[str, list[float]]) -> dict:
    """`measure.summary` of each arm's timed steps, with the overhead of each THR arm over GRPO in %."""
    table = {name: measure.summary(seconds) for name, seconds in timed.items()}
    base = table.get("grpo", {})
    for name, row in table.items():
        if name != "grpo" and base.get("median") and row["median"]:
            row["overhead_median_pct"] = 100 * (row["median"] / base["median"] - 1)
            row["overhead_mean_pct"] = 100 * (row["mean"] / base["mean"] - 1)
    return table


def thr_seconds(metrics: dict) -> dict:
    """Medians of the trainer's own `thr/seconds` (kernel) and `thr/forward_seconds` (hidden states) metrics, and
    whatever it logs about the hidden-state source."""
    import statistics

    out = {}
    for key in ("thr/seconds", "thr/forward_seconds"):
        values = [v for v in metrics.get(key, []) if v is not None]
        if values:
            out[key] = statistics.median(values)
    for key in sorted(k for k in metrics if "own_forward" in k or "source" in k or "capture" in k):
        out[key] = metrics[key]
    return out


def measure_steps(record, args, arms, model_path, train_dataset, reward_funcs, device, out: Path) -> None:
    """Train the arms in turns and put their step times, THR metrics and THR memory into `record`."""
    clocks = {}

    def save_progress():  # runs in the arm that holds the turn, so never concurrently
        record["step_s"] = {name: list(clock.seconds) for name, clock in clocks.items()}
        record["steps"] = summarise_arms({name: seconds[args.warmup:] for name, seconds in record["step_s"].items()})
        write_json_atomically(out, record)

    stop_at = time.time() + args.time_limit_s if args.time_limit_s else math.inf
    state = train_in_turns(arms, model_path, train_dataset, reward_funcs, device, save_progress, clocks, stop_at)
    save_progress()
    record["load_after_steps"] = measure.load_averages()
    record["errors"] = {name: arm["error"] for name, arm in state.items() if arm["error"]}
    record["thr_metrics"] = {name: gpu_check.thr_log_metrics(arm["log_history"]) for name, arm in state.items()}
    record["trl_step_time"] = {name: [e["step_time"] for e in arm["log_history"] if "step_time" in e]
                               for name, arm in state.items()}
    record["thr_seconds"] = {name: thr_seconds(record["thr_metrics"][name]) for name in state if name != "grpo"}
    record["thr_memory"] = {name: thr_memory(arm["thr_calls"]) for name, arm in state.items() if name != "grpo"}
    record["thr_calls"] = {name: gpu_check.public_records(arm["thr_calls"]) for name, arm in state.items()
                           if name != "grpo"}
    del state
    gc.collect()


def source_revision() -> dict:
    """The git commit measured, and whether `src/` had uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]

    def git(*command):
        try:
            done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--short", "--", "src")
    return {"commit": git("rev-parse", "HEAD"), "src_uncommitted_changes": None if status is None else bool(status)}


def markdown(record: dict) -> str:
    lines = ["| trainer | timed steps | mean (s) | median (s) | min-max (s) | stdev (s) | overhead vs GRPO (median / "
             "mean) |", "|---|---|---|---|---|---|---|"]
    for name, row in record.get("steps", {}).items():
        if not row["n"]:
            continue
        overhead = "-" if name == "grpo" else (f"{row['overhead_median_pct']:+.1f} % / "
                                               f"{row['overhead_mean_pct']:+.1f} %")
        lines.append(f"| {name} | {row['n']} | {row['mean']:.3f} | {row['median']:.3f} | {row['min']:.3f}-"
                     f"{row['max']:.3f} | {row['stdev']:.3f} | {overhead} |")
    kernel = record.get("kernel")
    if isinstance(kernel, dict) and "lm_head_s" in kernel:
        lines += ["", "| kernel (d, V, tokens) | |V'| per group | LM-head pass (s) | THR sampled (s) | "
                  "THR / LM head | bound 2 |V'| / V |", "|---|---|---|---|---|---|",
                  f"| {kernel['hidden_size']}, {kernel['vocab_size']}, {kernel['tokens']} | "
                  f"{kernel['distinct_ids_per_group']} | {kernel['lm_head_s']['median']:.3f} | "
                  f"{kernel['thr_sampled_s']['median']:.4f} | {kernel['thr_sampled_over_lm_head']:.2%} | "
                  f"{kernel['bound_2V' + chr(39) + '/V']:.2%} |"]
    return "\n".join(lines)


def parse_args(argv=None):
    from trl_thr.cli.commands.train import DEMO_CONFIG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO_CONFIG, help="a trl-thr train YAML config (default: the demo)")
    parser.add_argument("--model", help="override model_name_or_path (e.g. builtin:tiny-qwen2)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every arm")
    parser.add_argument("--max-completion-length", type=int, help="override the config's")
    parser.add_argument("--kernel-rows", type=int, default=8, help="rows (one group) of the kernel comparison")
    parser.add_argument("--kernel-length", type=int, default=256, help="tokens per row (T/2..T) of the kernel part")
    parser.add_argument("--kernel-hidden-size", type=int, default=1536)
    parser.add_argument("--kernel-vocab-size", type=int, default=151936)
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-steps", action="store_true", help="only the kernel comparison")
    parser.add_argument("--arms", nargs="+", help="only these arms (grpo, thr_forward, thr_generate)")
    parser.add_argument("--time-limit-s", type=float,
                        help="stop every arm after the step that passes this many seconds of training")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run in seconds: builtin:tiny-qwen2, 1 timed step, tiny kernel shape")
    parser.add_argument("--out", default="bench_step.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model = args.model or "builtin:tiny-qwen2"
        args.steps, args.warmup = 1, 1
        args.max_completion_length = args.max_completion_length or 8
        args.kernel_length, args.kernel_hidden_size, args.kernel_vocab_size = 16, 32, 500
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from trl import ModelConfig

    from trl_thr.cli.arguments import load_problems
    from trl_thr.cli.commands.train import THRScriptArguments
    from trl_thr.cli.models import resolve_model
    from trl_thr.cli.rewards import load_reward_funcs

    out = Path(args.out)
    record = {"command": [sys.executable, *sys.argv], "config": args.config, "load_before": measure.load_averages(),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "finished": False}
    record["source"] = source_revision()
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

    work = Path(tempfile.mkdtemp(prefix="thr-bench-step-"))
    arms = build_arms(training, model_args, work, args.warmup + args.steps)
    if args.arms:
        unknown = set(args.arms) - {name for name, _, _ in arms}
        if unknown:
            raise SystemExit(f"--arms: {sorted(unknown)} not among {[name for name, _, _ in arms]}")
        arms = [arm for arm in arms if arm[0] in args.arms]
    record.update(model=model_args.model_name_or_path, model_path=model_path, device=str(device),
                  warmup_steps=args.warmup, timed_steps=args.steps, schedule="one step per arm in rotation",
                  arms=[name for name, _, _ in arms],
                  settings={k: training.get(k) for k in ("per_device_train_batch_size", "num_generations",
                                                         "max_completion_length", "temperature", "seed",
                                                         "learning_rate", "thr_strategy", "thr_p")})
    if not args.skip_steps:
        measure_steps(record, args, arms, model_path, train_dataset, reward_funcs, device, out)
    write_json_atomically(out, record)

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
    record["load_after"] = measure.load_averages()
    record["finished"] = True
    record["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomically(out, record)
    print(markdown(record))
    print(f"\nload averages before {record['load_before'].get('uptime', '')}\n"
          f"load averages after  {record['load_after'].get('uptime', '')}\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
