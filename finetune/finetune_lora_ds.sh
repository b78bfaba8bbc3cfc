#!/usr/bin/env bash
# LoRA with DeepSpeed ZeRO-2 on one or more nodes (see finetune_ds.sh for the options and environment variables).
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common_args "$@"
DS_CONFIG=${DS_CONFIG:-$HERE/ds_config_zero2.json}

torchrun "${DISTRIBUTED_ARGS[@]}" "$HERE/../finetune.py" "${TRAINING_ARGS[@]}" \
    --use_lora --bf16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 --deepspeed "$DS_CONFIG" \
    "${EXTRA_ARGS[@]}"
