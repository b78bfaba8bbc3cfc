#!/usr/bin/env bash
# Full fine-tuning with DeepSpeed ZeRO-3 on one or more nodes.
#   bash finetune/finetune_ds.sh -m MODEL_FOLDER -d DATA.json [-o OUTPUT] [--deepspeed CONFIG] [-- extra finetune.py flags]
# GPUs per node, node count, this node's rank and the master address come from the environment:
#   GPUS_PER_NODE (default: all visible GPUs), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6001)
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common_args "$@"
DS_CONFIG=${DS_CONFIG:-$HERE/ds_config_zero3.json}

torchrun "${DISTRIBUTED_ARGS[@]}" "$HERE/../finetune.py" "${TRAINING_ARGS[@]}" \
    --bf16 True --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 1e-5 \
    --deepspeed "$DS_CONFIG" \
    "${EXTRA_ARGS[@]}"
