"""THR under mixed precision: how far the trainer-recovered normaliser moves THR from float64, on CPU.

    python benchmarks/bench_precision.py [--vocab 49152] [--hidden 576] [--groups 2] [--length 64] [--out FILE]

TRL's chunked log-prob kernel (the trainer's log-probs) runs under bf16 autocast with float32 master weights, as in
`bf16=True` training. THR is then computed from the same hidden states and head in four ways (inputs as stored or
rounded like the trainer's bf16 projection; normaliser recovered from the trainer's log-probs or exact) and compared
with a float64 THR of the same inputs: the relative L2 error of THR and the fraction of tokens whose positive-amplify
weight (anchor threshold) differs; each variant's seconds are one call (`measure.clocked`). Prints a table and
writes it as JSON.
"""

import argparse
import functools

import measure
import torch
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

from trl_thr.files import write_json_atomically
from trl_thr.thr import compute_thr, group_thresholds, thr_weights


def trainer_logprobs(hidden, weight, labels):
    """Per-token log-probs `(N,)` of TRL's fused head under bf16 autocast (float32 hidden and weight)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs = _ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                  None, 1.0, ("log_probs",))[0]
    return log_probs.float()


def weights_of(thr, advantages, mask, group_size):
    taus = group_thresholds(thr.float(), advantages, mask, group_size)
    return thr_weights(thr.float(), advantages, mask, group_size, strategy="positive-amplify", taus=taus)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--logit_std", type=float, default=4.0, help="Spread of the logits (a trained LM: 3-6).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the sampled tokens
    gen = torch.Generator().manual_seed(args.seed)
    rows = args.groups * args.group_size
    hidden = torch.randn(rows, args.length, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * (args.logit_std / args.hidden**0.5)
    # Sample each token from the model itself, so that sampled tokens have realistic (high) probabilities.
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T
        ids = torch.distributions.Categorical(logits=logits).sample()
        exact_logprobs = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    del logits
    mask = torch.ones(rows, args.length)
    mask[1, args.length // 2:] = 0
    advantages = torch.randn(rows, generator=gen)

    reference = compute_thr(hidden.double(), ids, mask, weight.double(), advantages, args.group_size,
                            token_logprobs=exact_logprobs)
    reference_weights = weights_of(reference, advantages, mask, args.group_size)
    logprobs = trainer_logprobs(hidden.reshape(-1, args.hidden), weight, ids.reshape(-1)).view(rows, args.length)
    bf16 = torch.bfloat16
    variants = {
        "as stored (float32), trainer normaliser [thr_log_normaliser='trainer']": (hidden, weight, logprobs),
        "rounded like the trainer (bf16), trainer normaliser": (
            hidden.to(bf16), weight.to(bf16), logprobs),
        "rounded like the trainer (bf16), exact normaliser": (hidden.to(bf16), weight.to(bf16), None),
        "as stored (float32), exact normaliser [thr_log_normaliser='exact']": (hidden, weight, None),
    }
    counted = mask.bool()
    results = {"config": vars(args), "trainer_logprob_error_nats": {
        "mean": float((logprobs.double() - exact_logprobs).abs()[counted].mean()),
        "max": float((logprobs.double() - exact_logprobs).abs()[counted].max())}, "variants": {}}
    for name, (h, w, lp) in variants.items():
        call = functools.partial(compute_thr, h, ids, mask, w, advantages, args.group_size, token_logprobs=lp)
        thr, seconds = measure.clocked(call, hidden.device)
        error = float((thr.double() - reference).norm() / reference.norm())
        flipped = weights_of(thr, advantages, mask, args.group_size) != reference_weights
        flips = float(flipped[counted].float().mean())
        results["variants"][name] = {"thr_relative_l2": error, "weights_flipped": flips, "seconds": seconds}

    print(f"trainer log-prob error vs float64 (nats): mean {results['trainer_logprob_error_nats']['mean']:.4f}, "
          f"max {results['trainer_logprob_error_nats']['max']:.4f}")
    print(f"{'THR from':<84} {'rel. L2':>9} {'flipped':>9} {'seconds':>8}")
    for name, row in results["variants"].items():
        print(f"{name:<84} {row['thr_relative_l2']:>9.2e} {row['weights_flipped']:>9.2%} {row['seconds']:>8.2f}")
    if args.out:
        write_json_atomically(args.out, results, indent=2)


if __name__ == "__main__":
    main()
