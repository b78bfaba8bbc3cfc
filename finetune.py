"""Fine-tune a Qwen checkpoint on conversations: full, LoRA or Q-LoRA, on transformers' Trainer (DeepSpeed optional).

    python finetune.py --model_name_or_path Qwen-7B-Chat --data_path data.json --output_dir out \\
        [--use_lora] [--q_lora] [--bf16 True] [--model_max_length 2048] [--gradient_checkpointing] ...

Every TrainingArguments option works as in transformers, plus --overwrite_output_dir (without it, an --output_dir that
already holds a model is refused) and the flags of the original script that transformers has since dropped or renamed
(--cache_dir, --warmup_ratio, --evaluation_strategy). --bf16 True on a machine without any GPU trains on the CPU. The
data format, the label masks (--label_mask) and the choice between a base and a chat model (read from the checkpoint's
generation_config.json) are in `qwen/sft.py` and `qwen/lora.py`; `finetune/*.sh` are the launch scripts for one or
many GPUs (or the CPU).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

# First, before transformers' Trainer is imported: importing qwen quiets the start-up messages of third-party packages
# (qwen/_quiet.py), which importing Trainer would otherwise print.
import qwen  # noqa: F401  # isort: skip
import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qwen import QWenLMHeadModel, QWenTokenizer
from qwen.checkpoint_folder import (
    LoadError, copy_checkpoint_metadata, is_demo_checkpoint, model_files_in, resolve_checkpoint,
)
from qwen.lora import LoraSettings, is_chat_checkpoint, prepare_lora_model
from qwen.sft import (
    DEFAULT_LABEL_MASK, ConversationDataset, DataError, LabelMask, PadToLongest, load_samples, trained_turns,
)

logger = logging.getLogger("finetune")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen-7B", metadata={"help": "checkpoint folder or hub id"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "training conversations (JSON list or JSON Lines)"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation conversations, same format"})
    lazy_preprocess: bool = field(default=False, metadata={"help": "tokenize each sample when it is read"})
    label_mask: LabelMask = field(
        default=DEFAULT_LABEL_MASK,
        metadata={"help": "the tokens the loss is computed on. original (the default, as the original finetune.py): "
                          "each assistant reply, and the <|im_start|>, <|im_end|> and closing newline of every turn "
                          "(system and user turns included); role names and system and user text are masked. "
                          "assistant_only: each assistant reply and its <|im_end|>, nothing else."},
    )


class UsageError(ValueError):
    """Command-line options that cannot work together or here; the message says what to change."""


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=8192, metadata={"help": "samples are cut to this many tokens"})
    # The original script's default; transformers 5 would pick adamw_torch_fused.
    optim: str = field(default="adamw_torch", metadata={"help": "the optimizer, one of transformers' OptimizerNames"})
    use_lora: bool = False
    cache_dir: str | None = field(
        default=None, metadata={"help": "where a hub id given as --model_name_or_path is downloaded to (default: the "
                                        "Hugging Face cache)"},
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "warmup as a fraction of all steps, as the original scripts say it (transformers 5 folded "
                          "it into --warmup_steps, which takes a fraction below 1 as a ratio)"},
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "the original scripts' name of --eval_strategy (renamed by transformers)"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the model already saved in --output_dir (else the run refuses)"},
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise UsageError("Give --warmup_ratio or --warmup_steps, not both.")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            if self.eval_strategy not in ("no", self.evaluation_strategy):
                raise UsageError("Give --evaluation_strategy or --eval_strategy, not both.")
            self.eval_strategy = self.evaluation_strategy
        bf16 = self.bf16 or self.bf16_full_eval
        if bf16 and not self.use_cpu and not transformers.utils.is_torch_bf16_gpu_available():
            if torch.accelerator.is_available():
                raise UsageError(
                    "--bf16 True needs a GPU with bf16 support (NVIDIA Ampere or newer); on this one train with "
                    "--fp16 True, or on the CPU with --use_cpu True."
                )
            # No GPU at all: bf16 runs on the CPU (the launchers pass --bf16 True), which transformers only allows
            # with --use_cpu. Without it, its check stops the run with a traceback that suggests nothing else.
            self.use_cpu = True
            print("No GPU found: training on the CPU (as with --use_cpu True).", file=sys.stderr, flush=True)
        super().__post_init__()


@dataclass
class LoraArguments:
    """The original script's LoRA flags; their defaults are `qwen.lora.LoraSettings`'s."""

    lora_r: int = LoraSettings.r
    lora_alpha: int = LoraSettings.alpha
    lora_dropout: float = LoraSettings.dropout
    lora_target_modules: list[str] = field(default_factory=lambda: LoraSettings().target_modules)
    lora_weight_path: str = field(default="", metadata={"help": "start from this adapter instead of a new one"})
    lora_bias: str = field(default=LoraSettings.bias, metadata={"help": "none, all or lora_only"})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on 4-bit weights: a GPTQ Int4 folder as it is, "
                                                          "a 16-bit one loaded in NF4 by bitsandbytes"})
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "fully trained modules besides the adapter; default: wte lm_head for a base model (so "
                          "that special tokens it never saw get embeddings), none for a chat model or under Q-LoRA"},
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def trains_on_cpu(args: TrainingArguments) -> bool:
    return args.use_cpu or not torch.cuda.is_available()


def quantized_device_map(on_cpu: bool) -> dict[str, str] | None:
    """Where a 4-bit (Q-LoRA) load goes: the CPU when training there (`trains_on_cpu`), since bitsandbytes would
    otherwise put it on a visible GPU even under --use_cpu; on a GPU, None keeps transformers' choice (the process's
    current GPU)."""
    return {"": "cpu"} if on_cpu else None


def weights_dtype(args: TrainingArguments, use_lora: bool) -> torch.dtype:
    """The precision the checkpoint is loaded in for training.

    bf16 loads the weights in bf16, as the original script did (bf16 needs no loss scaling). fp16 is mixed
    precision: Trainer's gradient scaler refuses fp16 parameters, so fully trained weights stay fp32 and only a
    frozen LoRA base is loaded in fp16 (`prepare_lora_model` keeps whatever trains in fp32).
    """
    if args.fp16 and trains_on_cpu(args):
        raise LoadError("--fp16 needs a CUDA GPU; on the CPU train with --bf16 True or in fp32 (neither flag).")
    if args.bf16:
        return torch.bfloat16
    if args.fp16 and use_lora:
        return torch.float16
    return torch.float32


def start_deepspeed_on_cpu(args: TrainingArguments) -> None:
    """Start DeepSpeed's process group with gloo before the model is built, when DeepSpeed trains on the CPU.

    Under ZeRO-3, `from_pretrained` partitions the weights over the ranks as it loads them (`deepspeed.zero.Init`),
    and asks DeepSpeed's own communication layer for the world size. On a GPU, accelerate starts that layer when the
    training arguments pick the device; with --use_cpu it starts a plain torch gloo group instead, so every rank
    believes it is alone and DeepSpeed's batch-size check fails. Left to itself DeepSpeed would pick oneCCL on the
    CPU, which does not install for current torch; gloo comes with it.
    """
    if not args.deepspeed or not trains_on_cpu(args):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def end_distributed() -> None:
    """Close the process group once training and saving are done.

    Left open, gloo's threads are torn down by the interpreter at exit in no fixed order, and a rank sometimes
    aborts ("terminate called without an active exception") after a run that succeeded. The barrier first: a rank
    that tore its group down while rank 0 was still saving aborted the same way (once in about six two-rank ZeRO-3
    LoRA runs).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    try:
        train(*parse_args(argv))
    except (DataError, LoadError, UsageError) as error:  # what the user can fix: one line, no traceback
        raise SystemExit(f"error: {error}") from None


def check_output_dir(args: TrainingArguments) -> None:
    """Refuse to write over a model already saved in --output_dir unless --overwrite_output_dir says so.

    Trainer's own checkpoint-N folders inside it do not count: resuming from them works as before.
    """
    found = model_files_in(args.output_dir)
    if found and not args.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {args.output_dir} already holds a model ({', '.join(found[:3])}). Choose another folder, "
            "or pass --overwrite_output_dir True to replace it."
        )


def checkpoint_folder(name: str, cache_dir: str | None) -> Path:
    """The folder --model_name_or_path names. With --cache_dir, a hub id is downloaded into that folder instead of the
    Hugging Face cache, as the original script's `from_pretrained(..., cache_dir=...)` did."""
    if cache_dir is None or Path(name).expanduser().exists() or is_demo_checkpoint(name):
        return resolve_checkpoint(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        fetched = snapshot_download(name, cache_dir=cache_dir)
    except HFValidationError:
        return resolve_checkpoint(name)  # not a hub id but a missing folder: resolve_checkpoint's message names it
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else "no details"
        raise LoadError(
            f"{name!r} is not a local folder, and it could not be fetched from the Hugging Face hub into --cache_dir "
            f"{cache_dir} ({type(error).__name__}: {reason}). Check the spelling, or download the checkpoint where "
            "there is internet and pass its folder as --model_name_or_path."
        ) from error
    return resolve_checkpoint(fetched)


# Left-out samples reported one line each, up to this many; a big file with many of them would bury everything else.
LEFT_OUT_LINES = 10


def conversation_dataset(samples: list[dict], tokenizer: QWenTokenizer, flag: str, path: str, max_length: int,
                         lazy: bool, report: bool, label_mask: LabelMask = DEFAULT_LABEL_MASK) -> ConversationDataset:
    """The dataset of one data file; samples cut down to no label at all are reported (on the main process) and
    left out, and a file left with none stops the run. How many samples open with an assistant turn, which is not
    trained on (`qwen.sft.trained_turns`), is said in one line."""
    dataset = ConversationDataset(samples, tokenizer, max_length, lazy=lazy, label_mask=label_mask)
    if report:
        opening = sum(len(trained_turns(sample)) < len(sample["conversations"]) for sample in samples)
        if opening:
            print(f"note: {path}: {opening} of {len(samples)} samples open with an assistant turn; as in the original "
                  "finetune.py, that turn is left out and training starts at the turn after it.", file=sys.stderr)
        for sample in dataset.left_out[:LEFT_OUT_LINES]:
            print(f"warning: {path}: {sample.name} is {sample.length} tokens long and its first label is at token "
                  f"{sample.first_label}, beyond --model_max_length {max_length}: every label is cut off, so it is "
                  "left out.", file=sys.stderr)
        if len(dataset.left_out) > LEFT_OUT_LINES:
            print(f"warning: {path}: {len(dataset.left_out) - LEFT_OUT_LINES} more samples like these are left out "
                  f"({len(dataset.left_out)} of {len(samples)} in all).", file=sys.stderr)
    if not len(dataset):
        earliest = min(sample.first_label for sample in dataset.left_out)
        raise DataError(
            f"{flag} {path}: every sample's first label is beyond --model_max_length {max_length} (the earliest at "
            f"token {earliest}), so nothing is left to learn from; raise --model_max_length above {earliest}."
        )
    return dataset


class CheckpointMetadata(TrainerCallback):
    """Give every checkpoint-N folder what the final folder gets from the base (`copy_checkpoint_metadata`): the
    tokenizer files, and for full fine-tuning the generation config and model code. The original script handed its
    Trainer the tokenizer, which saved it into each checkpoint, so that a checkpoint loaded on its own."""

    def __init__(self, base: Path, full: bool) -> None:
        self.base = base
        self.full = full

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            copy_checkpoint_metadata(self.base, folder, full=self.full)
        return control


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          lora_args: LoraArguments) -> None:
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    check_output_dir(training_args)
    folder = checkpoint_folder(model_args.model_name_or_path, training_args.cache_dir)
    use_lora = training_args.use_lora or lora_args.q_lora
    chat = is_chat_checkpoint(folder)

    # The data are read and checked before the model is loaded, so that a problem with them stops the run at once.
    tokenizer = QWenTokenizer.from_pretrained(folder, model_max_length=training_args.model_max_length)
    max_length = training_args.model_max_length
    main_process = training_args.process_index == 0
    train_dataset = conversation_dataset(
        load_samples(data_args.data_path), tokenizer, "--data_path", data_args.data_path, max_length,
        data_args.lazy_preprocess, report=main_process, label_mask=data_args.label_mask,
    )
    eval_dataset = conversation_dataset(
        load_samples(data_args.eval_data_path), tokenizer, "--eval_data_path", data_args.eval_data_path, max_length,
        data_args.lazy_preprocess, report=main_process, label_mask=data_args.label_mask,
    ) if data_args.eval_data_path else None

    if trains_on_cpu(training_args):
        # Adam's updates shrink into denormal floats late in a run, and x86 CPUs compute on those 10-20x slower;
        # flushing them to zero changes nothing a model can notice.
        torch.set_flush_denormal(True)
    start_deepspeed_on_cpu(training_args)
    settings = LoraSettings(
        r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout,
        target_modules=list(lora_args.lora_target_modules), bias=lora_args.lora_bias,
        modules_to_save=lora_args.lora_modules_to_save, weight_path=lora_args.lora_weight_path or None,
        q_lora=lora_args.q_lora,
    )
    # New LoRA weights are drawn from torch's generator, which torch seeds differently in every process: without
    # this, --seed would not make a LoRA run repeatable (Trainer seeds only after the model exists).
    transformers.set_seed(training_args.seed)
    if use_lora:
        model = prepare_lora_model(folder, settings, dtype=weights_dtype(training_args, use_lora=True), chat=chat,
                                   gradient_checkpointing=training_args.gradient_checkpointing,
                                   quantized_device_map=quantized_device_map(trains_on_cpu(training_args)))
        if main_process:
            model.print_trainable_parameters()
    else:
        model = QWenLMHeadModel.from_pretrained(folder, dtype=weights_dtype(training_args, use_lora=False))
    model.config.use_cache = False

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PadToLongest(pad_token_id=tokenizer.eod_id),
        callbacks=[CheckpointMetadata(folder, full=not use_lora)],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    # LoRA: the adapter (and any modules_to_save) only. Full: a complete folder, gathered under ZeRO-3 by Trainer.
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        copy_checkpoint_metadata(folder, Path(training_args.output_dir), full=not use_lora)
        logger.info("saved %s to %s", "the adapter" if use_lora else "the model", training_args.output_dir)
    end_distributed()


if __name__ == "__main__":
    main()
