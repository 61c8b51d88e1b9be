#!/usr/bin/env bash
# The measurements of benchmarks/steering/overlap-smollm2/README.md: `trl-thr analyze` on the demo model
# (SmolLM2-135M-Instruct) and, for comparison with the same code, on a committed 0.59 M scratch base; both
# THR-versus-entropy overlaps, pooled and with 95 % intervals over groups. Run from the repository root:
#   bash benchmarks/steering/overlap-smollm2/run.sh            # both (about 20 minutes on 2 shared CPU cores)
#   bash benchmarks/steering/overlap-smollm2/run.sh scratch    # the scratch base only (seconds)
# One thread: on a 2-core machine shared with other work, 2 threads were 5-10x slower per prompt.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
out=benchmarks/steering/overlap-smollm2
if [ "${1:-all}" != scratch ]; then
  time .venv/bin/trl-thr analyze --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \
      --dataset_name arithmetic --arithmetic_max_operand 10 --num_samples 256 \
      --prompt_template chat-boxed-short --lenient true \
      --num_prompts 80 --num_generations 8 --max_new_tokens 64 --temperature 0.7 --seed 0 \
      --output_dir "$out"
fi
# The main task's scratch base of docs/science.md section 6 (the second one, committed) on its training split,
# sampled as in training (temperature 1, 12 tokens, strict accuracy).
time .venv/bin/trl-thr analyze --model_name_or_path benchmarks/steering/entropy-mask/seeds-13-15/base \
    --dataset_name benchmarks/steering/dose/data/train.jsonl --prompt_template chat-boxed-short \
    --num_prompts 64 --num_generations 8 --max_new_tokens 12 --temperature 1.0 --seed 0 \
    --output_dir "$out/scratch-base"
