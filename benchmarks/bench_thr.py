"""Measure what THR costs.

Part 1, the kernel at a realistic shape: `compute_thr` (sampled and full vocabulary) next to the LM-head work the
trainer's old-log-prob forward already does for the same tokens (the full (tokens x V) projection with a
log-softmax, computed in vocabulary chunks like TRL's fused head).

Part 2, a training step: THRGRPOTrainer vs GRPOTrainer on the same tiny local model and data.

    python benchmarks/bench_thr.py                        # CPU defaults (a few minutes on 2 cores)
    python benchmarks/bench_thr.py --device cuda --lengths 512 1024 2048 3072

Prints a markdown table; nothing is asserted.
"""

import argparse
import contextlib
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trl_thr import compute_thr


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def zipf_ids(shape, vocab_size, generator, exponent=1.1):
    """Token ids with a long-tailed frequency profile, so the number of distinct ids per group is realistic."""
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    flat = torch.multinomial(probs / probs.sum(), int(torch.tensor(shape).prod()), replacement=True,
                             generator=generator)
    return flat.view(shape)


def lm_head_logps(hidden, weight, targets, chunk):
    """What the trainer's fused head does for these tokens: log pi(y) over the full vocabulary, V-chunked."""
    flat, ids = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    lse = torch.full((flat.size(0),), -float("inf"), device=flat.device)
    target_logit = torch.empty(flat.size(0), device=flat.device)
    for start in range(0, weight.size(0), chunk):
        logits = (flat @ weight[start : start + chunk].T).float()
        lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        inside = (ids >= start) & (ids < start + chunk)
        target_logit[inside] = logits[inside, ids[inside] - start]
    return (target_logit - lse).view(targets.shape)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB (Linux: KiB units)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def kernel_table(args):
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab_size, args.hidden_size, generator=gen) / args.hidden_size**0.5).to(device, dtype)
    rows = []
    for length in args.lengths:
        g = args.num_generations
        hidden = torch.randn(g, length, args.hidden_size, generator=gen).to(device, dtype)
        ids = zipf_ids((g, length), args.vocab_size, gen).to(device)
        mask = torch.ones(g, length, dtype=torch.long, device=device)
        advantages = torch.tensor([1.0] * (g // 4) + [-0.5] * (g - g // 4), device=device)
        chunk = max(1, 2**26 // (g * length))
        reset_peak(device)
        base_mem = peak_memory(device)
        head_seconds = timed(lambda: lm_head_logps(hidden, weight, ids, chunk), device, args.repeats)
        logps = lm_head_logps(hidden, weight, ids, chunk)
        distinct = ids.unique().numel()
        for vocab in args.vocab:
            if vocab == "full" and length > args.max_full_length:
                continue
            reset_peak(device)
            seconds = timed(
                lambda: compute_thr(hidden, ids, mask, weight, advantages, g, vocab=vocab, token_logprobs=logps),
                device, args.repeats if vocab == "sampled" else 1,
            )
            rows.append((length, vocab, distinct, seconds, head_seconds, peak_memory(device) - base_mem))
            print(f"  T={length} vocab={vocab}: THR {seconds:.3f}s, LM head {head_seconds:.3f}s", file=sys.stderr)
    return rows


def step_table(args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tiny_model, length_reward, tiny_dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_thr import THRGRPOConfig, THRGRPOTrainer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(Path(tmp) / "model", hidden_size=args.tiny_hidden_size)
        common = dict(output_dir=str(Path(tmp) / "out"), use_cpu=args.device == "cpu", bf16=False,
                      gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                      per_device_train_batch_size=8, num_generations=8, max_completion_length=64,
                      max_steps=args.steps, seed=0, disable_tqdm=True)
        for name, trainer_cls, config in (
            ("GRPOTrainer", GRPOTrainer, GRPOConfig(**common)),
            ("THRGRPOTrainer (sampled)", THRGRPOTrainer, THRGRPOConfig(**common)),
            ("THRGRPOTrainer (full)", THRGRPOTrainer, THRGRPOConfig(**common, thr_vocab="full")),
        ):
            trainer = trainer_cls(model=model_path, reward_funcs=length_reward, args=config,
                                  train_dataset=tiny_dataset())
            trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints; keep stdout for the tables
                trainer.train()
            wall = (time.perf_counter() - start) / args.steps
            logs = [e for e in trainer.state.log_history if "step_time" in e][1:]  # drop the warm-up step
            thr = [e.get("thr/seconds", 0.0) + e.get("thr/forward_seconds", 0.0) for e in logs]
            results[name] = (wall, statistics.median(e["step_time"] for e in logs), statistics.median(thr))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden-size", type=int, default=1536)
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--vocab", nargs="+", default=["sampled", "full"], choices=["sampled", "full"])
    parser.add_argument("--max-full-length", type=int, default=3072, help="skip full vocab above this length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per trainer in part 2")
    parser.add_argument("--tiny-hidden-size", type=int, default=64)
    parser.add_argument("--skip-steps", action="store_true", help="only part 1")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    print(f"device={args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, dtype={args.dtype}")
    print(f"\nKernel: d={args.hidden_size}, V={args.vocab_size}, G={args.num_generations}\n")
    print("| completion tokens | vocab | distinct ids in group | THR kernel (s) | LM head log-probs (s) | "
          "THR / LM head | peak extra memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for length, vocab, distinct, seconds, head, memory in kernel_table(args):
        print(f"| {length} | {vocab} | {distinct} | {seconds:.3f} | {head:.3f} | {seconds / head:.1%} | "
              f"{memory:.0f} |")
    if args.skip_steps:
        return
    print(f"\nTraining step: tiny Qwen2 (d={args.tiny_hidden_size}), 8 completions x 64 tokens, "
          f"{args.steps} steps, first step dropped\n")
    print("| trainer | wall time / step (s) | TRL step_time (s) | THR forward + kernel (s) |")
    print("|---|---|---|---|")
    for name, (wall, step, thr) in step_table(args).items():
        print(f"| {name} | {wall:.3f} | {step:.3f} | {thr:.4f} |")


if __name__ == "__main__":
    main()
