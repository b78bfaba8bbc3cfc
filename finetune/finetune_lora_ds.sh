#!/bin/sh
# LoRA with DeepSpeed ZeRO-2 on one or more nodes, in bf16 (`-h` lists the options).
. "$(dirname "$0")/common.sh"
DEFAULT_MODEL="Qwen/Qwen-7B"
DEFAULT_DS_CONFIG="$HERE/ds_config_zero2.json"
LAUNCHER=torchrun
MODE_FLAGS="--use_lora --bf16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8
    --learning_rate 3e-4"
run_finetune "$@"
