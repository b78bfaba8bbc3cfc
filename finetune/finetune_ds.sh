#!/bin/sh
# Full fine-tuning with DeepSpeed ZeRO-3 on one or more nodes, in bf16.
#   sh finetune/finetune_ds.sh [-m MODEL] -d DATA.json [-o OUTPUT] [--deepspeed CONFIG] [-- finetune.py flags]
# `-h` lists the options and the environment variables for several GPUs and nodes.
. "$(dirname "$0")/common.sh"
DEFAULT_MODEL="Qwen/Qwen-7B"
DEFAULT_DS_CONFIG="$HERE/ds_config_zero3.json"
LAUNCHER=torchrun
MODE_FLAGS="--bf16 True --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 1e-5"
run_finetune "$@"
