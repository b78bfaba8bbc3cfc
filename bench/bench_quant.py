"""Memory and decode speed of FP32 and BF16 against Int4 GPTQ weights and the int8 KV cache, on the CPU.

    python bench/bench_quant.py            # full run: quantizes, then times every variant (15 to 30 minutes, 2 cores)
    python bench/bench_quant.py --quick    # shorter context and fewer tokens, for a smoke run
    python bench/bench_quant.py --threads 1   # one thread per worker: steadier on a machine other jobs share

One random mid-size checkpoint (hidden 1024, 8 layers, 16 heads of 64, the real 151,936-token vocabulary) is written
with `qwen.checkpoint` and quantized to Int4 by `run_gptq.py` in the same run, with chat conversations as calibration
data; group size 64, since this model's MLP width (2752) is not a multiple of the released 128. Each variant is then
loaded and timed in a fresh subprocess, so that its peak RSS is its own; ratios compare it with FP32 measured in the
same run.

Columns: weights = bytes of every parameter and buffer once loaded (GPTQ's packed codes, scales and zero points are
buffers); KV cache = bytes the cache holds after the prompt (512 tokens) and 32 generated ones; peak RSS = the worker
process's high-water mark, loading included (a BF16 load of this FP32 folder converts, so it peaks above FP32);
decode = greedy tokens per second at batch 1 after the prompt, one token per forward through the cache, the fastest
of 64 steps (other processes on a shared machine only slow steps down), the median over rounds and their range,
which says how far to trust a difference; logits = relative L2 distance from FP32 of the logits of 16 positions
decoded through each variant's cache.
Random weights: speed and memory are those of the real architecture at this size, but the logits distance says only
how far each variant moves the numbers. A random model has nothing to protect from 4-bit rounding (each layer's
output moves ~10%, and eight layers compound it), so its Int4 distance is far above a trained model's, whose
benchmark scores move by about a point (the original's published table).
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen.checkpoint import write_random_checkpoint  # noqa: E402
from qwen.modeling_qwen import QWenLMHeadModel, new_kv_cache  # noqa: E402

# name -> (folder: "float" or "int4", activation dtype, int8 KV cache)
VARIANTS: dict[str, tuple[str, torch.dtype, bool]] = {
    "FP32": ("float", torch.float32, False),
    "BF16": ("float", torch.bfloat16, False),
    "Int4 GPTQ, fp32 activations": ("int4", torch.float32, False),
    "Int4 GPTQ, bf16 activations": ("int4", torch.bfloat16, False),
    "FP32 + int8 KV cache": ("float", torch.float32, True),
    "BF16 + int8 KV cache": ("float", torch.bfloat16, True),
    "Int4 GPTQ (bf16) + int8 KV cache": ("int4", torch.bfloat16, True),
}
BASELINE = "FP32"
CALIBRATION_TOPICS = ["the weather", "cooking rice", "prime numbers", "a trip to Paris", "learning Python", "tea",
                      "chess", "the moon", "writing letters", "bicycles", "gardening", "music theory", "rivers",
                      "the history of paper", "sleep", "volcanoes"]


def scratch_env(root: Path) -> dict[str, str]:
    """gptqmodel writes caches, logs and temporary files under these: keep them in the run's own folder."""
    env = {"HF_HOME": str(root / "hf"), "TMPDIR": str(root / "tmp"), "HF_HUB_OFFLINE": "1",
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(root / "ext"), "PYTHONPATH": str(REPO)}
    (root / "tmp").mkdir(exist_ok=True)
    return {**os.environ, **env}


# ---------------------------------------------------------------------------------------------------------------------
# One variant (run inside a worker subprocess)


def prompt_ids(length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1234))


def decode_step_seconds(model: QWenLMHeadModel, ids: torch.Tensor, new_tokens: int) -> tuple[float, object]:
    """Prefill `ids`, then decode greedily one token per forward through the cache; the fastest step's time.

    The steps are what generate() runs per token (one forward of one token, an argmax). Other processes on a shared
    machine only ever slow a step down, so the fastest of them is the one that measures the model, as bench_core.py
    takes the best of its repeats; the cache grows by 32 tokens over 544, which changes a step by well under 1%.
    """
    cache = new_kv_cache(model.config)  # int8 when the variant sets use_cache_quantization
    token = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)  # (1, 1)
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return min(times), cache


def unique_bytes(tensors) -> int:
    """Bytes of distinct storages (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in tensors:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def worker(variant: str, folders: dict[str, str], quick: bool, logits_path: str) -> dict:
    torch.manual_seed(0)
    folder, dtype, int8_cache = VARIANTS[variant]
    model = QWenLMHeadModel.from_pretrained(folders[folder], device_map="cpu", dtype=dtype,
                                            use_cache_quantization=int8_cache).eval()
    weights = unique_bytes(list(model.parameters()) + list(model.buffers()))
    vocab = model.config.vocab_size
    ids = prompt_ids(128 if quick else 512, vocab)
    new_tokens = 8 if quick else 32
    decode_step_seconds(model, ids[:, :16], 4)  # warm-up: allocator, thread pool, gptqmodel's kernel repacking
    seconds, cache = min((decode_step_seconds(model, ids, new_tokens) for _ in range(2)), key=lambda r: r[0])
    # The logits of the last 16 positions of a fixed sequence, each decoded through this variant's cache.
    sequence = prompt_ids(96, vocab)
    replay = new_kv_cache(model.config)
    model(sequence[:, :80], cache=replay, use_cache=True)
    logits = torch.cat([model(sequence[:, i:i + 1], cache=replay, use_cache=True).logits for i in range(80, 96)], 1)
    torch.save(logits.float(), logits_path)
    return {
        "decode_tokens_per_s": 1 / seconds,
        "weights_mib": weights / 2**20,
        "kv_cache_mib": cache_bytes(cache) / 2**20,
        "kv_cache_tokens": cache.get_seq_length(),
        "kv_cache_type": type(cache).__name__,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_worker(variant: str, folders: dict[str, str], quick: bool, threads: int, logits_path: Path,
               env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--worker", variant, json.dumps(folders), str(logits_path), "--threads",
               str(threads)]
    result = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {variant!r} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# The run


def quantize(source: Path, root: Path, env: dict[str, str]) -> tuple[Path, float]:
    calibration = root / "calibration.json"
    samples = [{"id": f"c{i}", "conversations": [
        {"from": "user", "value": f"Tell me something about {topic}."},
        {"from": "assistant", "value": f"Here is something about {topic}: many people find it interesting, and "
                                       f"there is always more to learn about {topic} if you look closely."}]}
               for i, topic in enumerate(CALIBRATION_TOPICS)]
    calibration.write_text(json.dumps(samples))
    out = root / "mid-Int4"
    command = [sys.executable, str(REPO / "run_gptq.py"), "--model_name_or_path", str(source), "--data_path",
               str(calibration), "--out_path", str(out), "--bits", "4", "--group-size", "64", "--max_len", "256"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"run_gptq.py failed:\n{result.stderr[-4000:]}")
    return out, time.perf_counter() - start


def folder_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / 2**20


def table(results: dict[str, dict], errors: dict[str, float]) -> list[str]:
    base = results[BASELINE]
    rows = ["| variant | weights, MiB | KV cache, MiB | peak RSS, MiB | decode tokens/s, batch 1 (range) | "
            "speed vs FP32 | weights vs FP32 | KV cache vs FP32 | logits vs FP32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['weights_mib']:.0f} | {r['kv_cache_mib']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} ({min(r['speeds']):.1f}-{max(r['speeds']):.1f}) | "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | "
            f"{r['weights_mib'] / base['weights_mib']:.2f}x | {r['kv_cache_mib'] / base['kv_cache_mib']:.2f}x | "
            f"{errors[name]:.2%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128-token prompt, 8 new tokens: a smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="subprocess rounds per variant; the median is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: torch's default). With other jobs on the machine, two "
                             "threads wait on each other at every small operation; one thread keeps timings steady")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "FOLDERS", "LOGITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        variant, folders, logits_path = args.worker
        print(json.dumps(worker(variant, json.loads(folders), args.quick, logits_path)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as scratch:
        root = Path(scratch)
        env = scratch_env(root)
        source = root / "mid"
        write_random_checkpoint(source, size="mid", chat=True, seed=0)
        int4, seconds = quantize(source, root, env)
        print(f"run_gptq.py quantized the mid checkpoint in {seconds:.0f} s; safetensors {folder_mib(source):.0f} MiB "
              f"(fp32) -> {folder_mib(int4):.0f} MiB (Int4 decoder layers; embedding and lm_head stay 16-bit)\n")
        folders = {"float": str(source), "int4": str(int4)}
        samples: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_index in range(args.rounds):
            order = list(VARIANTS) if round_index % 2 == 0 else list(VARIANTS)[::-1]  # drift hits all alike
            for name in order:
                logits_path = root / f"{len(samples[name])}-{name}.pt"
                samples[name].append(run_worker(name, folders, args.quick, args.threads, logits_path, env))
        results = {}
        for name, runs in samples.items():
            speeds = [r["decode_tokens_per_s"] for r in runs]
            peak = max(r["peak_rss_mib"] for r in runs)
            results[name] = {**runs[0], "decode_tokens_per_s": statistics.median(speeds), "speeds": speeds,
                             "peak_rss_mib": peak}
        reference = torch.load(root / f"0-{BASELINE}.pt")
        errors = {name: float((torch.load(root / f"0-{name}.pt") - reference).norm() / reference.norm())
                  for name in VARIANTS}
        context = results[BASELINE]["kv_cache_tokens"]
        print(f"KV cache after {context} tokens (prompt + generated). Ratios: FP32 measured in the same run "
              "(speed above 1: faster; memory below 1: smaller).\n")
        print("\n".join(table(results, errors)))


if __name__ == "__main__":
    main()
