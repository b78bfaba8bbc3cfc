"""Quantize a Qwen checkpoint (e.g. your fine-tune) to Int4 GPTQ, in the layout of the released -Int4 models.

    python run_gptq.py --model_name_or_path output_qwen --data_path data.json --out_path output_qwen_int4 \\
        [--bits 4] [--group-size 128] [--max_len 8192]

The calibration data are conversations in the fine-tuning format (finetune.py's --data_path), ideally a few hundred
samples like the data the model will see. The output folder loads like a released -Int4 checkpoint: with
`AutoModelForCausalLM.from_pretrained(out_path, device_map="auto", trust_remote_code=True)` after
`python -m qwen.checkpoint install-code out_path`, or with this repository's classes and scripts (`-c out_path`).
Needs optimum and gptqmodel (pip install -e .[quant]); quantizing runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse

from qwen.gptq import quantize_checkpoint
from qwen.loading import LoadError
from qwen.sft import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="16-bit checkpoint folder or hub id to quantize")
    parser.add_argument("--data_path", required=True, help="calibration conversations (JSON list or JSON Lines)")
    parser.add_argument("--out_path", required=True, help="new folder for the quantized checkpoint")
    parser.add_argument("--max_len", type=int, default=8192, help="calibration samples are cut to this many tokens")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits per weight")
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128,
                        help="input channels sharing one scale and zero point (-1: one group per output channel)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        folder = quantize_checkpoint(args.model_name_or_path, args.data_path, args.out_path, bits=args.bits,
                                     group_size=args.group_size, max_len=args.max_len)
    except (LoadError, DataError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote the {args.bits}-bit GPTQ checkpoint to {folder}")


if __name__ == "__main__":
    main()
