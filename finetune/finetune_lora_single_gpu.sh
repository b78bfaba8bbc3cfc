#!/bin/sh
# LoRA on one GPU without DeepSpeed, in bf16 (`-h` lists the options).
. "$(dirname "$0")/common.sh"
DEFAULT_MODEL="Qwen/Qwen-7B"
DEFAULT_DS_CONFIG=""
LAUNCHER=python
MODE_FLAGS="--use_lora --bf16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8
    --learning_rate 3e-4"
run_finetune "$@"
