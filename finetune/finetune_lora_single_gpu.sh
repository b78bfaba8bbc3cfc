#!/usr/bin/env bash
# LoRA on one GPU, without DeepSpeed (see finetune_ds.sh for the options).
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common_args "$@"

python "$HERE/../finetune.py" "${TRAINING_ARGS[@]}" \
    --use_lora --bf16 True --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    "${EXTRA_ARGS[@]}"
