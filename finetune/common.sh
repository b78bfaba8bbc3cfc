# Shared by the finetune/*.sh launchers: options, common training flags and torchrun's distributed arguments.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: $0 -m MODEL -d DATA [-o OUTPUT_DIR] [--deepspeed CONFIG.json] [-- more finetune.py flags]" >&2
    exit 2
}

parse_common_args() {
    MODEL="Qwen/Qwen-7B"
    DATA=""
    OUTPUT="output_qwen"
    EXTRA_ARGS=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -m|--model) MODEL="$2"; shift 2 ;;
            -d|--data) DATA="$2"; shift 2 ;;
            -o|--output) OUTPUT="$2"; shift 2 ;;
            --deepspeed) DS_CONFIG="$2"; shift 2 ;;
            -h|--help) usage ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            *) echo "unknown option: $1" >&2; usage ;;
        esac
    done
    [[ -n "$DATA" ]] || { echo "-d DATA is required (a JSON or JSON Lines file of conversations)" >&2; usage; }

    if [[ -z "${GPUS_PER_NODE:-}" ]]; then
        GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
    fi
    # What every launcher passes; each adds its mode, precision, batch and learning rate, then the user's flags
    # (given last, so they win).
    TRAINING_ARGS=(
        --model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT"
        --num_train_epochs 5 --save_strategy steps --save_steps 1000 --save_total_limit 10 --weight_decay 0.1
        --adam_beta2 0.95 --warmup_ratio 0.01 --lr_scheduler_type cosine --logging_steps 1 --report_to none
        --model_max_length 512 --gradient_checkpointing True --lazy_preprocess True
    )
    DISTRIBUTED_ARGS=(
        --nproc_per_node "$GPUS_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
        --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-6001}"
    )
}
