#!/bin/sh
# Q-LoRA (LoRA over 4-bit weights) with DeepSpeed ZeRO-2 on one or more nodes, in fp16 (`-h` lists the options).
# MODEL is a GPTQ Int4 checkpoint, used as it is (the default, as in the original), or a 16-bit one, which is loaded in
# 4-bit NF4 with bitsandbytes.
. "$(dirname "$0")/common.sh"
DEFAULT_MODEL="Qwen/Qwen-7B-Chat-Int4"
DEFAULT_DS_CONFIG="$HERE/ds_config_zero2.json"
LAUNCHER=torchrun
MODE_FLAGS="--use_lora --q_lora --fp16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8
    --learning_rate 3e-4"
run_finetune "$@"
