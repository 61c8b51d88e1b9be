"""Measure what THR costs.

Part 1, the kernel at a realistic shape: `compute_thr` (sampled and full vocabulary) next to the LM-head work the
trainer's old-log-prob forward already does for the same tokens (the full (tokens x V) projection with a
log-softmax, computed in vocabulary chunks like TRL's fused head).

Part 2, a training step: THRGRPOTrainer vs GRPOTrainer on the same tiny local model and data.

    python benchmarks/bench_thr.py                        # CPU defaults (a few minutes on 2 cores)
    python benchmarks/bench_thr.py --device cuda --lengths 512 1024 2048 3072
    python benchmarks/bench_thr.py --skip-steps --groups 4 --ragged --compare-with e7bb1ab --skip-lm-head

`--compare-with REV` also times `compute_thr` as it was at git revision REV (loaded from `git show`, so the
package keeps no old copy), on the same inputs, and checks that both give the same THR. `--skip-lm-head` leaves
out the LM-head pass (the slowest part on a CPU): the log-prob of each sampled token is then `z_y - LSE` with the
log-normaliser of Gaussian logits, `LSE = log V + var(z) / 2`, close to the true one for these random weights.

Times are medians: of `--repeats` calls after a warm-up in part 1 (`measure.timed`), of the steps after the first
in part 2 (`measure.step_clock`). Prints a markdown table; nothing is asserted.
"""

import argparse
import contextlib
import functools
import gc
import math
import os
import resource
import statistics
import subprocess
import time
import sys
import tempfile
import types
from pathlib import Path

import measure
import torch

from trl_thr import compute_thr


def kernel_at_revision(revision):
    """`compute_thr` from `src/trl_thr/thr.py` as committed at git `revision`."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:src/trl_thr/thr.py"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"thr_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:src/trl_thr/thr.py", "exec"), module.__dict__)
    return module.compute_thr


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


def approximate_logps(hidden, weight, targets):
    """`log pi(y)` without the full vocabulary: logits `z = W h` of random weights are close to Gaussian, whose
    log-sum-exp over `V` ids is about `log V + var(z) / 2`."""
    target_logit = (hidden.float() * weight[targets].float()).sum(-1)
    variance = hidden.float().pow(2).sum(-1) * weight.float().pow(2).sum(-1).mean() / hidden.size(-1)
    return target_logit - (math.log(weight.size(0)) + variance / 2)


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
    previous = kernel_at_revision(args.compare_with) if args.compare_with else None
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab_size, args.hidden_size, generator=gen) / args.hidden_size**0.5).to(device, dtype)
    rows = []
    for length in args.lengths:
        g = args.num_generations
        batch = g * args.groups
        hidden = torch.randn(batch, length, args.hidden_size, generator=gen).to(device, dtype)
        ids = zipf_ids((batch, length), args.vocab_size, gen).to(device)
        full = torch.full((batch, 1), length)
        lengths = torch.randint(1, length + 1, (batch, 1), generator=gen) if args.ragged else full
        mask = (torch.arange(length) < lengths).long().to(device)  # (batch, length)
        advantages = torch.tensor(([1.0] * (g // 4) + [-0.5] * (g - g // 4)) * args.groups, device=device)
        chunk = max(1, 2**26 // (batch * length))
        reset_peak(device)
        base_mem = peak_memory(device)
        if args.skip_lm_head:
            head_seconds, logps = None, approximate_logps(hidden, weight, ids)
        else:
            head = functools.partial(lm_head_logps, hidden, weight, ids, chunk)
            head_seconds = measure.timed(head, device, args.repeats)["median"]
            logps = lm_head_logps(hidden, weight, ids, chunk)
        distinct = max(ids[k * g : (k + 1) * g][mask[k * g : (k + 1) * g].bool()].unique().numel()
                       for k in range(args.groups))
        for vocab in args.vocab:
            if vocab == "full" and length > args.max_full_length:
                continue
            kwargs = dict(vocab=vocab, include_self=not args.exclude_self, token_logprobs=logps)
            repeats = args.repeats if vocab == "sampled" else 1
            reset_peak(device)
            thr = functools.partial(compute_thr, hidden, ids, mask, weight, advantages, g, **kwargs)
            seconds = measure.timed(thr, device, repeats)["median"]
            memory = peak_memory(device) - base_mem
            previous_seconds = None
            if previous is not None:
                old = functools.partial(previous, hidden, ids, mask, weight, advantages, g, **kwargs)
                previous_seconds = measure.timed(old, device, repeats)["median"]
                torch.testing.assert_close(compute_thr(hidden, ids, mask, weight, advantages, g, **kwargs),
                                           previous(hidden, ids, mask, weight, advantages, g, **kwargs),
                                           rtol=1e-3, atol=1e-5)
            rows.append((length, vocab, distinct, seconds, previous_seconds, head_seconds, memory))
            print(f"  T={length} vocab={vocab}: THR {seconds:.3f}s, previous {previous_seconds}, LM head "
                  f"{head_seconds}", file=sys.stderr)
    return rows


def step_table(args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import length_reward, tiny_dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_thr import THRGRPOConfig, THRGRPOTrainer
    from trl_thr.tiny import build_tiny_model

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
            clock = measure.step_clock(torch.device(args.device))
            trainer = trainer_cls(model=model_path, reward_funcs=length_reward, args=config,
                                  train_dataset=tiny_dataset(), callbacks=[clock])
            trainer.remove_callback(PrinterCallback)
            with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints; keep stdout for the tables
                trainer.train()
            wall = statistics.median(clock.seconds[1:])  # drop the warm-up step
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
    parser.add_argument("--groups", type=int, default=1, help="groups (prompts) per kernel call")
    parser.add_argument("--ragged", action="store_true", help="completion lengths uniform in [1, T], not all T")
    parser.add_argument("--exclude-self", action="store_true", help="time include_self=False")
    parser.add_argument("--compare-with", metavar="REV", help="also time compute_thr as of this git revision")
    parser.add_argument("--skip-lm-head", action="store_true", help="approximate log-probs, no LM-head pass")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512])
    parser.add_argument("--vocab", nargs="+", default=["sampled", "full"], choices=["sampled", "full"])
    parser.add_argument("--max-full-length", type=int, default=3072, help="skip full vocab above this length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps per trainer in part 2")
    parser.add_argument("--tiny-hidden-size", type=int, default=64)
    parser.add_argument("--skip-steps", action="store_true", help="only part 1")
    parser.add_argument("--out", metavar="JSON", help="also write the rows, settings and machine load here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    print(f"device={args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, dtype={args.dtype}")
    print(f"\nKernel: d={args.hidden_size}, V={args.vocab_size}, G={args.num_generations}, {args.groups} group(s), "
          f"{'ragged' if args.ragged else 'full-length'} completions, include_self={not args.exclude_self}\n")
    previous = f" compute_thr at {args.compare_with} (s) |" if args.compare_with else ""
    print(f"| completion tokens | vocab | largest \\|V'\\| of a group | THR kernel (s) |{previous} "
          "LM head log-probs (s) | THR / LM head | peak extra memory (MiB) |")
    print("|---|---|---|---|" + ("---|" if previous else "") + "---|---|---|")
    import measure

    record = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_before": measure.load_averages(), "kernel": [], "steps": {}}
    for length, vocab, distinct, seconds, previous_seconds, head, memory in kernel_table(args):
        record["kernel"].append(dict(length=length, vocab=vocab, distinct=distinct, thr_seconds=seconds,
                                     previous_seconds=previous_seconds, lm_head_seconds=head, peak_extra_mib=memory))
        previous = f" {previous_seconds:.3f} |" if previous_seconds is not None else ""
        head, share = ("not measured", "-") if head is None else (f"{head:.3f}", f"{seconds / head:.1%}")
        print(f"| {length} | {vocab} | {distinct} | {seconds:.3f} |{previous} {head} | {share} | {memory:.0f} |")
    if args.skip_steps:
        write_record(args.out, record)
        return
    print(f"\nTraining step: tiny Qwen2 (d={args.tiny_hidden_size}), 8 completions x 64 tokens, "
          f"{args.steps} steps, first step dropped\n")
    print("| trainer | wall time / step (s) | TRL step_time (s) | THR forward + kernel (s) |")
    print("|---|---|---|---|")
    for name, (wall, step, thr) in step_table(args).items():
        record["steps"][name] = dict(wall_seconds=wall, step_time=step, thr_seconds=thr)
        print(f"| {name} | {wall:.3f} | {step:.3f} | {thr:.4f} |")
    write_record(args.out, record)


def write_record(path: str | None, record: dict) -> None:
    """The measurement as JSON (with the load after it), so that the numbers docs quote have a record."""
    if path is None:
        return
    import measure

    from trl_thr.files import write_json_atomically

    write_json_atomically(path, {**record, "load_after": measure.load_averages(),
                                 "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})


if __name__ == "__main__":
    main()
