#!/usr/bin/env bash
# Dose-response study (docs/science.md section 3), from a frozen checkout of the package.
cd /tmp/study-src  # a checkout of the commit in study.json (source_commit)
export PYTHONPATH=/tmp/study-src/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
COMMON="--output_dir /tmp/dose/study --model scratch --scratch_hidden 96 --scratch_layers 4 \
  --max_operand 10 --test_problems 256 --sft_steps 1500 --sft_target 0.5 --sft_lr 2e-3 --sft_batch_size 32 \
  --steps 200 --learning_rate 5e-4 --n_samples 32 --k_values $(seq 1 32) \
  --arms grpo amplify:-0.5 amplify:-0.25 amplify:0 amplify:0.25 amplify:0.5"
$PY benchmarks/steering/run_study.py $COMMON --seeds 0 --only_prepare > /tmp/dose/prepare.log 2>&1 || exit 1
$PY benchmarks/steering/run_study.py $COMMON --seeds $(seq 0 15) > /tmp/dose/worker-a.log 2>&1 &
$PY benchmarks/steering/run_study.py $COMMON --seeds $(seq 15 -1 0) > /tmp/dose/worker-b.log 2>&1 &
wait
