"""Decode speed of the compiled fixed-shape step against the eager one, on the batching engine and on generate().

    python bench/bench_compile.py            # mid checkpoint, fp32/bf16/int8/int4, batch 1 and 8 (an idle machine)
    python bench/bench_compile.py --quick    # tiny checkpoint, few tokens: a smoke run of the script itself

Engine rows: B greedy requests with prompts of the same length decode together in a `GenerationEngine`, once with
the eager step (the default) and once with `compile=True` (`decode_one_token` under `torch.compile(fullgraph=True)`).
The rate counts decoded tokens between every request's first token and the last request's end, so the prefill is
left out; the compiled engine first runs the same workload once so that its compilations (reported separately) are
not timed. generate() rows (batch 1): the default dynamic cache eagerly against a static cache with a compile_config.
Ratios above 1 mean the compiled step is faster. The model is random (written by `qwen.checkpoint`); stop ids are
off so every request decodes all its tokens.

`decode_rows(model, tokenizer, label, ...)` takes a prepared model, so rows for other weight formats (quantized
weights, another device) are one call each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import CompileConfig  # noqa: E402

from qwen.checkpoint import write_random_checkpoint  # noqa: E402
from qwen.engine import GenerationEngine, SamplingParams  # noqa: E402
from qwen.loading import load_model_and_tokenizer  # noqa: E402
from qwen.modeling_qwen import QWenLMHeadModel  # noqa: E402
from qwen.tokenization_qwen import QWenTokenizer  # noqa: E402
from qwen.vocab import find_vocab  # noqa: E402


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def engine_decode_rate(engine: GenerationEngine, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Tokens per second that `batch` requests decoding together get, prefill excluded."""
    starts: dict[int, float] = {}  # each request's first token (from its prefill)
    ended: list[float] = []
    done = threading.Event()
    failures: list[str] = []

    def tracker(index: int):
        def track(event) -> None:  # runs on the engine thread
            if index not in starts and event.token_ids:
                starts[index] = time.perf_counter()
            if event.finish_reason is not None:
                if event.error:
                    failures.append(event.error)
                ended.append(time.perf_counter())
                if len(ended) == batch:
                    done.set()
        return track

    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    for index, ids in enumerate(prompts(batch, prompt_len, engine.model.config.vocab_size)):
        engine.submit(ids, params, on_event=tracker(index))
    if not done.wait(3600):
        raise SystemExit("the benchmark requests did not finish within an hour")
    if failures:
        raise SystemExit(f"a benchmark request failed: {failures[0]}")
    # Every request's first token comes from the prefill; the rest are decode steps.
    return batch * (new_tokens - 1) / (max(ended) - max(starts.values()))


def generate_rate(model: QWenLMHeadModel, prompt_len: int, new_tokens: int, compiled: bool) -> float:
    ids = torch.tensor(prompts(1, prompt_len, model.config.vocab_size))
    settings = dict(do_sample=False, top_p=None, top_k=None, repetition_penalty=1.0, min_new_tokens=new_tokens,
                    max_new_tokens=new_tokens)
    if compiled:
        settings.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="default"))
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **{k: v for k, v in settings.items() if "new_tokens" not in k})
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, **settings)
        total = time.perf_counter() - start
    return (new_tokens - 1) / max(total - prefill, 1e-9)


def decode_rows(model: QWenLMHeadModel, tokenizer: QWenTokenizer, label: str, batches: tuple[int, ...],
                prompt_len: int, new_tokens: int) -> list[str]:
    """Markdown rows for one prepared model: engine eager vs compiled per batch, then generate() at batch 1."""
    rows = []
    eager = GenerationEngine(model, tokenizer, max_batch_size=max(batches))
    compiled = GenerationEngine(model, tokenizer, max_batch_size=max(batches), compile=True)
    try:
        for batch in batches:
            eager_rate = engine_decode_rate(eager, batch, prompt_len, new_tokens)
            start = time.perf_counter()
            engine_decode_rate(compiled, batch, prompt_len, new_tokens)  # compiles for this batch and capacity
            warmup = time.perf_counter() - start
            compiled_rate = engine_decode_rate(compiled, batch, prompt_len, new_tokens)
            rows.append(f"| {label} | engine | {batch} | {eager_rate:.1f} | {compiled_rate:.1f} | "
                        f"{compiled_rate / eager_rate:.2f} | {warmup:.0f} |")
            print(rows[-1], flush=True)
    finally:
        eager.close()
        compiled.close()
    eager_rate = generate_rate(model, prompt_len, new_tokens, compiled=False)
    start = time.perf_counter()
    generate_rate(model, prompt_len, new_tokens, compiled=True)
    warmup = time.perf_counter() - start
    compiled_rate = generate_rate(model, prompt_len, new_tokens, compiled=True)
    rows.append(f"| {label} | generate() | 1 | {eager_rate:.1f} | {compiled_rate:.1f} | "
                f"{compiled_rate / eager_rate:.2f} | {warmup:.0f} |")
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny checkpoint, few tokens: a smoke run")
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint folder to time (default: a random one written to a temporary folder)")
    parser.add_argument("--dtypes", default="fp32,bf16,int8,int4",
                        help="comma-separated, of fp32, bf16, int8 and int4 (weights quantized on load)")
    args = parser.parse_args()
    size, batches, prompt_len, new_tokens = ("tiny", (1, 2), 16, 8) if args.quick else ("mid", (1, 8), 128, 64)
    tokenizer = QWenTokenizer(str(find_vocab()))
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.checkpoint or write_random_checkpoint(Path(scratch) / size, size=size, chat=True, seed=0)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; checkpoint {folder}; "
              f"prompts of {prompt_len} tokens, {new_tokens} new tokens each\n")
        print("| weights | path | batch | eager tok/s | compiled tok/s | compiled / eager | compile s |")
        print("|---|---|---|---|---|---|---|")
        dtypes = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
        for name in args.dtypes.split(","):
            model, _ = load_model_and_tokenizer(folder, cpu_only=True, dtype=dtypes[name])
            decode_rows(model, tokenizer, name, batches, prompt_len, new_tokens)


if __name__ == "__main__":
    main()
