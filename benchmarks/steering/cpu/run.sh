#!/bin/bash
cd /tmp/study-src
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/study-src/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="--output_dir /tmp/steering-cpu --model scratch --scratch_hidden 96 --scratch_layers 4 --max_operand 10 --sft_steps 1500 --sft_target 0.5 --sft_lr 2e-3 --sft_batch_size 32 --steps 60 --learning_rate 3e-4 --seeds $SEEDS"
/work/main/.venv/bin/python benchmarks/steering/run_study.py $COMMON --arms grpo positive-amplify negative-amplify
/work/main/.venv/bin/python benchmarks/steering/run_study.py $COMMON --arms grpo positive-amplify negative-amplify dominant-only
echo STUDY_DONE
