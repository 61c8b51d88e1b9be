"""Write examples/notebooks/steering.ipynb (its source lives here so that it is reviewed as code).

    python benchmarks/steering/make_notebook.py
    # saved outputs: benchmarks/steering/dynamics-base (the 0.59 M-parameter base model of docs/science.md's training
    # study, not the SmolLM2 demo model), executed from its committed files without recomputing it
    TRL_THR_STEERING_RESULTS=$PWD/benchmarks/steering/dynamics-base .venv/bin/jupyter execute --inplace \
        examples/notebooks/steering.ipynb   # `jupyter execute` is nbclient's, in the dev extra
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# Does the knob steer? THR arms on your model

`thr_strategy` and `thr_p` reweight each token's advantage by its Token Hidden Reward (THR, [arXiv 2510.03669](https://arxiv.org/abs/2510.03669)): how much updating that token raises (THR > 0) or lowers (THR < 0) the likelihood of the group's correct completions. `positive-amplify` (p > 0) is meant to exploit, `negative-amplify` (p < 0) to explore.

This notebook shows, for one model and dataset:

1. what THR looks like on the model's own samples (`trl-thr analyze`);
2. what **one update** of each arm does, from the same start weights and the same rollouts (`trl-thr analyze --dynamics`): the change of the log-prob of correct and incorrect completions and of the entropy;
3. how to read those numbers before choosing `thr_strategy` and `thr_p` for a run.

By default it runs on `builtin:tiny-qwen2` (a random 2-layer model, offline, seconds) with a reward that varies within groups: the numbers then only show the mechanics. Set `TRL_THR_STEERING_MODEL` to run it on another model, or `TRL_THR_STEERING_RESULTS` to show an existing `trl-thr analyze --dynamics` output directory without recomputing it. The saved outputs show `benchmarks/steering/dynamics-base`: the base model of the training study in [docs/science.md](../../docs/science.md) (a 0.59 M-parameter Qwen2 fine-tuned on arithmetic), on its training split with the strict `accuracy` reward."""),
    new_code_cell("""import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RESULTS = os.environ.get("TRL_THR_STEERING_RESULTS")  # an existing `trl-thr analyze --dynamics` output directory
MODEL = os.environ.get("TRL_THR_STEERING_MODEL", "builtin:tiny-qwen2")

if RESULTS:
    output_dir = Path(RESULTS)
else:
    from trl_thr.cli.commands import analyze

    output_dir = Path(tempfile.mkdtemp()) / "analysis"
    argv = ["--model_name_or_path", MODEL, "--dataset_name", "arithmetic", "--num_samples", "16",
            "--num_prompts", "6", "--num_generations", "8", "--max_new_tokens", "16",
            "--prompt_template", "chat-boxed", "--reward_funcs", "trl_thr.tiny:digit_reward",
            "--dynamics", "true", "--dynamics_lr", "0.05", "--output_dir", str(output_dir)]
    print("trl-thr analyze " + " ".join(argv))
    analyze.main(argv)

analysis = json.loads((output_dir / "thr_analysis.json").read_text())
dynamics = json.loads((output_dir / "dynamics.json").read_text())
config = analysis["config"]
print(f"model: {config['model_name_or_path']}  dataset: {config['dataset_name']}  rewards: {config['reward_funcs']}")
print(f"{dynamics['batches']} batches of {dynamics['config']['groups_per_batch']} group(s) x "
      f"{dynamics['config']['num_generations']} completions; SGD lr {dynamics['config']['lr']}, "
      f"normalize={dynamics['config']['normalize']}, |p| = {dynamics['config']['p']}")"""),
    new_markdown_cell("""## 1. What THR looks like on this model

Over the groups that hold both a correct and an incorrect completion: how many tokens are *dominant* (|THR| above the threshold, the only tokens the THR arms keep), how THR's sign splits between correct and incorrect completions, and whether large |THR| goes with high entropy, i.e. how far THR's choice of tokens is TRL's entropy mask (`top_entropy_quantile`). That depends on the model: on the 0.59 M scratch model of the saved outputs about 90 % of the top 20 % |THR| tokens are top-20 %-entropy tokens, on SmolLM2-135M-Instruct (arithmetic, 71 mixed groups) 37.6 ± 2.7 %, against 20 % by chance (`benchmarks/steering/overlap-smollm2/`)."""),
    new_code_cell("""import pandas as pd

stats = analysis["statistics"]
print(f"positive (correct) fraction of completions: {100 * stats['accuracy']:.1f} %; "
      f"groups with both outcomes: {stats['active_groups']} of {stats['groups']}")
display(pd.Series({f"threshold {k}": v for k, v in stats["dominant_fraction"].items()},
                  name="fraction of tokens kept (dominant)").round(3).to_frame())
display(pd.DataFrame(stats["by_correctness"]).T.round(4))
overlap = stats["entropy_overlap"]
print(f"top {100 * overlap['quantile']:g} % |THR| tokens that are also top-entropy tokens: "
      f"{100 * overlap['overlap_frac']:.1f} % (chance {100 * overlap['chance_frac']:.1f} %)")
if overlap.get("dominant_share") is not None:  # written by trl-thr analyze since both overlaps are reported
    print(f"dominant tokens among the top {100 * overlap['quantile']:g} % by entropy (as thr/entropy_overlap counts "
          f"them): {100 * overlap['dominant_share']:.1f} % (chance {100 * overlap['dominant_chance']:.1f} %)")
for name, entry in overlap.get("per_group", {}).items():
    if entry.get("ci95") is not None:
        print(f"  {name}, mean over {entry['groups']} groups: {100 * entry['mean']:.1f} ± {100 * entry['ci95']:.1f} %")"""),
    new_markdown_cell("""## 2. One step per arm, from the same start

Each arm takes one plain SGD step on the policy-gradient surrogate `-sum(w * A * log p) / N_tokens` with its token weights `w` (the trainer's own `weights_from_config`; GRPO: `w = 1`); the weights are restored between arms. Mean and standard error over batches:"""),
    new_code_cell("""def table(entries, columns):
    return pd.DataFrame({name: {c: entry[c]["mean"] for c in columns} for name, entry in entries.items()}).T

columns = ["dlogp_correct", "dlogp_incorrect", "dentropy", "mean_weight", "grad_norm"]
means = table(dynamics["arms"], columns)
errors = pd.DataFrame({arm: {c: s[c]["se"] for c in columns} for arm, s in dynamics["arms"].items()}).T
display(means.map(lambda v: f"{v:+.3g}") + " ± " + errors.map(lambda v: "-" if v is None else f"{v:.2g}"))"""),
    new_markdown_cell("""Paired differences (arm a − arm b on the same batch), with how many batches have each sign: a difference that has the same sign on nearly every batch is a property of the method on this model, not noise."""),
    new_code_cell("""rows = {}
for pair, metrics in dynamics["pairs"].items():
    rows[pair] = {m: f"{v['mean']:+.3g} ± {v['se'] or 0:.2g} ({v['positive']}+/{v['negative']}-)"
                  for m, v in metrics.items()}
display(pd.DataFrame(rows).T)"""),
    new_code_cell("""from IPython.display import Image

Image(filename=str(output_dir / "dynamics.png"))"""),
    new_markdown_cell("""## 3. How to read this before choosing `thr_strategy` and `thr_p`

- **`mean_weight`** is the fraction of the GRPO gradient's token mass an arm keeps. It does not scale the gradient in proportion: the kept tokens carry most of it. In the entropy-mask study of docs/science.md (section 6, 16 seeds) `dominant-only` had 0.94x GRPO's gradient norm before clipping, and `p` scaled it: 0.48x at `p = -0.5`, 1.39x at `p = +0.5`. Clipping and Adam then flatten most of that, and turning clipping off changed no arm's held-out accuracy, Pass@32 or entropy detectably (section 4): there the step-size effect of `p` did not reach what a run learned. `--dynamics_normalize true` isolates the direction of a step from its size.
- **`dlogp_correct` vs `dlogp_incorrect`**: a GRPO step raises the first and lowers the second. `positive-amplify` weights dominant tokens with THR > 0 (whose update helps the group's correct completions) by `1 + |p|` and those with THR < 0 by `1 - |p|`; `negative-amplify` does the opposite. Relative to `dominant-only`, the first is therefore expected to gain more `dlogp_correct` per step and the second less; the paper links the second to exploration (higher entropy, better Pass@K at large K). The table measures whether that holds on your model.
- **`dentropy`**: a more negative value means the step makes the model more confident on its own samples; the paper's claim is that negative amplification keeps entropy higher.
- If the paired differences flip sign from batch to batch, a one-step study on this model cannot tell the arms apart: measure with more batches, or compare runs over paired seeds (`trl-thr study`: Pass@K and greedy accuracy with 95 % intervals) before trusting a choice."""),
    new_code_cell("""grpo = dynamics["arms"].get("grpo")
for arm, entry in dynamics["arms"].items():
    if arm == "grpo" or grpo is None:
        continue
    weight = entry["mean_weight"]["mean"]
    ratio = entry["dlogp_correct"]["mean"] / grpo["dlogp_correct"]["mean"] if grpo["dlogp_correct"]["mean"] else float("nan")
    print(f"{arm:17s} keeps {100 * weight:5.1f} % of GRPO's token weight; its step moves the correct completions' "
          f"log-prob {ratio:.2f} x as far as GRPO's; entropy change {entry['dentropy']['mean']:+.3g} "
          f"(GRPO {grpo['dentropy']['mean']:+.3g})")"""),
    new_markdown_cell("""## 4. What training studies found (docs/science.md)

One step says which way an arm pushes; only training runs over paired seeds say where it ends up. This project's own studies, at CPU scale (a 0.6 M-parameter model, 200 steps, held-out Pass@K with n = 32), found:

- **On the scratch model, THR's mask is mostly TRL's entropy mask.** 88-98 % of THR's dominant tokens are among the 20 % of tokens with the highest entropy (`thr/entropy_overlap`, logged in every THR run), and `dominant-only` ended within 1.3 points of greedy accuracy and 0.5 of Pass@32 of `top_entropy_quantile 0.2` (16 seeds; 4.0 and 2.5 points would have been seen). That is a property of the toy: on SmolLM2-135M-Instruct, before training, 36.2 ± 3.3 % of THR's dominant tokens and 37.6 ± 2.7 % of its top 20 % by |THR| are top-20 %-entropy tokens (chance 20 %; docs/science.md section 6), so there the two masks pick mostly different tokens, and whether that changes what a run learns is not measured yet.
- **No strategy or `p` differed detectably from GRPO** on greedy accuracy or Pass@32, on arithmetic or on linear equations (16 seeds each). `positive-amplify` minus `negative-amplify` on Pass@32 had the paper's sign on both tasks (-0.7 and -1.8 points) inside intervals that contain 0; a hint on the second task's first 8 seeds (-3.9) did not replicate on 8 more.
- **`p` changes the rare runs**: entropy blow-ups at `p >= 0`, collapses (completions running to the length limit) at `p = -0.5`. The median run hardly moves: its final entropy is 0.12-0.14 in every arm of the main task but `p = -0.5` without clipping (0.09).

The paper's models are three orders of magnitude larger; measure on yours with `trl-thr study` (an `entropy20=thr_strategy:none,top_entropy_quantile:0.2` arm is the baseline to beat)."""),
]


def main():
    notebook = new_notebook(cells=CELLS)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    path = Path(__file__).resolve().parents[2] / "examples" / "notebooks" / "steering.ipynb"
    nbformat.write(notebook, path)
    print(path)


if __name__ == "__main__":
    main()
