#!/usr/bin/env bash
# Q-LoRA (LoRA on a 4-bit base) with DeepSpeed ZeRO-2 on one or more nodes (see finetune_ds.sh for the options).
# MODEL is a 16-bit checkpoint, loaded in 4-bit NF4 with bitsandbytes (GPTQ Int4 checkpoints are not supported yet).
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common_args "$@"
DS_CONFIG=${DS_CONFIG:-$HERE/ds_config_zero2.json}

torchrun "${DISTRIBUTED_ARGS[@]}" "$HERE/../finetune.py" "${TRAINING_ARGS[@]}" \
    --use_lora --q_lora --fp16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 --deepspeed "$DS_CONFIG" \
    "${EXTRA_ARGS[@]}"
