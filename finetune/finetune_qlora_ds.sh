#!/usr/bin/env bash
# Q-LoRA (LoRA on a 4-bit base) with DeepSpeed ZeRO-2 on one or more nodes (see finetune_ds.sh for the options).
# MODEL is a GPTQ Int4 checkpoint (e.g. Qwen-7B-Chat-Int4) or a 16-bit one, which is loaded in NF4 with bitsandbytes.
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_common_args "$@"
DS_CONFIG=${DS_CONFIG:-$HERE/ds_config_zero2.json}

torchrun "${DISTRIBUTED_ARGS[@]}" "$HERE/../finetune.py" \
    --model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT" \
    --fp16 True --num_train_epochs 5 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --save_strategy steps --save_steps 1000 --save_total_limit 10 --learning_rate 3e-4 --weight_decay 0.1 \
    --adam_beta2 0.95 --warmup_ratio 0.01 --lr_scheduler_type cosine --logging_steps 1 --report_to none \
    --model_max_length 512 --gradient_checkpointing True --lazy_preprocess True --use_lora --q_lora \
    --deepspeed "$DS_CONFIG" "${EXTRA_ARGS[@]}"
