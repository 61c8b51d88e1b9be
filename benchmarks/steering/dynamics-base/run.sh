#!/bin/bash
cd /tmp/study-src
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/study-src/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
/work/main/.venv/bin/python -m trl_thr analyze --model_name_or_path /tmp/steering-cpu/base \
  --dataset_name /tmp/steering-cpu/data/train.jsonl --prompt_template chat-boxed-short \
  --num_prompts 40 --num_generations 8 --temperature 1.0 --max_new_tokens 12 \
  --dynamics true --dynamics_batches 12 --dynamics_lr 0.002 --rows_per_forward 8 --output_dir /tmp/dyn-base/out
echo "WALL_SECONDS $(( $(date +%s) - START ))"
