#!/bin/sh
# Q-LoRA on one GPU without DeepSpeed, in fp16 (`-h` lists the options). MODEL is a GPTQ Int4 checkpoint (the
# default, as in the original) or a 16-bit one, loaded in 4-bit NF4 with bitsandbytes.
. "$(dirname "$0")/common.sh"
DEFAULT_MODEL="Qwen/Qwen-7B-Chat-Int4"
DEFAULT_DS_CONFIG=""
LAUNCHER=python
MODE_FLAGS="--use_lora --q_lora --fp16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8
    --learning_rate 3e-4"
run_finetune "$@"
