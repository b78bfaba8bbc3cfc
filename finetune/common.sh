# Shared by the finetune/*.sh launchers. Each launcher sets what is its own (DEFAULT_MODEL, DEFAULT_DS_CONFIG,
# LAUNCHER, MODE_FLAGS), sources this file and calls `run_finetune "$@"`.
#
# POSIX sh on purpose: the original README starts the launchers with `sh finetune/X.sh`, and /bin/sh is dash on Debian
# and Ubuntu. Re-running under bash instead would fail where bash is missing (slim and Alpine images); plain sh needs
# nothing. Without arrays, the argument list for finetune.py is built in the positional parameters ("$@"), and the
# fixed flag lists are split at spaces (their words hold no spaces; -f below keeps them from being globbed). The
# values a user gives (paths, the flags after --) are never split.

set -euf

HERE=$(cd "$(dirname "$0")" && pwd)

# Passed by every launcher before its own MODE_FLAGS, which come before the user's flags (the last value wins).
TRAINING_FLAGS="--num_train_epochs 5 --per_device_eval_batch_size 1 --save_strategy steps --save_steps 1000
    --save_total_limit 10 --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 --lr_scheduler_type cosine
    --logging_steps 1 --report_to none --model_max_length 512 --gradient_checkpointing True --lazy_preprocess True"

usage() {
    shown_ds_config=${DEFAULT_DS_CONFIG#"$PWD/"}
    cat <<USAGE
usage: sh $0 [-m MODEL] -d DATA [-o OUTPUT_DIR] [--deepspeed CONFIG.json] [-- finetune.py flags]

  -m, --model MODEL     checkpoint folder or hub id (default: $DEFAULT_MODEL)
  -d, --data DATA       training conversations: a JSON list or a JSON Lines file (required)
  -o, --output DIR      where the trained model or adapter is saved (default: output_qwen)
  --deepspeed CONFIG    DeepSpeed config file (default: ${shown_ds_config:-none})
  -h, --help            show this help
  -- FLAGS...           passed on to finetune.py after this launcher's own flags, so they win
USAGE
    if [ "$LAUNCHER" = torchrun ]; then
        cat <<USAGE

Started with torchrun; set in the environment for several GPUs or nodes: GPUS_PER_NODE (default: every visible
GPU), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (6001).
USAGE
    else
        cat <<USAGE

Started with python on one GPU: CUDA_VISIBLE_DEVICES (default: 0, the first GPU) chooses which.
USAGE
    fi
}

usage_error() {
    echo "$0: $1; -h lists the options" >&2
    exit 2
}

run_finetune() {
    model=$DEFAULT_MODEL
    data=""
    output=output_qwen
    ds_config=$DEFAULT_DS_CONFIG
    while [ $# -gt 0 ]; do
        case $1 in
            -h|--help) usage; exit 0 ;;
            --) shift; break ;;
            -m|--model|-d|--data|-o|--output|--deepspeed)
                [ $# -ge 2 ] || usage_error "$1 needs a value"
                case $1 in
                    -m|--model) model=$2 ;;
                    -d|--data) data=$2 ;;
                    -o|--output) output=$2 ;;
                    --deepspeed) ds_config=$2 ;;
                esac
                shift 2 ;;
            *) usage_error "unknown option $1 (finetune.py's own flags go after --)" ;;
        esac
    done
    [ -n "$data" ] || usage_error "-d DATA is required (a JSON or JSON Lines file of conversations)"

    # Now "$@" holds the user's flags; put the rest in front of them.
    if [ -n "$ds_config" ]; then
        set -- --deepspeed "$ds_config" "$@"
    fi
    # shellcheck disable=SC2086  # the flag lists are meant to split into words
    set -- "$HERE/../finetune.py" --model_name_or_path "$model" --data_path "$data" --output_dir "$output" \
        $TRAINING_FLAGS $MODE_FLAGS "$@"

    if [ "$LAUNCHER" = torchrun ]; then
        if [ -z "${GPUS_PER_NODE:-}" ]; then
            GPUS_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
        fi
        exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
            --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-6001}" "$@"
    fi
    # One process on one GPU: with several visible, Trainer would spread the batch over all of them (DataParallel).
    # An explicit choice, including an empty one (the CPU), is kept.
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
    export CUDA_VISIBLE_DEVICES
    exec python "$@"
}
