"""LoRA training speed of the `qwen` model against transformers' own Qwen2 on the same weights.

    python bench/bench_finetune.py           # three alternating rounds per implementation (a few minutes on 2 cores)
    python bench/bench_finetune.py --quick   # one round, shorter sequences: a smoke run

Both sides train the same random mid-size checkpoint (hidden 1024, 8 layers, the real 151,936-token vocabulary)
with peft LoRA (r 64, alpha 16, as `finetune/` uses) on every linear layer of the blocks: `c_attn c_proj w1 w2` here,
`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj` in Qwen2 (our fused `c_attn` is their three projections).
One step is forward with labels, backward and an AdamW update on the adapters, as Trainer does without its
bookkeeping. Each timing runs in a fresh subprocess, the two implementations alternating; the median is reported.
Ratios above 1 mean ours is faster (or, for memory, smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench_core import IMPLEMENTATIONS, load, prompt_ids

from qwen.checkpoint import write_random_checkpoint

TARGET_MODULES = {
    "qwen": ["c_attn", "c_proj", "w1", "w2"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def worker(implementation: str, folder: str, quick: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load(implementation, folder).train()
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=TARGET_MODULES[implementation],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = prompt_ids(2, 64 if quick else 256, model.config.vocab_size)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocator, thread pool, optimizer state
    seconds = []
    losses = []
    for _ in range(2 if quick else 4):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    return {
        "tokens_per_s": ids.numel() / statistics.median(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
    }


def run_worker(implementation: str, folder: str, quick: bool) -> dict:
    command = [sys.executable, __file__, "--worker", implementation, folder] + (["--quick"] if quick else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {implementation} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_table(folder: str, quick: bool, rounds: int) -> list[str]:
    samples: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    peak = {name: 0.0 for name in IMPLEMENTATIONS}
    first_losses = {}
    for round_index in range(rounds):
        order = IMPLEMENTATIONS if round_index % 2 == 0 else IMPLEMENTATIONS[::-1]
        for name in order:
            result = run_worker(name, folder, quick)
            samples[name].append(result["tokens_per_s"])
            peak[name] = max(peak[name], result["peak_rss_mib"])
            first_losses[name] = result["losses"][0]
    # Same weights and data: the losses must agree before the speeds mean anything (the LoRA initialisations differ
    # in layout, and B starts at zero, so the first timed step's loss moved by one update only).
    if abs(first_losses["qwen"] - first_losses["qwen2"]) > 0.05 * abs(first_losses["qwen"]):
        raise SystemExit(f"The two implementations train differently (losses {first_losses}); timings would be moot.")
    ours, theirs = (statistics.median(samples[name]) for name in IMPLEMENTATIONS)
    return [
        "| measurement | qwen | transformers Qwen2 | ratio |",
        "|---|---:|---:|---:|",
        f"| LoRA training tokens/s (batch 2 x {64 if quick else 256}) | {ours:.1f} | {theirs:.1f} | "
        f"{ours / theirs:.2f}x |",
        f"| peak RSS, MiB (lower is better) | {peak['qwen']:.0f} | {peak['qwen2']:.0f} | "
        f"{peak['qwen2'] / peak['qwen']:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sequences, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="subprocess rounds per implementation; the median wins")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(*args.worker, quick=args.quick)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32\n")
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(folder, size="mid", chat=True)
        print("\n".join(training_table(folder, args.quick, 1 if args.quick else args.rounds)))


if __name__ == "__main__":
    main()
